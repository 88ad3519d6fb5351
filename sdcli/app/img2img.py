"""`sdcli img2img`: an input image noised to --strength and re-sampled; with --mask (white = repaint) or --pad
(outpainting) it inpaints as A1111 does (app/inpaint.py): any model, or a 9-channel inpainting model, which also
sees the mask and the kept picture through Cond.concat.

-W/-H resize the input picture first (A1111's "Just resize"; one side alone keeps the aspect ratio), before --pad
grows the canvas; the job records the canvas size, and `prepare_init` brings the picture (and mask) to the size
the job records, so a replay (`verify`), a Ray worker and a server resize it the same way. The hires fix
(--hires-scale, or hires_scale in a config, as for generate) runs a second pass on the img2img result, as for text
to image; not with --mask or --pad."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.runtime import console
from sdcli.runtime.errors import UsageError
from sdcli.control import settings as control_config
from sdcli.jobs import single_job
from sdcli.app import cluster, hires_fix, inpaint, refine, remote, render, resume


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
    dry_run: bool = False  # --dry-run: print the plan (app/dry_run.py), render nothing


def run_img2img(req: Img2ImgRequest) -> None:
    base = cfgmod.resolve(req.flags, req.config_file)  # the hires keys too, from the configs as for generate
    masked = bool(req.mask or base.pad)
    if masked and cfgmod.origin("strength", req.flags, req.config_file) == "default":
        base = dataclasses.replace(base, strength=_inpaint_strength(base))
    if req.server and not base.model and not req.dry_run:  # rendered with the model the server has loaded
        base = remote.with_server_model(req.server, base)
    job = single_job(req.prompt, base)
    refine.check_refiner_use(base, txt2img=False)
    if req.server:
        remote.check_request(req, base)
    render.check_samplers([job], base, lambda key: cfgmod.origin(key, req.flags, req.config_file))
    if base.hires_scale != 1.0 and masked:
        _refuse_hires_with_mask(req, base)
    if not req.dry_run:
        render.check_model_given(base)
    hires_fix.check_upscalers([job])
    from sdcli.formats import images  # imports torch: after the checks that need none
    img, notes = images.load_image(req.image)
    for note in notes:
        console.info(f"{req.image}: {note}")
    mask = _load_mask(req.mask, img) if req.mask else None
    sized = picture_size(img.size, req.flags.get("width"), req.flags.get("height"))
    width, height = inpaint.canvas_size(sized, base.pad)
    job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, width=width, height=height))
    if req.dry_run:
        from sdcli.app import dry_run

        return dry_run.show([job], req, base, init_strength=job.cfg.strength)
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
    setup = functools.partial(prepare_init, job.cfg, img, mask, notes, req.mask)
    if base.ray:
        return cluster.render_on_ray(base.ray, req.workers, base, targets, loras, req, setup)
    models = render.load(base)
    init, _ = setup(models)
    render.render_all(models, targets, init, None, req, loras, nets=control_config.load_nets([job], models))


def _refuse_hires_with_mask(req: Img2ImgRequest, base) -> None:
    """The hires fix re-renders the whole picture: not with inpainting. A hires_scale from a config is named with
    its file, so the user knows what to change (or to give --hires-scale 1)."""
    where = cfgmod.origin("hires_scale", req.flags, req.config_file)
    if where.startswith("option "):
        raise UsageError("--hires-scale re-renders the whole picture larger; it cannot be used with --mask or --pad")
    raise UsageError(f"{where} {base.hires_scale}: the hires fix re-renders the whole picture larger; it cannot be "
                     "used with --mask or --pad (--hires-scale 1 turns it off)")


def picture_size(size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) the input picture is rendered at: its own, or -W/-H (both: stretched to them, as A1111's
    "Just resize"; one: the other side follows the aspect ratio, rounded to a multiple of 8)."""
    if width is None and height is None:
        return size
    if width is None:
        width = max(8, round(size[0] * height / size[1] / 8) * 8)
    if height is None:
        height = max(8, round(size[1] * width / size[0] / 8) * 8)
    return width, height


def fit_picture(cfg, img, mask) -> tuple:
    """(picture, mask, notes): both resized (Lanczos) to the size the job renders before --pad, when it differs."""
    from PIL import Image

    left, top, right, bottom = cfgmod.pad_of(cfg.pad) if cfg.pad else (0, 0, 0, 0)
    size = (cfg.width - left - right, cfg.height - top - bottom) if cfg.width and cfg.height else img.size
    if tuple(img.size) == size:
        return img, mask, []
    note = f"input {img.width}x{img.height} resized to {size[0]}x{size[1]}"
    resized = img.resize(size, Image.Resampling.LANCZOS)
    return resized, None if mask is None else mask.resize(size, Image.Resampling.LANCZOS), [note]


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
    img, mask, resized = fit_picture(base, img, mask)
    notes = [*notes, *resized]
    for note in resized:
        console.info(note)
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
