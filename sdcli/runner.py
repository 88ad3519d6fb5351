"""What each command does, end to end: resolve the config, check every input and output up front, load the model
once, run the pipeline stages, save results atomically with their metadata, report progress on stderr.

Each `run_*` function takes one request object built by `cli.py` and owns no state between calls.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as cfgmod
from . import console
from .config import RunConfig
from .errors import UsageError
from .jobs import Job, read_prompts_file, single_job, with_seed


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


@dataclass(frozen=True)
class Target:
    """One image to render: which job, which seed, where it goes."""

    job: Job
    index: int  # position in the whole run, for {index}
    seed: int
    path: Path


@dataclass
class Init:
    """Where sampling starts for img2img-like runs: a scaled latent and the strength."""

    latent: Any
    strength: float
    notes: list[str] = field(default_factory=list)
    extra: Any = None  # inpainting: the UNet's mask + masked-image channels (pipeline.inpaint_conditioning)
    mask: str | None = None  # inpainting: the mask file, for the metadata


@dataclass(frozen=True)
class Hires:
    """The hires fix's second pass (A1111 "Hires. fix", Latent upscaler): its plan, output size and strength."""

    plan: Any  # pipeline.SamplingPlan with hires_steps (or steps)
    size: tuple[int, int]  # (height, width) of the output, multiples of 8
    strength: float
    conds: tuple | None = None  # (cond, uncond) when prompt editing schedules this pass apart; else pass 1's


# --- generate / img2img --------------------------------------------------------------------------

def run_generate(req: GenerateRequest) -> None:
    if req.cond is not None:
        req = _with_cond_prompt(req)
    replay = _replay(req) if req.from_image else None
    base = cfgmod.resolve(req.flags, req.config_file, replay.values if replay else None)
    if replay is not None and "dtype" not in req.flags:  # a --dtype flag still wins over the image's
        base = _replayed_dtype(base, replay)
    if req.print_config:
        return console.emit_json(base.to_dict()) if req.json_out else print(cfgmod.to_yaml(base), end="")
    if replay is not None and req.prompt is None and not req.prompts_file:
        req = dataclasses.replace(req, prompt=replay.prompt)
    jobs = read_prompts_file(req.prompts_file, base) if req.prompts_file else [single_job(req.prompt, base)]
    if req.prompts_file and req.prompt:
        raise UsageError("give either a PROMPT or --prompts-file, not both")
    _check_samplers(jobs, base, lambda key: cfgmod.origin(key, req.flags, req.config_file, replay))
    if req.dry_run:
        return _dry_run(jobs)
    if req.latent_in and base.hires_scale != 1.0:
        raise UsageError("--hires-scale upscales a text-to-image render; it cannot be used with --latent-in")
    targets = plan_targets(jobs, req.overwrite)
    loras = _job_loras(jobs, req.loras)
    init_file = _init_latent_file(req.latent_in, jobs) if req.latent_in else None  # checked before the load
    models = _load(base)
    _check_inpaint_model(models, base, None)  # text-to-image has no image and mask for a 9-channel UNet
    init = _latent_init(req.latent_in, init_file, base, models) if init_file else None
    cond = _load_cond(req.cond, models) if req.cond else None
    _render_all(models, targets, init, cond, req, loras)


def run_img2img(req: Img2ImgRequest) -> None:
    from . import images, pipeline

    base = cfgmod.resolve(req.flags, req.config_file)
    if req.mask and cfgmod.origin("strength", req.flags, req.config_file) == "default":
        base = dataclasses.replace(base, strength=1.0)  # inpainting repaints from pure noise unless told otherwise
    job = single_job(req.prompt, base)
    _check_samplers([job], base, lambda key: cfgmod.origin(key, req.flags, req.config_file))
    img, notes = images.load_image(req.image)
    for note in notes:
        console.info(f"{req.image}: {note}")
    mask = _load_mask(req.mask, img) if req.mask else None
    job = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, width=img.width, height=img.height))
    targets = plan_targets([job], req.overwrite)
    loras = _job_loras([job], req.loras)
    models = _load(base)
    _check_inpaint_model(models, base, req.mask)
    pixels = images.pil_to_tensor(img)
    latent = pipeline.encode_image(models, pixels)
    extra = pipeline.inpaint_conditioning(models, pixels, mask) if mask is not None else None
    _render_all(models, targets, Init(latent, base.strength, notes, extra, req.mask), None, req, loras)


