"""`sdcli img2img`: an input image noised to --strength and re-sampled; with --mask an inpainting model repaints
the white area (its UNet sees the mask and the masked image through Cond.concat)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.runtime import console
from sdcli.control import settings as control_config
from sdcli.jobs import single_job
from sdcli.app import cluster, refine, render, resume


@dataclass
class Img2ImgRequest:
    prompt: str
    image: str
    flags: dict
    config_file: Path | None = None
    overwrite: bool = False
    json_out: bool = False
    progress: str = "auto"  # auto | json | none
    mask: str | None = None  # inpainting mask (white = repaint); needs a 9-channel inpainting model
    loras: list[str] = field(default_factory=list)  # --lora FILE[:WEIGHT], merged after loading
    preview: str | None = None
    preview_vae: str | None = None
    grid: str | None = None  # --grid FILE: a contact sheet of the run's images
    grid_rows: int = -1
    grid_only: bool = False
    skip_existing: bool = False
    workers: cluster.Workers = field(default_factory=cluster.Workers)  # with --ray (or config key ray)


def run_img2img(req: Img2ImgRequest) -> None:
    from sdcli.formats import images

    base = cfgmod.resolve(req.flags, req.config_file)
    if req.mask and cfgmod.origin("strength", req.flags, req.config_file) == "default":
        base = dataclasses.replace(base, strength=1.0)  # inpainting repaints from pure noise unless told otherwise
    job = single_job(req.prompt, base)
    refine.check_refiner_use(base, txt2img=False)
    render.check_samplers([job], base, lambda key: cfgmod.origin(key, req.flags, req.config_file))
    img, notes = images.load_image(req.image)
    for note in notes:
        console.info(f"{req.image}: {note}")
    mask = _load_mask(req.mask, img) if req.mask else None
    job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, width=img.width, height=img.height))
    targets, outputs = render.plan_outputs([job], req)
    render.plan_grid(req, targets, outputs)
    targets = resume.skip_done(targets, outputs, req)
    outputs.check()
    if not targets:
        return console.info("nothing to render: every image exists")
    loras = render.job_loras([job], req.loras)
    control_config.check_files([job], base.model)
    setup = functools.partial(_init, base, img, mask, notes, req.mask)
    if base.ray:
        return cluster.render_on_ray(base.ray, req.workers, base, targets, loras, req, setup)
    models = render.load(base)
    init, _ = setup(models)
    render.render_all(models, targets, init, None, req, loras, nets=control_config.load_nets([job], models))


def _init(base, img, mask, notes, mask_path, models) -> tuple:
    """(Init, no embedding) for a loaded model: the image encoded, the inpainting channels when masked. A Ray
    worker calls it too, once its own model is loaded."""
    from sdcli import pipeline
    from sdcli.formats import images

    render.check_inpaint_model(models, base, mask_path)
    if mask is None:  # a transformer's 2x2 patches need sides that are multiples of 16
        img, cropped = images.crop_to_multiple(img, models.family.size_multiple)
        notes = [*notes, *cropped]
        for note in cropped:
            console.info(note)
    pixels = images.pil_to_tensor(img)
    latent = pipeline.encode_image(models, pixels)
    concat = pipeline.inpaint_conditioning(models, pixels, mask) if mask is not None else None
    return render.Init(latent, base.strength, notes, concat, mask_path), None


def _load_mask(path: str, img):
    from sdcli.formats import images

    mask, notes = images.load_mask(path, img.size)
    for note in notes:
        console.info(f"{path}: {note}")
    return mask
