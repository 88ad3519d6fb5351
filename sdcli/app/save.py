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
from sdcli.config import RunConfig


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
    return Saved(images.tensor_to_pil(image), target.seed, text, meta)


def png_of(picture: Saved) -> bytes:
    """The bytes of the image's PNG file, metadata included: the same wherever it is made (locally, on a worker)."""
    from sdcli.output.targets import png_bytes

    return png_bytes(picture.image, picture.infotext, picture.meta)


def save_rendered(models, done, req) -> None:
    """A rendered image (render.Rendered): its PNG written atomically (not with --grid-only: the image goes on the
    grid only), its latent when asked, then the report."""
    path = None if getattr(req, "grid_only", False) else write_png(done.target, done.png, req)
    if done.target.latent_path is not None:
        save_latent_out(models, req, done.target, done.latent, done.size)
    if path is not None:
        announce(req, done.target, path, done.timings, done.fallbacks)


def check_grid(req, count: int, cell: tuple[int, int], batch_size: int) -> None:
    """--grid: the sheet of `count` images of size `cell` can be made (grid.check_sheet_size), before any render."""
    from sdcli.output import grid

    grid.check_sheet_size(*grid.sheet_size(count, cell, req.grid_rows, batch_size), f"--grid {req.grid}")


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
    from sdcli.pipeline import scale_factor

    latents.save_latent(target.latent_path, latent, scaled=True, scale_factor=scale_factor(models), family=models.info.family,
                        source_size=(size[1], size[0]), model_hash=model_hash(models), overwrite=req.overwrite)


def infotext(models, target, size, init, hires=None, loras=(), refiner=None) -> str:
    from sdcli.output.metadata import format_infotext

    cfg = target.job.cfg
    sampler, schedule = sampler_schedule(cfg)
    params = {"prompt": target.job.prompt, "negative_prompt": cfg.negative, "steps": cfg.steps,
              "sampler": sampler, "schedule": schedule, "cfg_scale": cfg.cfg, "seed": target.seed,
              "size": f"{size[1]}x{size[0]}", "model_hash": (model_hash(models) or "")[:10],
              "model": models.name, "version": f"sdcli {__version__}"}
    if models.vae_source is not None:  # as A1111 records a VAE chosen apart from the checkpoint
        params["vae"], params["vae_hash"] = models.vae_source.name, (vae_hash(models) or "")[:10]
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
        from sdcli.control.settings import infotext_fields

        params["extra"] = {**params.get("extra", {}), **infotext_fields(cfg.controlnets)}
    used = used_embeddings(models, target.job)
    if used:  # A1111's field: "name: shorthash" per textual-inversion embedding the prompts placed
        params["extra"] = {**params.get("extra", {}),
                           "TI hashes": ", ".join(f"{e.name}: {e.short_hash}" for e in used)}
    params["extra"] = {**params.get("extra", {}), **size_fields(cfg, models)}
    if refiner is not None:  # A1111: "Refiner: NAME [shorthash], Refiner switch at: 0.8"
        short = (model_hash(refiner.models) or "")[:10]
        params["extra"] = {**params.get("extra", {}), "Refiner": f"{refiner.models.name} [{short}]",
                           "Refiner switch at": cfg.refiner_switch}
    return format_infotext(params)


def size_fields(cfg: RunConfig, models) -> dict:
    """SDXL's size conditioning where it was asked for (A1111 has no fields for it: sdcli's own labels; the
    refiner's aesthetic scores stay in sdcli's record, as A1111 keeps them in its settings)."""
    if models.family.size_values is None:
        return {}
    fields = {"Original size": cfg.original_size, "Target size": cfg.target_size, "Crop coords": cfg.crop_coords}
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
    sampler, schedule = sampler_schedule(job_cfg)
    cfg = dataclasses.replace(job_cfg, seed=target.seed, width=size[1], height=size[0], n=1, sampler=sampler,
                              schedule=schedule, prediction=models.info.prediction,
                              device=models.placement.device, dtype=models.placement.dtype_name)
    recorded = cfg.to_dict()
    # Images get shared: record file names, not the user's folders, and not where this copy was written.
    for key in ("model", "vae", "refiner"):
        recorded[key] = Path(recorded[key]).name if recorded[key] else recorded[key]
    # the user's folders, and where and how it ran
    for key in ("output", "lora_dir", "embeddings_dir", "vae_dir", "ray", "offload"):
        del recorded[key]
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
    if models.vae_source is not None:
        meta["vae"] = {"name": models.vae_source.name, "sha256": vae_hash(models),
                       "kind": "taesd" if models.vae_is_tiny else "full"}
    if init is not None and init.mask:
        meta["mask"] = Path(init.mask).name  # a file name, as for the model: not the user's folders
    if hires is not None:
        meta["hires_size"] = {"width": hires.size[1], "height": hires.size[0]}  # the output's size
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


def mode(init) -> str:
    if init is None:
        return "txt2img"
    return "inpaint" if init.concat is not None else "img2img"


def sampler_schedule(cfg: RunConfig) -> tuple[str, str]:
    """The canonical sampler and the schedule actually used ('auto' resolved; 'custom' for --sigmas)."""
    from sdcli.pipeline import resolve_sampler_schedule

    sampler, schedule = resolve_sampler_schedule(cfg.sampler, cfg.schedule)
    return sampler, "custom" if cfg.sigmas else schedule


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
