"""`sdcli generate`: text to image, from a prompt, a prompts file, an embedding file (--cond), a latent file
(--latent-in) or the settings recorded in an image (--from-image)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.runtime import console
from sdcli.control import settings as control_config
from sdcli.runtime.errors import BadInputError, UnsupportedModelError, UsageError
from sdcli.jobs import Job, read_prompts_file, single_job
from sdcli.app import cluster, hires_fix, refine, remote, render, resume


@dataclass
class GenerateRequest:
    prompt: str | None
    flags: dict
    config_file: Path | None = None
    prompts_file: str | None = None
    cond: Path | None = None
    latent_in: Path | None = None
    latent_out: str | None = None
    overwrite: bool = False
    json_out: bool = False
    progress: str = "auto"  # auto | json | none
    dry_run: bool = False
    from_image: Path | None = None
    print_config: bool = False
    loras: list[str] = field(default_factory=list)  # --lora FILE[:WEIGHT], merged after loading
    preview: str | None = None  # --preview FILE: the current estimate of the image, rewritten while sampling
    control: dict = field(default_factory=dict)  # the ControlNet flags as given (cli._control), for a replay
    preview_vae: str | None = None  # --preview-vae: a TAESD decoder that draws the preview
    preview_interval: float = 0.5  # --preview-interval SECONDS between preview rewrites
    quality: int | None = None  # --quality for -o x.jpg / x.webp (targets.DEFAULT_QUALITY)
    grid: str | None = None  # --grid FILE: a contact sheet of the run's images
    grid_rows: int = -1  # grid.AUTO_ROWS; 0 = one row per batch
    grid_only: bool = False  # write the grid, not the single images
    skip_existing: bool = False  # render only the outputs missing (or not this job's image)
    workers: cluster.Workers = field(default_factory=cluster.Workers)  # with --ray (or config key ray)
    server: str | None = None  # --server URL: rendered by a warm `sdcli serve`, written here (app/remote.py)


def run_generate(req: GenerateRequest) -> None:
    if req.cond is not None:
        req = _with_cond_prompt(req)
    replay = _replay(req) if req.from_image else None
    if replay is not None:
        req = dataclasses.replace(req, flags=_replayed_controlnets(req, replay))
    base = cfgmod.resolve(req.flags, req.config_file, replay.values if replay else None)
    if replay is not None and "dtype" not in req.flags:  # a --dtype flag still wins over the image's
        base = _replayed_dtype(base, replay)
    if req.print_config:
        return _print_config(req, base, replay)
    if req.server and not base.model and not req.dry_run:  # rendered with the model the server has loaded
        base = remote.with_server_model(req.server, base)
    if replay is not None and req.prompt is None and not req.prompts_file:
        req = dataclasses.replace(req, prompt=replay.prompt)
    jobs = read_prompts_file(req.prompts_file, base) if req.prompts_file else [single_job(req.prompt, base)]
    if req.prompts_file and req.prompt:
        raise UsageError("give either a PROMPT or --prompts-file, not both")
    if not req.server or any(job.cfg.sampler == "help" for job in jobs):
        # with --server the server checks them (its exit code comes back): this process need not import torch
        render.check_samplers(jobs, base, lambda key: cfgmod.origin(key, req.flags, req.config_file, replay))
    if req.dry_run:
        from sdcli.app import dry_run

        return dry_run.show(jobs, req, base)
    if req.latent_in and base.hires_scale != 1.0:
        raise UsageError("--hires-scale upscales a text-to-image render; it cannot be used with --latent-in")
    refine.check_refiner_use(base, txt2img=not (req.latent_in or req.cond))
    hires_fix.check_upscalers(jobs)
    if req.server:
        remote.check_request(req, base)
    if replay is not None:
        from sdcli.output.replay import check_embeddings, check_model, check_refiner_given

        check_model(replay, base.model)
        check_embeddings(req.from_image, replay, base.embeddings_dir)
        check_refiner_given(replay, req.from_image, base.refiner)
    render.check_model_given(base)
    jobs = resume.adopt_seeds(jobs, req)
    targets, outputs = render.plan_outputs(jobs, req)
    render.plan_grid(req, targets, outputs, sized=True)
    targets = resume.skip_done(targets, outputs, req)
    outputs.check()
    if not targets:
        return console.info("nothing to render: every image exists")
    if req.server:  # the server finds the LoRA files in its own folder
        return remote.render_on_server(req.server, targets, req)
    loras = render.job_loras(jobs, req.loras)
    init_file = _init_latent_file(req.latent_in, jobs) if req.latent_in else None  # checked before the load
    control_config.check_files(jobs, base.model)
    if base.ray:
        return cluster.render_on_ray(base.ray, req.workers, base, targets, loras, req)
    models = render.load(base)
    render.check_model_options(models, base, None)  # text-to-image has no image and mask for an inpainting UNet
    init = _latent_init(req.latent_in, init_file, base, models) if init_file else None
    cond = _load_cond(req.cond, models) if req.cond else None
    render.render_all(models, targets, init, cond, req, loras, refiner=refine.load_refiner(base, models),
                      nets=control_config.load_nets(jobs, models))


def _print_config(req: GenerateRequest, base, replay) -> None:
    """The resolved config and each value's source (a replayed image's metadata named by the image's path)."""
    shown = cfgmod.sources(req.flags, req.config_file, replay.values if replay else None,
                           f"image metadata {req.from_image}")
    if replay is not None and base.dtype != cfgmod.resolve(req.flags, req.config_file, replay.values).dtype:
        shown["dtype"] = f"image metadata {req.from_image}"  # set by _replayed_dtype
    if req.json_out:
        return console.emit_result("config", None, {"config": base.to_dict(), "sources": shown})
    print(cfgmod.to_yaml(base, shown), end="")


