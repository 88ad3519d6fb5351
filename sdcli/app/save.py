"""Saving what a render made: the PNG with A1111 infotext and sdcli's JSON record, the optional latent file, and
the line or JSON object that reports it. Everything recorded is read from the job, the model and the render's
LoRA reports: nothing is looked up on the side."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from sdcli import __version__

from sdcli.runtime import console

from sdcli.control import settings as control_config
from sdcli.config import RunConfig, sparse_keys


class Saved(NamedTuple):
    """An image with its metadata, as saved (or, with --grid-only, as it would have been): for the grid."""

    image: Any  # PIL image
    seed: int
    infotext: str
    meta: dict


def picture_for(models, target, image, fallbacks, size, init, hires=None, loras=(), refiner=None) -> Saved:
    """Image `target` of a batch with its metadata. `size` is the first pass's: A1111 writes it as Size, and the
    config records the width/height asked for."""
    from sdcli.formats import images

    meta = metadata(models, target, size, fallbacks, init, hires, loras, refiner)
    text = infotext(models, target, size, init, hires, loras, refiner)
    picture = images.tensor_to_pil(image)
    if init is not None and init.inpaint is not None:  # the original put back as the inpaint settings say
        picture = init.inpaint.finish(picture)
    return Saved(picture, target.seed, text, meta)


def png_of(picture: Saved) -> bytes:
    """The bytes of the image's PNG file, metadata included: the same wherever it is made (locally, on a worker)."""
    from sdcli.output.targets import png_bytes

    return png_bytes(picture.image, picture.infotext, picture.meta)


def file_bytes(picture: Saved, path, req) -> bytes:
    """The image's file in the format its name asks for (-o x.jpg: JPEG, at --quality), metadata included."""
    from sdcli.output.targets import DEFAULT_QUALITY, image_bytes, image_format

    quality = getattr(req, "quality", None) or DEFAULT_QUALITY
    return image_bytes(picture.image, picture.infotext, picture.meta, image_format(path), quality)


def save_rendered(models, done, req) -> None:
    """A rendered image (render.Rendered): its PNG written atomically (not with --grid-only: the image goes on the
    grid only), its latent when asked, then the report."""
    path = None if getattr(req, "grid_only", False) else write_png(done.target, done.png, req)
    if done.target.latent_path is not None:
        save_latent_out(models, req, done.target, done.latent, done.size)
    if path is not None:
        announce(req, done.target, path, done.timings, done.fallbacks)


def save_grid(saved: list[Saved], req, batch_size: int) -> None:
    """--grid FILE: a contact sheet of the run's images (grid.image_grid: A1111's rows and columns) carrying the
    first image's infotext and metadata, plus every image's seed in order."""
    from sdcli.output import grid
    from sdcli.output.targets import save_png

    sheet = grid.image_grid([s.image for s in saved], rows=req.grid_rows, batch_size=batch_size)
    first = saved[0]
    meta = {**first.meta, "grid_seeds": [s.seed for s in saved],
            "grid_shape": dict(zip(("rows", "cols"), grid.grid_shape(len(saved), req.grid_rows, batch_size)))}
    path = save_png(sheet, req.grid, first.infotext, meta, overwrite=req.overwrite)
    report(req, {"path": str(path), "grid": True, "seeds": meta["grid_seeds"], **meta["grid_shape"]})


def write_png(target, png: bytes, req) -> Path:
    from sdcli.output.targets import atomic_write_bytes

    return atomic_write_bytes(target.path, png, overwrite=req.overwrite)


def announce(req, target, path: Path, timings: dict, fallbacks: list, **extra) -> None:
    """The line (or --json object) that says an image was saved; `extra` adds fields (e.g. the Ray worker)."""
    if req.json_out:
        console.emit_json({"path": str(path), "index": target.index, "seed": target.seed,
                           "prompt": target.job.prompt, "timings": timings, "fallbacks": fallbacks, **extra})
    elif str(path) != "-":
        console.info(f"saved {path} (seed {target.seed})")


def save_latent_out(models, req, target, latent, size) -> None:
    from sdcli.output import latents
    from sdcli.pipeline import scale_factor, shift_factor

    latents.save_latent(target.latent_path, latent, scaled=True, scale_factor=scale_factor(models), family=models.info.family,
                        source_size=(size[1], size[0]), model_hash=model_hash(models), overwrite=req.overwrite,
                        shift_factor=shift_factor(models))