def _load_mask(path: str, img):
    from . import images

    mask, notes = images.load_mask(path, img.size)
    for note in notes:
        console.info(f"{path}: {note}")
    return mask


def _check_inpaint_model(models, cfg: RunConfig, mask: str | None) -> None:
    """A 9-channel inpainting UNet cannot run without a mask, and a 4-channel one has no input for it."""
    if models.info.inpaint and not mask:
        raise UsageError(f"{cfg.model} is an inpainting model (9-channel UNet): use "
                         "`sdcli img2img PROMPT -i IMAGE --mask MASK.png` (white = repaint)")
    if mask and not models.info.inpaint:
        raise UsageError(f"--mask needs an inpainting model (9-channel UNet, e.g. SD1.5-inpainting); "
                         f"{cfg.model} is not one")


def plan_targets(jobs: list[Job], overwrite: bool) -> list[Target]:
    """Every output path, decided and checked before any work: no duplicates, no clobbering, '-' only alone."""
    from .outputs import STDOUT, expand_template

    targets, seen, index = [], set(), 0
    for job in jobs:
        for k in range(job.cfg.n):
            seed = job.cfg.seed + k
            path = Path(STDOUT) if job.cfg.output == STDOUT else expand_template(job.cfg.output, index, seed, job.prompt)
            targets.append(Target(job, index, seed, path))
            index += 1
    for t in targets:
        _check_target(t, len(targets), seen, overwrite)
    return targets


def _check_target(t: Target, total: int, seen: set, overwrite: bool) -> None:
    from .outputs import STDOUT, check_target

    if str(t.path) == STDOUT:
        if total > 1:
            raise UsageError(f"-o - writes one PNG to stdout, but this run makes {total} images; use a template")
        return
    if t.path in seen:
        raise UsageError(f"two images would be written to {t.path}: add {{index}} or {{seed}} to the -o template")
    seen.add(t.path)
    check_target(t.path, overwrite)


def _check_samplers(jobs: list[Job], base: RunConfig | None = None, origin=None) -> None:
    """Fail on a bad sampler/schedule/sigma list before the model is loaded, naming where the value came from."""
    from . import samplers, schedule
    from .pipeline import resolve_sampler_schedule

    for job in jobs:
        if job.cfg.sampler == "help":
            print(samplers.sampler_help())  # asked-for data: stdout
            raise SystemExit(0)
        try:
            _name, schedule_used = resolve_sampler_schedule(job.cfg.sampler, job.cfg.schedule)
        except UsageError as e:
            raise _located(e, job, "sampler", base, origin) from None
        if job.cfg.sigmas:
            try:
                schedule.parse_sigmas(job.cfg.sigmas)
            except UsageError as e:
                raise _located(e, job, "sigmas", base, origin) from None
        elif schedule_used not in schedule.SCHEDULES:
            known = ", ".join(schedule.SCHEDULES)
            e = UsageError(f"unknown schedule '{job.cfg.schedule}' (known: {known})")
            raise _located(e, job, "schedule", base, origin)


def _located(e: Exception, job: Job, key: str, base: RunConfig | None, origin) -> Exception:
    """The error prefixed with the file:line or option that set `key`: a value from a file is bad input (exit 3),
    one from a flag a usage error (exit 2)."""
    from .errors import BadInputError

    if job.source != "command line" and (base is None or getattr(job.cfg, key) != getattr(base, key)):
        return BadInputError(f"{job.source}: '{key}': {e}")  # set by this line of the prompts file
    where = origin(key) if origin is not None else "command line"
    if where.startswith("option "):
        return UsageError(f"{where}: {e}")
    return BadInputError(f"{where}: {e}") if where != "default" else e


def _render_all(models, targets: list[Target], init: Init | None, cond, req, loras: dict[int, list]) -> None:
    """Every job's images, each job with its LoRA set (`loras`: id(job) -> specs, from _job_loras)."""
    started = time.perf_counter()
    by_job: dict[int, list[Target]] = {}
    for t in targets:
        by_job.setdefault(id(t.job), []).append(t)
    switching = len({tuple((s.path.resolve(), s.weight) for s in specs) for specs in loras.values()}) > 1
    for key, group in by_job.items():
        _use_loras(models, loras[key], keep_originals=switching)
        _render_job(models, group, init, cond, req)
    took = time.perf_counter() - started
    console.info(f"done: {len(targets)} image{'s' if len(targets) != 1 else ''} in {took:.1f} s")