def _replayed_controlnets(req: GenerateRequest, replay) -> dict:
    """The flags with the image's ControlNet units (files from --controlnet, hints beside it or given)."""
    recorded = (replay.recorded.get("config") or {}).get("controlnets")
    if recorded:
        units = control_config.replayed(recorded, Path(replay.path), req.control.get("models", []),
                                        req.control.get("images", []))
    else:
        units = control_config.from_flags(**req.control) if req.control else None
    return req.flags if units is None else {**req.flags, "controlnets": units}


def _init_latent_file(path: Path, jobs: list[Job]):
    from sdcli.output import latents

    return latents.load_init_latent(path, [(job.cfg.n, job.cfg.batch_size) for job in jobs])


def _latent_init(path: Path, lf, cfg, models) -> render.Init:
    from sdcli.pipeline import scale_factor, shift_factor

    return render.Init(lf.unet_space(scale_factor(models), shift_factor(models)), cfg.strength,
                       [f"started from latent file {path}"])


def _replay(req: GenerateRequest):
    from sdcli.output.replay import from_image

    replay = from_image(req.from_image)
    if replay.mode != "txt2img":
        console.info(f"{req.from_image}: made by {replay.mode}; replaying its settings as text-to-image")
    return replay


def _replayed_dtype(cfg, replay):
    """The image's dtype when it runs well on the device at hand, else `auto`'s pick, said on stderr."""
    from sdcli.runtime import device

    dtype, note = device.replay_dtype(replay.recorded.get("dtype"), device.choose(cfg.device, "fp32").device)
    if note:
        console.info(note)
    return cfg if dtype == "auto" else dataclasses.replace(cfg, dtype=dtype)


def _with_cond_prompt(req: GenerateRequest) -> GenerateRequest:
    """With --cond the embedding is the prompt: record the text it was made from. A PROMPT given as well would
    be written into the image's metadata without having conditioned it, so that is refused."""
    from sdcli.output import latents

    if req.prompt is not None or req.prompts_file:
        raise UsageError("--cond replaces the prompt: give it without a PROMPT or --prompts-file")
    return dataclasses.replace(req, prompt=latents.load_embedding(req.cond).prompt)


def _load_cond(path: Path, models):
    from sdcli.output import latents

    emb = latents.load_embedding(path)
    if any(spec.pooled or spec.kind != "clip" for spec in models.family.text):
        raise UnsupportedModelError(f"--cond: {models.family.title} also needs the pooled text vector, which an "
                                    "embedding file does not hold: give the prompt instead")
    width = models.info.text.hidden_size
    if emb.cond.shape[-1] != width:
        raise BadInputError(f"{path}: embedding width {emb.cond.shape[-1]} does not fit this model's text width {width}")
    return emb.cond
