"""Saving what a render made: the PNG with A1111 infotext and sdcli's JSON record, the optional latent file, and
the line or JSON object that reports it. Everything recorded is read from the job, the model and the render's
LoRA reports: nothing is looked up on the side."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import __version__, console
from ..config import RunConfig


def save_one(models, target, image, latent, fallbacks, size, init, timings, req, hires=None, loras=()) -> None:
    """Image `target` of a batch: PNG (and latent when asked), then the report. `size` is the first pass's:
    A1111 writes it as Size, and the config records the width/height asked for."""
    from .. import images
    from ..outputs import save_png

    meta = metadata(models, target, size, fallbacks, init, hires, loras)
    text = infotext(models, target, size, init, hires, loras)
    path = save_png(images.tensor_to_pil(image), target.path, text, meta, overwrite=req.overwrite)
    if getattr(req, "latent_out", None):
        save_latent_out(models, req, target, latent, hires.size if hires else size)
    if req.json_out:
        console.emit_json({"path": str(path), "index": target.index, "seed": target.seed,
                           "prompt": target.job.prompt, "timings": timings, "fallbacks": fallbacks})
    elif str(path) != "-":
        console.info(f"saved {path} (seed {target.seed})")


def save_latent_out(models, req, target, latent, size) -> None:
    from .. import latents
    from ..outputs import expand_template
    from ..pipeline import scale_factor

    path = expand_template(req.latent_out, target.index, target.seed, target.job.prompt)
    latents.save_latent(path, latent, scaled=True, scale_factor=scale_factor(models), family=models.info.family,
                        source_size=(size[1], size[0]), model_hash=model_hash(models), overwrite=req.overwrite)


def infotext(models, target, size, init, hires=None, loras=()) -> str:
    from ..metadata import format_infotext

    cfg = target.job.cfg
    sampler, schedule = sampler_schedule(cfg)
    params = {"prompt": target.job.prompt, "negative_prompt": cfg.negative, "steps": cfg.steps,
              "sampler": sampler, "schedule": schedule, "cfg_scale": cfg.cfg, "seed": target.seed,
              "size": f"{size[1]}x{size[0]}", "model_hash": (model_hash(models) or "")[:10],
              "model": models.name, "version": f"sdcli {__version__}"}
    if cfg.clip_skip > 1:
        params["clip_skip"] = cfg.clip_skip
    if init is not None:
        params["denoising_strength"] = init.strength
    if hires is not None:  # as A1111 writes a hires fix render; Hires steps only when set
        params["denoising_strength"] = cfg.hires_strength
        params["extra"] = {"Hires upscale": cfg.hires_scale, "Hires steps": cfg.hires_steps,
                           "Hires upscaler": "Latent"}  # format_infotext drops the None
    if loras:  # A1111's field: "name: shorthash" per LoRA (A1111 also puts <lora:name:w> in the prompt)
        params["extra"] = {**params.get("extra", {}),
                           "Lora hashes": ", ".join(f"{r.name}: {r.short_hash}" for r in loras)}
    if cfg.controlnets:  # sd-webui-controlnet's `ControlNet N: "Module: ..., Model: name [hash], ..."`
        from ..control_config import infotext_fields

        params["extra"] = {**params.get("extra", {}), **infotext_fields(cfg.controlnets)}
    return format_infotext(params)


def metadata(models, target, size, fallbacks, init, hires=None, loras=()) -> dict:
    import torch

    job_cfg = target.job.cfg
    sampler, schedule = sampler_schedule(job_cfg)
    cfg = dataclasses.replace(job_cfg, seed=target.seed, width=size[1], height=size[0], n=1, sampler=sampler,
                              schedule=schedule, prediction=models.info.prediction,
                              device=models.placement.device, dtype=models.placement.dtype_name)
    recorded = cfg.to_dict()
    # Images get shared: record file names, not the user's folders, and not where this copy was written.
    for key in ("model", "vae"):
        recorded[key] = Path(recorded[key]).name if recorded[key] else recorded[key]
    del recorded["output"], recorded["lora_dir"]
    if cfg.controlnets:  # names and sha256 of the ControlNet files and hint images, every setting
        from ..control_config import recorded as control_record

        recorded["controlnets"] = control_record(cfg.controlnets)
    meta = {
        "sdcli_version": __version__, "torch_version": torch.__version__,
        "prompt": target.job.prompt, "seed": target.seed, "mode": mode(init),
        "config": recorded,
        "model": {"name": models.name, "sha256": model_hash(models), "family": models.info.family,
                  "prediction": models.info.prediction},
        "device": models.placement.device, "dtype": models.placement.dtype_name,
        "fallbacks": fallbacks, "notes": init.notes if init else [],
    }
    if init is not None and init.mask:
        meta["mask"] = Path(init.mask).name  # a file name, as for the model: not the user's folders
    if hires is not None:
        meta["hires_size"] = {"width": hires.size[1], "height": hires.size[0]}  # the output's size
    if loras:
        meta["loras"] = [{"name": r.path.name, "sha256": r.sha256, "weight": r.weight, "applied": r.applied,
                          "modules": r.total} for r in loras]
    return meta


def mode(init) -> str:
    if init is None:
        return "txt2img"
    return "inpaint" if init.concat is not None else "img2img"


def sampler_schedule(cfg: RunConfig) -> tuple[str, str]:
    """The canonical sampler and the schedule actually used ('auto' resolved; 'custom' for --sigmas)."""
    from ..pipeline import resolve_sampler_schedule

    sampler, schedule = resolve_sampler_schedule(cfg.sampler, cfg.schedule)
    return sampler, "custom" if cfg.sigmas else schedule


def model_hash(models) -> str | None:
    from ..formats.hashing import file_sha256

    source = Path(models.source)
    return file_sha256(source) if source.is_file() else None


def refuse_existing(path: Path, overwrite: bool) -> None:
    from ..outputs import check_target

    check_target(path, overwrite)


def report(req, obj: dict) -> None:
    if req.json_out:
        console.emit_json(obj)
    elif obj.get("path") != "-":
        console.info(f"saved {obj['path']}")
