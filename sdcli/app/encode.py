"""`sdcli encode` (an image to a VAE latent file, or a prompt to a CLIP embedding file) and `sdcli decode` (a
latent file back to PNG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdcli import __version__

from sdcli.runtime import console
from sdcli import config as cfgmod
from sdcli.runtime.errors import UnsupportedModelError, UsageError
from sdcli.jobs import single_job
from sdcli.app import render
from sdcli.app.planning import OutputPlan
from sdcli.app.save import model_hash, report


@dataclass
class EncodeRequest:
    image: str | None
    text: str | None
    output: str
    flags: dict
    config_file: Path | None = None
    overwrite: bool = False
    json_out: bool = False


@dataclass
class DecodeRequest:
    latent: Path
    flags: dict
    config_file: Path | None = None
    overwrite: bool = False
    json_out: bool = False


def run_encode(req: EncodeRequest) -> None:
    if (req.image is None) == (req.text is None):
        raise UsageError("give either an IMAGE to VAE-encode or --text PROMPT to CLIP-encode")
    if not req.output:
        raise UsageError("give the output file with -o")
    cfg = cfgmod.resolve(req.flags, req.config_file)
    plan = OutputPlan(overwrite=req.overwrite, json_stdout=req.json_out)
    plan.add("embedding" if req.text is not None else "latent", req.output)
    plan.check()
    if req.text is not None:
        return _encode_text(req, cfg)
    _encode_image(req, cfg)


def _encode_text(req: EncodeRequest, cfg) -> None:
    from sdcli import pipeline
    from sdcli.output import latents
    from sdcli.loading.lora import LoraState
    from sdcli.text.editing import prompt_schedule

    job = single_job(req.text, cfg)
    if len(prompt_schedule(job.text, cfg.steps)) > 1:
        raise UnsupportedModelError("the prompt edits itself during sampling ([from:to:when] or [a|b]); an "
                                    "embedding file holds one conditioning: give the prompt to generate")
    specs = render.lora_specs([], job)  # a <lora:...> tag changes the text encoder's weights
    models = render.load(cfg, lazy=True)  # the text encoders alone are read
    if any(spec.pooled or spec.kind != "clip" for spec in models.family.text):
        raise UnsupportedModelError(f"{models.family.title}: an embedding file holds one CLIP context, not the "
                                    "pooled text vector (or T5 tokens) this model also needs: give the prompt "
                                    "to generate")
    render.use_loras(LoraState(models), specs)
    cond, _ = pipeline.encode_text(models, job.text, "", cfg.clip_skip)
    path = latents.save_embedding(req.output, cond, prompt=req.text, family=models.info.family,
                                  clip_skip=cfg.clip_skip, model_hash=model_hash(models), overwrite=req.overwrite)
    report(req, {"path": str(path), "kind": "embedding", "shape": list(cond.shape)})


def _encode_image(req: EncodeRequest, cfg) -> None:
    from sdcli import pipeline
    from sdcli.formats import images
    from sdcli.output import latents

    img, notes = images.load_image(req.image)
    for note in notes:
        console.info(f"{req.image}: {note}")
    models = render.load(cfg, lazy=True)  # the VAE alone is read
    latent = pipeline.encode_image(models, images.pil_to_tensor(img))
    path = latents.save_latent(req.output, latent, scaled=True, scale_factor=pipeline.scale_factor(models),
                               family=models.info.family, source_size=(img.width, img.height),
                               model_hash=model_hash(models), overwrite=req.overwrite,
                               shift_factor=pipeline.shift_factor(models))
    report(req, {"path": str(path), "kind": "latent", "shape": list(latent.shape)})


def _decode_with_vae(cfg, lf, where: Path):
    """Decode with --vae alone. The latent file says its family (which TAESD fits, the VAE scale) when it was
    written by sdcli; a TAESD decodes the scaled latent, a full VAE the unscaled one."""
    from sdcli import pipeline
    from sdcli.runtime import device
    from sdcli.loading import vae as vae_files
    from sdcli.families import FAMILIES

    placement = device.choose(cfg.device, cfg.dtype)
    device.configure(placement, cfg.threads)
    family = next((f for f in FAMILIES if f.name == lf.family), None)
    vae = vae_files.load_vae_file(cfg.vae, placement.dtype, placement.device, family)
    factor = lf.scale_factor or (family.latent.scale_factor if family else None)
    shift = lf.shift_factor if lf.shift_factor is not None else (family.latent.shift_factor if family else 0.0)
    try:
        z = lf.unet_space(factor, shift) if vae_files.is_tiny(vae) else lf.vae_space(factor, shift)
    except UsageError:
        raise UsageError(f"{where}: the file does not record its VAE scale factor; give the checkpoint with "
                         "--model instead of --vae") from None
    return pipeline.decode_with(vae, z, pipeline.vae_tiling(cfg))


def run_decode(req: DecodeRequest) -> None:
    from sdcli import pipeline
    from sdcli.formats import images
    from sdcli.output import latents
    from sdcli.output.targets import STDOUT, expand_template, save_png

    cfg = cfgmod.resolve(req.flags, req.config_file)
    lf = latents.load_latent(req.latent)  # checked before the model is loaded
    n = lf.latent.shape[0]
    plan = OutputPlan(overwrite=req.overwrite, json_stdout=req.json_out)
    paths = [plan.add("image", STDOUT if cfg.output == STDOUT else expand_template(cfg.output, k, k, req.latent.stem))
             for k in range(n)]
    if n > 1 and len(set(paths)) != n:
        raise UsageError(f"{req.latent} holds {n} latents: give -o a template with {{index}}")
    plan.check()
    if cfg.vae:  # a latent file and a VAE (full or TAESD) are enough: no checkpoint is loaded
        decoded = _decode_with_vae(cfg, lf, req.latent)
    else:
        models = render.load(cfg, lazy=True)  # the VAE alone is read
        latent = lf.unet_space(pipeline.scale_factor(models), pipeline.shift_factor(models))
        with console.stage("VAE decode"):
            decoded = pipeline.decode_latents(models, latent, pipeline.vae_tiling(cfg))
    for k, p in enumerate(paths):
        meta = {"sdcli_version": __version__, "mode": "decode", "source": str(req.latent),
                "fallbacks": decoded.fallbacks}
        if cfg.vae:
            meta["vae"] = Path(cfg.vae).name
        saved = save_png(images.tensor_to_pil(decoded.images[k]), p, "", meta, overwrite=req.overwrite)
        report(req, {"path": str(saved), "index": k, "fallbacks": decoded.fallbacks})
