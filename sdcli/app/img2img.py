"""`sdcli img2img`: an input image noised to --strength and re-sampled; with --mask (white = repaint) or --pad
(outpainting) it inpaints as A1111 does (app/inpaint.py): any model, or a 9-channel inpainting model, which also
sees the mask and the kept picture through Cond.concat."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.runtime import console
from sdcli.control import settings as control_config
from sdcli.jobs import single_job
from sdcli.app import cluster, inpaint, refine, remote, render, resume


@dataclass
class Img2ImgRequest:
    prompt: str
    image: str
    flags: dict
    config_file: Path | None = None
    overwrite: bool = False
    json_out: bool = False
    progress: str = "auto"  # auto | json | none
    mask: str | None = None  # inpainting mask (white = repaint)
    loras: list[str] = field(default_factory=list)  # --lora FILE[:WEIGHT], merged after loading
    preview: str | None = None
    preview_vae: str | None = None
    preview_interval: float = 0.5  # --preview-interval SECONDS
    quality: int | None = None  # --quality for -o x.jpg / x.webp
    grid: str | None = None  # --grid FILE: a contact sheet of the run's images
    grid_rows: int = -1
    grid_only: bool = False
    skip_existing: bool = False
    workers: cluster.Workers = field(default_factory=cluster.Workers)  # with --ray (or config key ray)
    server: str | None = None  # --server URL: rendered by a warm `sdcli serve`, written here (app/remote.py)


def run_img2img(req: Img2ImgRequest) -> None:
    base = cfgmod.resolve(req.flags, req.config_file)
    masked = bool(req.mask or base.pad)
    if masked and cfgmod.origin("strength", req.flags, req.config_file) == "default":
        base = dataclasses.replace(base, strength=_inpaint_strength(base))
    job = single_job(req.prompt, base)
    refine.check_refiner_use(base, txt2img=False)
    if req.server:
        remote.check_request(req, base)
    render.check_samplers([job], base, lambda key: cfgmod.origin(key, req.flags, req.config_file))
    render.check_model_given(base)
    from sdcli.formats import images  # imports torch: after the checks that need none
    img, notes = images.load_image(req.image)
    for note in notes:
        console.info(f"{req.image}: {note}")
    mask = _load_mask(req.mask, img) if req.mask else None
    width, height = inpaint.canvas_size(img.size, base.pad)
    job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, width=width, height=height))
    job, = resume.adopt_seeds([job], req)
    targets, outputs = render.plan_outputs([job], req)
    render.plan_grid(req, targets, outputs)
    targets = resume.skip_done(targets, outputs, req)
    outputs.check()
    if not targets:
        return console.info("nothing to render: every image exists")
    if req.server:  # the picture as loaded here, so the server encodes the same pixels
        return remote.render_on_server(req.server, targets, req, (img, notes, mask, req.mask))
    loras = render.job_loras([job], req.loras)
    control_config.check_files([job], base.model)
    setup = functools.partial(prepare_init, base, img, mask, notes, req.mask)
    if base.ray:
        return cluster.render_on_ray(base.ray, req.workers, base, targets, loras, req, setup)
    models = render.load(base)
    init, _ = setup(models)
    render.render_all(models, targets, init, None, req, loras, nets=control_config.load_nets([job], models))


def _inpaint_strength(cfg) -> float:
    """--mask or --pad without --strength: 1 with a 9-channel inpainting model (it repaints from noise, seeing the
    kept picture through its extra channels), A1111's 0.75 with any other (the masked area starts from the
    picture). The model's kind is read from its header (a hub id is fetched, as the load would), before anything
    loads, so the job's settings are known when its outputs are planned."""
    from sdcli.families import hub_patterns
    from sdcli.formats.hub import resolve_model
    from sdcli.loading.checkpoint import detect
    from sdcli.runtime.errors import BadInputError, UnsupportedModelError

    if not cfg.model:
        return cfg.strength  # render.load says that a model is needed
    path = resolve_model(cfg.model, hub_patterns())
    try:
        inpainting = detect(path).inpaint
    except (BadInputError, UnsupportedModelError) as e:  # detection sees only a header: name the file
        raise type(e)(f"{path}: {e}") from None
    return 1.0 if inpainting else cfg.strength


def prepare_init(base, img, mask, notes, mask_path, models) -> tuple:
    """(Init, no embedding) for a loaded model: the image encoded; when masked (or padded), inpainting's pixels
    prepared (app/inpaint.py) and either the 9-channel model's extra channels or the latent mask that pins the
    kept area. A Ray worker calls it too, once its own model is loaded, and the server (app/serve_device.py)
    for each request."""
    from sdcli import pipeline
    from sdcli.formats import images

    render.check_model_options(models, base, mask_path or base.pad)
    if mask is None and not base.pad:
        # a transformer's 2x2 patches need sides that are multiples of 16
        img, cropped = images.crop_to_multiple(img, models.family.size_multiple)
        for note in cropped:
            console.info(note)
        latent = pipeline.encode_image(models, images.pil_to_tensor(img))
        return render.Init(latent, base.strength, [*notes, *cropped]), None
    work = inpaint.prepare(img, mask, inpaint.settings(base, models.info.inpaint))
    pixels = images.pil_to_tensor(work.image)
    latent = pipeline.encode_image(models, pixels)
    if models.info.inpaint:
        concat, keep = pipeline.inpaint_conditioning(models, pixels, images.binarize(work.mask)), None
    else:
        concat, keep = None, work.keep(latent.shape)
    return render.Init(latent, base.strength, notes, concat, mask_path, inpaint=work, keep=keep), None


def _load_mask(path: str, img):
    from sdcli.formats import images

    mask, notes = images.load_mask_image(path, img.size)
    for note in notes:
        console.info(f"{path}: {note}")
    return mask