def infotext(models, target, size, init, hires=None, loras=(), refiner=None) -> str:
    from sdcli.output.metadata import format_infotext

    cfg = target.job.cfg
    sampler, schedule = sampler_schedule(cfg, models.family)
    params = {"prompt": target.job.prompt, "negative_prompt": cfg.negative, "steps": cfg.steps,
              "sampler": sampler, "schedule": schedule, "cfg_scale": cfg_of(cfg, models.family), "seed": target.seed,
              "size": f"{size[1]}x{size[0]}", "model_hash": (model_hash(models) or "")[:10],
              "model": models.name, "version": f"sdcli {__version__}"}
    if models.vae_source is not None:  # as A1111 records a VAE chosen apart from the checkpoint
        params["vae"], params["vae_hash"] = models.vae_source.name, (vae_hash(models) or "")[:10]
    if cfg.clip_skip > 1:
        params["clip_skip"] = cfg.clip_skip
    params.update(noise_fields(cfg, sampler, target.image_subseed))
    if init is not None:
        params["denoising_strength"] = init.strength
    if init is not None and init.inpaint is not None:  # A1111's inpaint fields (Mask blur, Masked content, ...)
        params["extra"] = init.inpaint.fields()
    if hires is not None:  # as A1111 writes a hires fix render; Hires steps only when set
        params["denoising_strength"] = cfg.hires_strength
        params["extra"] = {"Hires upscale": cfg.hires_scale, "Hires steps": cfg.hires_steps,
                           "Hires upscaler": hires_upscaler_name(hires)}  # format_infotext drops the None
    params["extra"] = {**params.get("extra", {}), **token_merging_fields(cfg, hires is not None)}
    if loras:  # A1111's field: "name: shorthash" per LoRA (A1111 also puts <lora:name:w> in the prompt)
        params["extra"] = {**params.get("extra", {}),
                           "Lora hashes": ", ".join(f"{r.name}: {r.short_hash}" for r in loras)}
    if cfg.controlnets:  # sd-webui-controlnet's `ControlNet N: "Module: ..., Model: name [hash], ..."`
        from sdcli.control.settings import infotext_fields

        params["extra"] = {**params.get("extra", {}), **infotext_fields(cfg.controlnets)}
    used = used_embeddings(models, target.job)
    if used:  # A1111's field: "name: shorthash" per textual-inversion embedding the prompts placed
        params["extra"] = {**params.get("extra", {}),
                           "TI hashes": ", ".join(f"{e.name}: {e.short_hash}" for e in used)}
    params["extra"] = {**params.get("extra", {}), **size_fields(cfg, models), **flow_fields(cfg, models.family)}
    if refiner is not None:  # A1111: "Refiner: NAME [shorthash], Refiner switch at: 0.8"
        short = (model_hash(refiner.models) or "")[:10]
        params["extra"] = {**params.get("extra", {}), "Refiner": f"{refiner.models.name} [{short}]",
                           "Refiner switch at": cfg.refiner_switch}
    return format_infotext(params)


def hires_upscaler_name(hires) -> str:
    """The hires upscaler as A1111 names it (a model file by its stem): what replay looks up again."""
    return "Latent" if hires.upscaler is None else hires.upscaler.choice.name


def record_hires_upscaler(recorded: dict, cfg: RunConfig) -> None:
    """The recorded config's hires upscaler: its A1111 name when the hires fix ran with one other than the default
    "Latent", else no key at all (so images rendered before upscalers existed, and every image whose hires fix
    is the default, keep their bytes); upscaler_dir is the user's folder, never recorded."""
    from sdcli.upscale.names import DEFAULT, display_name

    recorded.pop("upscaler_dir", None)
    name = display_name(cfg.hires_upscaler)
    if cfg.hires_scale == 1.0 or name == DEFAULT:
        recorded.pop("hires_upscaler", None)
    else:
        recorded["hires_upscaler"] = name


def noise_fields(cfg: RunConfig, sampler: str, subseed: int) -> dict:
    """The noise and sampler-parameter fields of the infotext, by A1111's rules: the source (`RNG`, written always,
    so that an sdcli image never reads as A1111's default GPU noise by accident), the variation seed and strength
    when the strength is not 0, "Seed resize from" when set, then Eta / Sigma ... / ENSD where A1111 writes them
    (sampling/a1111_params.infotext_fields)."""
    from sdcli.sampling.a1111_params import infotext_fields

    fields = {"rng": cfg.rng.upper()}
    if cfg.subseed_strength != 0:
        fields.update(subseed=subseed, subseed_strength=cfg.subseed_strength)
    if cfg.seed_resize_from:
        from sdcli.config import pair_of

        h, w = pair_of("seed_resize_from", cfg.seed_resize_from)
        if w > 0 and h > 0:
            fields["seed_resize_from"] = f"{w}x{h}"
    churn = {"s_churn": cfg.s_churn, "s_tmin": cfg.s_tmin, "s_tmax": cfg.s_tmax, "s_noise": cfg.s_noise}
    fields["sampler_fields"] = infotext_fields(sampler, cfg.eta, churn, cfg.ensd)
    return fields