@dataclass(frozen=True)
class Prepared:
    """What every batch of one job shares: the sampling plan, the conditioning, the size, the hires pass."""

    plan: Any
    cond: Any
    uncond: Any
    size: tuple[int, int]  # (H, W) of the first pass
    hires: Hires | None


def _prepare(models, cfg: RunConfig, prompt: str, init: Init | None = None, cond_override=None) -> Prepared:
    from . import pipeline

    from .prompts import split_extra_networks

    plan = pipeline.make_plan(cfg.sampler, cfg.schedule, cfg.steps, cfg.sigmas, cfg.cfg, cfg.guidance_rescale)
    text = split_extra_networks(prompt)[0]  # the <lora:...> tags were merged into the weights; not words
    if cond_override is not None:  # the embedding file is the prompt: one conditioning, nothing to schedule
        cond, uncond = _match_chunks(cond_override, pipeline.encode_text(models, text, cfg.negative, cfg.clip_skip)[1])
    else:
        encoded: dict = {}  # shared with the hires pass: a plain prompt is encoded once, not twice
        cond, uncond = pipeline.encode_scheduled(models, text, cfg.negative, cfg.steps, cfg.clip_skip, None, encoded)
    width, height = _size(cfg, models, init)
    hires = _hires(cfg, (height, width)) if init is None else None
    if hires is not None and cond_override is None:
        conds = pipeline.encode_scheduled(models, text, cfg.negative, cfg.steps, cfg.clip_skip,
                                          hires_steps=cfg.hires_steps or cfg.steps, encoded=encoded)
        hires = dataclasses.replace(hires, conds=conds)
    return Prepared(plan, cond, uncond, (height, width), hires)


def _render_job(models, targets: list[Target], init: Init | None, cond_override, req) -> None:
    from . import pipeline

    cfg = targets[0].job.cfg
    p = _prepare(models, cfg, targets[0].job.prompt, init, cond_override)
    with pipeline.seamless(models, cfg.seamless):
        for start in range(0, len(targets), cfg.batch_size):
            batch = targets[start:start + cfg.batch_size]
            _render_batch(models, p.plan, p.cond, p.uncond, batch, p.size, init, req, p.hires)


def _hires(cfg: RunConfig, size: tuple[int, int]) -> Hires | None:
    """The second pass when hires_scale asks for one; says the output size (rounded to a multiple of 8)."""
    from . import pipeline

    if cfg.hires_scale == 1.0:
        return None
    plan = pipeline.make_plan(cfg.sampler, cfg.schedule, cfg.hires_steps or cfg.steps, cfg.sigmas, cfg.cfg,
                              cfg.guidance_rescale)
    out = pipeline.hires_size(*size, cfg.hires_scale)
    exact = (size[1] * cfg.hires_scale, size[0] * cfg.hires_scale)
    rounded = " (rounded to a multiple of 8)" if exact != (out[1], out[0]) else ""
    console.info(f"hires fix: {size[1]}x{size[0]} -> {out[1]}x{out[0]}{rounded}, "
                 f"strength {cfg.hires_strength}, {cfg.hires_steps or cfg.steps} steps")
    return Hires(plan, out, cfg.hires_strength)


def txt2img_passes(models, plan, cond, uncond, seeds: list[int], size: tuple[int, int], hires: Hires | None,
                   callback=None, extra=None):
    """Pass 1 at `size` (H, W), then the hires fix's pass 2 when asked. Both draw from the same per-image
    generators, pass 2 continuing their state, so image k of a batch still equals a single run with seed+k."""
    from . import pipeline

    gens = pipeline.generators(seeds)
    latents = pipeline.txt2img(models, plan, cond, uncond, gens, *size, callback=callback, extra=extra)
    if hires is None:
        return latents
    cond, uncond = hires.conds or (cond, uncond)
    return pipeline.hires_fix(models, hires.plan, latents, cond, uncond, gens, hires.strength, hires.size, callback)


def _render_batch(models, plan, cond, uncond, batch: list[Target], size, init: Init | None, req,
                  hires: Hires | None = None) -> None:
    from . import pipeline

    seeds = [t.seed for t in batch]
    t0 = time.perf_counter()
    with _progress(batch, len(plan.sigmas) - 1 if init is None else None, req.progress) as progress:
        step = _with_preview(progress, req.preview)
        if init is None or (init.extra is not None and init.strength >= 1.0):  # inpainting at 1: pure noise
            extra = None if init is None else init.extra
            latents = txt2img_passes(models, plan, cond, uncond, seeds, size, hires, callback=step, extra=extra)
        else:
            latents = pipeline.img2img(models, plan, init.latent, cond, uncond, seeds, init.strength, callback=step,
                                       extra=init.extra)
    t1 = time.perf_counter()
    decoded = pipeline.decode_latents(models, latents)
    t2 = time.perf_counter()
    timings = {"sample_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3)}
    for k, target in enumerate(batch):
        _save_one(models, target, decoded.images[k], latents[k:k + 1], decoded.fallbacks, size, init, timings, req,
                  hires)


def _with_preview(progress, preview: str | None):
    """The sampler callback: progress, and the live preview when asked for (either may be absent)."""
    from .preview import PreviewWriter

    callbacks = [c for c in (progress, PreviewWriter(preview) if preview else None) if c is not None]
    if len(callbacks) < 2:
        return callbacks[0] if callbacks else None
    return lambda *args: [c(*args) for c in callbacks]


def _save_one(models, target: Target, image, latent, fallbacks, size, init, timings, req,
              hires: Hires | None = None) -> None:
    from . import images
    from .outputs import save_png

    # `size` is the first pass's: A1111 writes it as Size, and the config records the width/height asked for.
    meta = _metadata(models, target, size, fallbacks, init, hires)
    path = save_png(images.tensor_to_pil(image), target.path, _infotext(models, target, size, init, hires), meta,
                    overwrite=req.overwrite)
    if getattr(req, "latent_out", None):
        _save_latent_out(models, req, target, latent, hires.size if hires else size)
    if req.json_out:
        console.emit_json({"path": str(path), "index": target.index, "seed": target.seed,
                           "prompt": target.job.prompt, "timings": timings, "fallbacks": fallbacks})
    elif str(path) != "-":
        console.info(f"saved {path} (seed {target.seed})")


def _save_latent_out(models, req, target: Target, latent, size) -> None:
    from . import latents
    from .outputs import expand_template

    path = expand_template(req.latent_out, target.index, target.seed, target.job.prompt)
    latents.save_latent(path, latent, scaled=True, scale_factor=_scale(models), family=models.info.family,
                        source_size=(size[1], size[0]), model_hash=_model_hash(models), overwrite=req.overwrite)


def _size(cfg: RunConfig, models, init: Init | None) -> tuple[int, int]:
    """(width, height): given, else the model's native size (768 for SD2 v-prediction, else 512)."""
    if init is not None:
        _, _, h, w = init.latent.shape
        return w * 8, h * 8
    native = 768 if models.info.family == "sd2" and models.info.prediction == "v" else 512
    return cfg.width or native, cfg.height or native


def _match_chunks(cond, uncond):
    """An embedding file may hold more 77-token chunks than the negative prompt: pad uncond by repeating its last
    chunk (the empty-prompt padding A1111 uses), or the reverse."""
    import torch

    def grow(x, tokens):
        reps = (tokens - x.shape[1]) // 77
        return torch.cat([x] + [x[:, -77:]] * reps, dim=1) if reps > 0 else x

    n = max(cond.shape[1], uncond.shape[1])
    return grow(cond.to(uncond), n), grow(uncond, n)


# --- metadata ------------------------------------------------------------------------------------

def _infotext(models, target: Target, size, init: Init | None, hires: Hires | None = None) -> str:
    from . import __version__
    from .metadata import format_infotext

    cfg = target.job.cfg
    sampler, schedule = _sampler_schedule(cfg)
    params = {"prompt": target.job.prompt, "negative_prompt": cfg.negative, "steps": cfg.steps,
              "sampler": sampler, "schedule": schedule, "cfg_scale": cfg.cfg, "seed": target.seed,
              "size": f"{size[1]}x{size[0]}", "model_hash": (_model_hash(models) or "")[:10],
              "model": models.name, "version": f"sdcli {__version__}"}
    if cfg.clip_skip > 1:
        params["clip_skip"] = cfg.clip_skip
    if init is not None:
        params["denoising_strength"] = init.strength
    if hires is not None:  # as A1111 writes a hires fix render; Hires steps only when set
        params["denoising_strength"] = cfg.hires_strength
        params["extra"] = {"Hires upscale": cfg.hires_scale, "Hires steps": cfg.hires_steps,
                           "Hires upscaler": "Latent"}  # format_infotext drops the None
    loras = getattr(models, "loras", None)
    if loras:  # A1111's field: "name: shorthash" per LoRA (A1111 also puts <lora:name:w> in the prompt)
        params["extra"] = {**params.get("extra", {}),
                           "Lora hashes": ", ".join(f"{r.name}: {r.short_hash}" for r in loras)}
    return format_infotext(params)


def _metadata(models, target: Target, size, fallbacks, init: Init | None, hires: Hires | None = None) -> dict:
    import torch

    from . import __version__

    job_cfg = target.job.cfg
    sampler, schedule = _sampler_schedule(job_cfg)
    cfg = dataclasses.replace(job_cfg, seed=target.seed, width=size[1], height=size[0], n=1, sampler=sampler,
                              schedule=schedule, prediction=models.info.prediction,
                              device=models.placement.device, dtype=models.placement.dtype_name)
    recorded = cfg.to_dict()
    # Images get shared: record file names, not the user's folders, and not where this copy was written.
    for key in ("model", "vae"):
        recorded[key] = Path(recorded[key]).name if recorded[key] else recorded[key]
    del recorded["output"], recorded["lora_dir"]
    meta = {
        "sdcli_version": __version__, "torch_version": torch.__version__,
        "prompt": target.job.prompt, "seed": target.seed, "mode": _mode(init),
        "config": recorded,
        "model": {"name": models.name, "sha256": _model_hash(models), "family": models.info.family,
                  "prediction": models.info.prediction},
        "device": models.placement.device, "dtype": models.placement.dtype_name,
        "fallbacks": fallbacks, "notes": init.notes if init else [],
    }
    if init is not None and init.mask:
        meta["mask"] = Path(init.mask).name  # a file name, as for the model: not the user's folders
    if hires is not None:
        meta["hires_size"] = {"width": hires.size[1], "height": hires.size[0]}  # the output's size
    if getattr(models, "loras", None):
        meta["loras"] = [{"name": r.path.name, "sha256": r.sha256, "weight": r.weight, "applied": r.applied,
                          "modules": r.total} for r in models.loras]
    return meta


def _mode(init: Init | None) -> str:
    if init is None:
        return "txt2img"
    return "inpaint" if init.extra is not None else "img2img"


def _sampler_schedule(cfg: RunConfig) -> tuple[str, str]:
    """The canonical sampler and the schedule actually used ('auto' resolved; 'custom' for --sigmas)."""
    from .pipeline import resolve_sampler_schedule

    sampler, schedule = resolve_sampler_schedule(cfg.sampler, cfg.schedule)
    return sampler, "custom" if cfg.sigmas else schedule


def _model_hash(models) -> str | None:
    from .checkpoint import file_sha256

    source = Path(models.source)
    return file_sha256(source) if source.is_file() else None


def _scale(models) -> float:
    from .pipeline import scale_factor

    return scale_factor(models)


# --- loading -------------------------------------------------------------------------------------

def _load(cfg: RunConfig):
    from . import checkpoint, device

    if not cfg.model:
        raise UsageError("no model given: pass --model FILE.safetensors | FOLDER | HUB_ID, or set 'model:' in a config")
    placement = device.choose(cfg.device, cfg.dtype)
    device.configure(placement)
    prediction = None if cfg.prediction == "auto" else cfg.prediction
    console.info(f"loading {cfg.model} ({placement.device}, {placement.dtype_name})")
    models = checkpoint.load_models(cfg.model, cfg.vae, placement.dtype, placement.device, prediction)
    models.placement = placement
    return models


def _lora_specs(specs: list[str], prompt: str = "", lora_dir: str | None = None) -> list:
    """The --lora files, then the prompt's <lora:NAME:WEIGHT> tags, each parsed and sniffed: called before the
    (slow) model load too, so a bad or missing file fails fast."""
    from .lora import check_file, parse_spec, resolve_prompt_lora
    from .prompts import split_extra_networks

    parsed = [parse_spec(s) for s in specs]
    parsed += [resolve_prompt_lora(t.name, t.weight, lora_dir) for t in split_extra_networks(prompt)[1]]
    for spec in parsed:
        check_file(spec)
    return parsed


def _job_loras(jobs: list[Job], flags: list[str]) -> dict[int, list]:
    """id(job) -> its LoRAs (--lora, then the prompt's tags), resolved and sniffed once, before the model load."""
    return {id(job): _lora_specs(flags, job.prompt, job.cfg.lora_dir) for job in jobs}


def _use_loras(models, specs: list, keep_originals: bool = False) -> None:
    """Make `specs` the merged LoRAs. Jobs that switch sets need the weights as loaded kept (keep_originals from
    the first merge on); jobs that share one set merge it once."""
    from .lora import apply_loras, restore

    key = [(s.path.resolve(), s.weight) for s in specs]
    if key == getattr(models, "lora_key", []):
        return
    if getattr(models, "lora_key", []):
        if not getattr(models, "lora_originals", None):
            raise RuntimeError("LoRA switch without the original weights kept")  # a bug, not bad input
        restore(models)
    models.loras = apply_loras(models, specs, keep_originals)
    models.lora_key = key
    for report in models.loras:
        console.info(report.message())


def _init_latent_file(path: Path, jobs: list[Job]):
    from . import latents

    return latents.load_init_latent(path, [(job.cfg.n, job.cfg.batch_size) for job in jobs])


def _latent_init(path: Path, lf, cfg: RunConfig, models) -> Init:
    return Init(lf.unet_space(_scale(models)), cfg.strength, [f"started from latent file {path}"])


def _replay(req: GenerateRequest):
    from .replay import from_image

    replay = from_image(req.from_image)
    if replay.mode != "txt2img":
        console.info(f"{req.from_image}: made by {replay.mode}; replaying its settings as text-to-image")
    return replay


def _replayed_dtype(cfg: RunConfig, replay) -> RunConfig:
    """The image's dtype when it runs well on the device at hand, else `auto`'s pick, said on stderr."""
    from . import device

    dtype, note = device.replay_dtype(replay.recorded.get("dtype"), device.choose(cfg.device, "fp32").device)
    if note:
        console.info(note)
    return cfg if dtype == "auto" else dataclasses.replace(cfg, dtype=dtype)


def _with_cond_prompt(req: GenerateRequest) -> GenerateRequest:
    """With --cond the embedding is the prompt: record the text it was made from. A PROMPT given as well would
    be written into the image's metadata without having conditioned it, so that is refused."""
    from . import latents

    if req.prompt is not None or req.prompts_file:
        raise UsageError("--cond replaces the prompt: give it without a PROMPT or --prompts-file")
    return dataclasses.replace(req, prompt=latents.load_embedding(req.cond).prompt)


def _load_cond(path: Path, models):
    from . import latents
    from .errors import BadInputError

    emb = latents.load_embedding(path)
    width = models.text_encoder.hidden_size
    if emb.cond.shape[-1] != width:
        raise BadInputError(f"{path}: embedding width {emb.cond.shape[-1]} does not fit this model's text width {width}")
    return emb.cond


# --- dry run and progress ------------------------------------------------------------------------

def _dry_run(jobs: list[Job]) -> None:
    """Print the plan as JSON lines on stdout: resolved config, sigmas and token chunks. Loads no model."""
    from .pipeline import make_plan
    from .prompt_schedule import prompt_schedule
    from .prompts import describe_prompt, split_extra_networks
    from .tokenizer import get_tokenizer

    for job in jobs:
        plan = make_plan(job.cfg.sampler, job.cfg.schedule, job.cfg.steps, job.cfg.sigmas)
        sigmas = plan.sigmas
        text, tags = split_extra_networks(job.prompt)
        schedule = prompt_schedule(text, job.cfg.steps)
        console.emit_json({"source": job.source, "prompt": job.prompt, "sampler": plan.sampler,
                           "config": job.cfg.to_dict(), "sigmas": [round(float(s), 5) for s in sigmas],
                           "prompt_loras": [{"name": t.name, "weight": t.weight} for t in tags],
                           "prompt_schedule": [{"until_step": end, "text": t} for end, t in schedule],
                           "tokens": describe_prompt(schedule[-1][1], get_tokenizer(), 49407)})


class _progress:
    """Progress of one batch on stderr: a rich bar (on a terminal), or with mode "json" one JSON line per step
    ({"event": "step", "seeds", "step", "total", "elapsed_s"}) for programs that drive sdcli. The callback it
    yields advances it by one step."""

    def __init__(self, batch: list[Target], total: int | None, mode: str = "auto"):
        self.seeds = [t.seed for t in batch]
        self.label = f"seed {batch[0].seed}" + (f"..{batch[-1].seed}" if len(batch) > 1 else "")
        self.total, self.mode = total, mode
        self.bar = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if self.mode == "json":
            return self.event
        if self.mode == "none" or console.is_quiet() or not console.stderr().is_terminal:  # bars need a terminal
            return None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console.stderr(), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")
        self.t0 = time.perf_counter()
        return self.step

    def event(self, i, total, _x, _denoised) -> None:
        console.emit_event({"event": "step", "seeds": self.seeds, "step": i + 1, "total": total,
                            "elapsed_s": round(time.perf_counter() - self.t0, 3)})

    def step(self, i, total, _x, _denoised) -> None:
        rate = (i + 1) / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=i + 1, total=total, rate=f"{rate:.2f} it/s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- encode / decode -----------------------------------------------------------------------------

def run_encode(req: EncodeRequest) -> None:
    from . import images, latents, pipeline

    if (req.image is None) == (req.text is None):
        raise UsageError("give either an IMAGE to VAE-encode or --text PROMPT to CLIP-encode")
    if not req.output:
        raise UsageError("give the output file with -o")
    cfg = cfgmod.resolve(req.flags, req.config_file)
    _refuse_existing(Path(req.output), req.overwrite)
    if req.text is not None:
        from .prompts import split_extra_networks

        from .errors import UnsupportedModelError
        from .prompt_schedule import prompt_schedule

        if len(prompt_schedule(split_extra_networks(req.text)[0], cfg.steps)) > 1:
            raise UnsupportedModelError("the prompt edits itself during sampling ([from:to:when] or [a|b]); an "
                                        "embedding file holds one conditioning: give the prompt to generate")
        specs = _lora_specs([], req.text, cfg.lora_dir)  # a <lora:...> tag changes the text encoder's weights
        models = _load(cfg)
        _use_loras(models, specs)
        cond, _ = pipeline.encode_text(models, split_extra_networks(req.text)[0], "", cfg.clip_skip)
        path = latents.save_embedding(req.output, cond, prompt=req.text, family=models.info.family,
                                      clip_skip=cfg.clip_skip, model_hash=_model_hash(models), overwrite=req.overwrite)
        return _report(req, {"path": str(path), "kind": "embedding", "shape": list(cond.shape)})
    img, notes = images.load_image(req.image)
    for note in notes:
        console.info(f"{req.image}: {note}")
    models = _load(cfg)
    latent = pipeline.encode_image(models, images.pil_to_tensor(img))
    path = latents.save_latent(req.output, latent, scaled=True, scale_factor=_scale(models), family=models.info.family,
                               source_size=(img.width, img.height), model_hash=_model_hash(models),
                               overwrite=req.overwrite)
    _report(req, {"path": str(path), "kind": "latent", "shape": list(latent.shape)})


def run_decode(req: DecodeRequest) -> None:
    from . import images, latents, pipeline
    from .outputs import STDOUT, expand_template, save_png

    cfg = cfgmod.resolve(req.flags, req.config_file)
    lf = latents.load_latent(req.latent)  # checked before the model is loaded
    n = lf.latent.shape[0]
    paths = [Path(STDOUT) if cfg.output == STDOUT else expand_template(cfg.output, k, k, req.latent.stem)
             for k in range(n)]
    if len(set(paths)) != n:
        raise UsageError(f"{req.latent} holds {n} latents: give -o a template with {{index}}")
    for p in paths:
        _refuse_existing(p, req.overwrite)
    models = _load(cfg)
    decoded = pipeline.decode_latents(models, lf.unet_space(_scale(models)))
    for k, p in enumerate(paths):
        meta = {"sdcli_version": _version(), "mode": "decode", "source": str(req.latent), "fallbacks": decoded.fallbacks}
        saved = save_png(images.tensor_to_pil(decoded.images[k]), p, "", meta, overwrite=req.overwrite)
        _report(req, {"path": str(saved), "index": k, "fallbacks": decoded.fallbacks})


def _refuse_existing(path: Path, overwrite: bool) -> None:
    from .outputs import check_target

    check_target(path, overwrite)


def _report(req, obj: dict) -> None:
    if req.json_out:
        console.emit_json(obj)
    elif obj.get("path") != "-":
        console.info(f"saved {obj['path']}")


def _version() -> str:
    from . import __version__

    return __version__




def run_convert(source: Path, output: Path, overwrite: bool) -> None:
    from .checkpoint import convert_ckpt
    from .errors import OutputError

    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: the output of convert must be a .safetensors file")
    _refuse_existing(output, overwrite)
    try:
        saved = convert_ckpt(source, output)
    except OSError as e:
        raise OutputError(f"{output}: cannot write ({e.strerror or e})") from None
    console.info(f"saved {saved}")


# --- verify --------------------------------------------------------------------------------------

def run_verify(image: Path, flags: dict, config_file: Path | None, min_psnr: float, json_out: bool,
               loras: list[str] | None = None) -> None:
    """Re-render an sdcli image from its recorded settings (dtype included) and compare the pixels. LoRAs are
    files of the user's, like the model: they are given again with --lora, and checked against the record."""
    from . import images, pipeline
    from .errors import VerificationError
    from .replay import from_image

    replay = from_image(image)
    if replay.source != "sdcli" or replay.mode != "txt2img":
        raise UsageError(f"{image}: verify re-renders text-to-image PNGs written by sdcli (this is {replay.source} "
                         f"{replay.mode}); use `generate --from-image` to replay other images")
    recorded_dtype = replay.recorded.get("dtype")
    flags = {"dtype": recorded_dtype, **flags} if recorded_dtype else flags
    cfg = cfgmod.resolve(flags, config_file, replay.values)
    _check_samplers([single_job(replay.prompt, cfg)], cfg, lambda key: cfgmod.origin(key, flags, config_file, replay))
    specs = _lora_specs(loras or [], replay.prompt, cfg.lora_dir)
    recorded_loras = [entry.get("name", "?") for entry in replay.recorded.get("loras", [])]
    missing = [name for name in recorded_loras if name not in {s.path.name for s in specs}]
    if missing:
        raise UsageError(f"{image} was made with LoRA {', '.join(missing)}: give them again with "
                         "--lora FILE[:WEIGHT]")
    models = _load(cfg)
    _check_inpaint_model(models, cfg, None)
    _use_loras(models, specs)
    p = _prepare(models, cfg, replay.prompt)
    with pipeline.seamless(models, cfg.seamless):
        latents = txt2img_passes(models, p.plan, p.cond, p.uncond, [cfg.seed], p.size, p.hires)
        again = images.tensor_to_pil(pipeline.decode_latents(models, latents).images[0])
    report = compare_images(images.load_image(image)[0], again)
    recorded_hash = (replay.recorded.get("model") or {}).get("sha256")
    report.update(path=str(image), min_psnr=min_psnr, passed=report["psnr"] >= min_psnr,
                  same_model=None if recorded_hash is None else recorded_hash == _model_hash(models))
    _report_verify(report, json_out)
    if not report["passed"]:
        raise VerificationError(f"{image}: re-render drifted: PSNR {report['psnr']:.2f} dB < {min_psnr} dB "
                                f"(max difference {report['max_diff']} levels)")


def compare_images(a, b) -> dict:
    """PSNR (dB, inf when identical) and the largest per-channel difference in 8-bit levels."""
    import math

    import torch

    if a.size != b.size:
        return {"psnr": 0.0, "max_diff": 255, "identical": False, "note": f"sizes differ: {a.size} vs {b.size}"}
    x = torch.frombuffer(bytearray(a.tobytes()), dtype=torch.uint8).float()
    y = torch.frombuffer(bytearray(b.tobytes()), dtype=torch.uint8).float()
    mse = torch.mean((x - y) ** 2).item()
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {"psnr": psnr, "max_diff": int((x - y).abs().max().item()), "identical": mse == 0}


def _report_verify(report: dict, json_out: bool) -> None:
    if json_out:
        shown = {**report, "psnr": None if report["psnr"] == float("inf") else round(report["psnr"], 3)}
        return console.emit_json(shown)
    verdict = "identical" if report["identical"] else f"PSNR {report['psnr']:.2f} dB, max diff {report['max_diff']}"
    if report.get("same_model") is False:
        verdict += "; note: not the checkpoint the image was made with (sha256 differs)"
    console.info(f"{report['path']}: {'ok' if report['passed'] else 'DRIFT'} ({verdict})")