def token_merging_fields(cfg: RunConfig, hires: bool) -> dict:
    """A1111's token merging fields (processing.py create_infotext): each written only when not 0; the hires ratio
    is the pass's own, falling back to the base ratio, and only when there is a hires pass."""
    hr = (cfg.tome_ratio_hr or cfg.tome_ratio) if hires else 0
    fields = {"Token merging ratio": cfg.tome_ratio or None, "Token merging ratio hr": hr or None}
    return {k: v for k, v in fields.items() if v is not None}


def size_fields(cfg: RunConfig, models) -> dict:
    """SDXL's size conditioning where it was asked for (A1111 has no fields for it: sdcli's own labels; the
    refiner's aesthetic scores stay in sdcli's record, as A1111 keeps them in its settings)."""
    if models.family.size_values is None:
        return {}
    fields = {"Original size": cfg.original_size, "Target size": cfg.target_size, "Crop coords": cfg.crop_coords}
    return {k: v for k, v in fields.items() if v is not None}


def cfg_of(cfg: RunConfig, family) -> float:
    """The guidance scale the render used: the run's, else the family's default."""
    return family.default_cfg if cfg.cfg is None else cfg.cfg


def guidance_of(cfg: RunConfig, family) -> float | None:
    """A guidance-distilled family's strength (the run's --guidance, else its default); None for others."""
    if family.guidance != "distilled":
        return None
    return family.default_guidance if cfg.guidance is None else cfg.guidance


def flow_fields(cfg: RunConfig, family) -> dict:
    """Forge's infotext fields of the flow models: "Distilled CFG Scale" (FLUX dev's guidance) and "Shift" (when
    the run replaced the family's); stable-diffusion.cpp's of SD3.5's skip-layer guidance when it is on (its
    "SLG scale" holds the scale here; "Skip layers" quoted, as its commas would split the field)."""
    fields = {"Distilled CFG Scale": guidance_of(cfg, family), "Shift": cfg.flow_shift}
    if cfg.slg_scale:
        from sdcli.sampling.slg import parse_layers

        fields.update({"SLG scale": cfg.slg_scale, "Skip layers": str(list(parse_layers(cfg.skip_layers))),
                       "Skip layer start": cfg.slg_start, "Skip layer end": cfg.slg_end})
    return {k: v for k, v in fields.items() if v is not None}


def used_embeddings(models, job) -> list:
    """The textual-inversion embeddings the job's prompt and negative place, at any step of any pass."""
    from sdcli.text.editing import prompt_schedule

    if models.embeddings is None:
        return []
    cfg = job.cfg
    passes = [None] if cfg.hires_scale == 1.0 else [None, cfg.hires_steps or cfg.steps]
    texts = {t: None for text in (job.text, cfg.negative) for hires in passes
             for _, t in prompt_schedule(text, cfg.steps, hires)}
    return models.embeddings.used_in(texts)


def metadata(models, target, size, fallbacks, init, hires=None, loras=(), refiner=None) -> dict:
    import torch

    job_cfg = target.job.cfg
    sampler, schedule = sampler_schedule(job_cfg, models.family)
    cfg = dataclasses.replace(job_cfg, seed=target.seed, subseed=target.image_subseed, width=size[1], height=size[0],
                              n=1, sampler=sampler,
                              schedule=schedule, prediction=models.info.prediction,
                              device=models.placement.device, dtype=models.placement.dtype_name,
                              cfg=cfg_of(job_cfg, models.family), guidance=guidance_of(job_cfg, models.family))
    recorded = cfg.to_dict()
    # Images get shared: record file names, not the user's folders, and not where this copy was written.
    for key in ("model", "vae", "refiner", "clip_l", "clip_g", "t5"):
        recorded[key] = Path(recorded[key]).name if recorded[key] else recorded[key]
    # the user's folders, and where and how it ran
    for key in ("output", "lora_dir", "embeddings_dir", "vae_dir", "ray", "offload"):
        del recorded[key]
    for key, default in sparse_keys().items():  # features that are off stay out of the record (config._range)
        if recorded[key] == default:
            del recorded[key]
    recorded.pop("threads", None)  # how it ran, at any value: the bytes do not depend on it (models/invariant.py)
    record_hires_upscaler(recorded, cfg)
    control_config.put_record(recorded, cfg.controlnets)  # ControlNet files and hints: names, sha256, settings
    meta = {
        "sdcli_version": __version__, "torch_version": torch.__version__,
        "prompt": target.job.prompt, "seed": target.seed, "mode": mode(init),
        "config": recorded,
        "model": {"name": models.name, "sha256": model_hash(models), "family": models.info.family,
                  "prediction": models.info.prediction},
        "device": models.placement.device, "dtype": models.placement.dtype_name,
        "fallbacks": fallbacks, "notes": init.notes if init else [],
    }
    quantized = quantization(models)
    if quantized:  # a GGUF holding GGML blocks: which types, per part (the sha256 names the file itself)
        meta["model"]["quantization"] = quantized
    if models.vae_source is not None:
        meta["vae"] = {"name": models.vae_source.name, "sha256": vae_hash(models),
                       "kind": "taesd" if models.vae_is_tiny else "full"}
    if init is not None and init.mask:
        meta["mask"] = Path(init.mask).name  # a file name, as for the model: not the user's folders
    if hires is not None:
        meta["hires_size"] = {"width": hires.size[1], "height": hires.size[0]}  # the output's size
    if hires is not None and hires.upscaler is not None and hires.upscaler.choice.path is not None:
        meta["hires_upscaler"] = upscaler_record(hires.upscaler.choice)
    used = used_embeddings(models, target.job)
    if used:  # the file name (A1111's name is its stem) and the whole file's sha256
        meta["embeddings"] = [{"name": e.name, "file": e.path.name, "sha256": e.sha256, "vectors": e.n_vectors}
                              for e in used]
    if refiner is not None:
        meta["refiner"] = {"name": refiner.models.name, "sha256": model_hash(refiner.models),
                           "family": refiner.models.info.family, "switch_at": job_cfg.refiner_switch}
    if loras:
        meta["loras"] = [{"name": r.path.name, "sha256": r.sha256, "weight": r.weight, "applied": r.applied,
                          "modules": r.total} for r in loras]
    return meta


def upscaler_record(choice) -> dict:
    """An upscaler model file as images record it: its A1111 name, file name and sha256 (not the user's folder)."""
    from sdcli.formats.hashing import file_sha256

    return {"name": choice.name, "file": choice.path.name, "sha256": file_sha256(choice.path)}


def mode(init) -> str:
    if init is None:
        return "txt2img"
    return "inpaint" if init.concat is not None or init.inpaint is not None else "img2img"


def sampler_schedule(cfg: RunConfig, family=None) -> tuple[str, str]:
    """The canonical sampler and the schedule actually used ('auto' resolved; 'custom' for --sigmas; a flow
    family's own sigmas are "simple", as Forge names them)."""
    from sdcli.pipeline import FLOW_SCHEDULES, resolve_sampler_schedule

    sampler, schedule = resolve_sampler_schedule(cfg.sampler, cfg.schedule)
    if family is not None and family.flow is not None and not cfg.sigmas:
        return sampler, FLOW_SCHEDULES[-1]
    return sampler, "custom" if cfg.sigmas else schedule


def quantization(models) -> dict[str, dict[str, int]] | None:
    """part -> {ggml type: tensors} of a model whose file holds GGML blocks (a quantized GGUF), else None."""
    from sdcli.formats.safetensors import FLOAT_DTYPES

    dtypes = models.info.dtypes
    if not any(t not in FLOAT_DTYPES for counts in dtypes.values() for t in counts):
        return None
    return {part: dict(sorted(counts.items())) for part, counts in sorted(dtypes.items())}


def model_hash(models) -> str | None:
    from sdcli.formats.hashing import file_sha256

    source = Path(models.source)
    return file_sha256(source) if source.is_file() else None


def vae_hash(models) -> str | None:
    from sdcli.formats.hashing import file_sha256

    source = models.vae_source
    return file_sha256(source) if source is not None and source.is_file() else None


def refuse_existing(path: Path, overwrite: bool) -> None:
    from sdcli.output.targets import check_target

    check_target(path, overwrite)


def report(req, obj: dict) -> None:
    if req.json_out:
        console.emit_json(obj)
    elif obj.get("path") != "-":
        console.info(f"saved {obj['path']}")
