"""Rendering shared by the commands: every output decided and checked up front, the model loaded once, each job's
LoRAs merged (lora.LoraState), the conditioning built (conditioning.Cond), the passes run batch by batch, each
image saved through save.py.

Reproducibility: image k of a batch equals a single run with seed+k (see pipeline.py); the hires fix's second pass
continues the same per-image generators.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import console
from ..config import RunConfig
from ..errors import BadInputError, UsageError
from ..jobs import Job
from . import save
from .progress import Progress


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
    concat: Any = None  # inpainting: the UNet's mask + masked-image channels (pipeline.inpaint_conditioning)
    mask: str | None = None  # inpainting: the mask file, for the metadata


@dataclass(frozen=True)
class Hires:
    """The hires fix's second pass (A1111 "Hires. fix", Latent upscaler): its plan, output size and strength."""

    plan: Any  # pipeline.SamplingPlan with hires_steps (or steps)
    size: tuple[int, int]  # (height, width) of the output, multiples of 8
    strength: float
    conds: tuple | None = None  # (cond, uncond) when prompt editing schedules this pass apart; else pass 1's


@dataclass(frozen=True)
class Refiner:
    """SDXL's refiner taking over the sampling at the switch: its models, its part of the plan, its conditioning
    (its own text encoder and size vector)."""

    models: Any
    plan: Any  # pipeline.SamplingPlan: the sigmas from the switch on
    cond: Any
    uncond: Any
    steps_before: int  # steps the base model ran, for the progress count


@dataclass(frozen=True)
class Prepared:
    """What every batch of one job shares: the sampling plan, the conditioning, the size, the hires pass."""

    plan: Any
    cond: Any  # conditioning.Cond, or a prompt-editing schedule of them
    uncond: Any
    size: tuple[int, int]  # (H, W) of the first pass
    hires: Hires | None
    refiner: Refiner | None = None


# --- before any work -----------------------------------------------------------------------------

def plan_targets(jobs: list[Job], overwrite: bool) -> list[Target]:
    """Every output path, decided and checked before any work: no duplicates, no clobbering, '-' only alone."""
    from ..outputs import STDOUT, expand_template

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
    from ..outputs import STDOUT, check_target

    if str(t.path) == STDOUT:
        if total > 1:
            raise UsageError(f"-o - writes one PNG to stdout, but this run makes {total} images; use a template")
        return
    if t.path in seen:
        raise UsageError(f"two images would be written to {t.path}: add {{index}} or {{seed}} to the -o template")
    seen.add(t.path)
    check_target(t.path, overwrite)


def check_samplers(jobs: list[Job], base: RunConfig | None = None, origin=None) -> None:
    """Fail on a bad sampler/schedule/sigma list before the model is loaded, naming where the value came from."""
    from .. import samplers, schedule
    from ..pipeline import resolve_sampler_schedule

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
    if job.source != "command line" and (base is None or getattr(job.cfg, key) != getattr(base, key)):
        return BadInputError(f"{job.source}: '{key}': {e}")  # set by this line of the prompts file
    where = origin(key) if origin is not None else "command line"
    if where.startswith("option "):
        return UsageError(f"{where}: {e}")
    return BadInputError(f"{where}: {e}") if where != "default" else e


def lora_specs(flags: list[str], job: Job) -> list:
    """The --lora files, then the job's <lora:NAME:WEIGHT> tags, each parsed and sniffed: called before the
    (slow) model load, so a bad or missing file fails fast."""
    from ..lora import check_file, parse_spec, resolve_prompt_lora

    parsed = [parse_spec(s) for s in flags]
    parsed += [resolve_prompt_lora(t.name, t.weight, job.cfg.lora_dir) for t in job.loras]
    for spec in parsed:
        check_file(spec)
    return parsed


def job_loras(jobs: list[Job], flags: list[str]) -> dict[int, list]:
    """id(job) -> its LoRAs (--lora, then the prompt's tags), resolved and sniffed once, before the model load."""
    return {id(job): lora_specs(flags, job) for job in jobs}


def load(cfg: RunConfig):
    from .. import checkpoint, device

    if not cfg.model:
        raise UsageError("no model given: pass --model FILE.safetensors | FOLDER | HUB_ID, or set 'model:' in a config")
    placement = device.choose(cfg.device, cfg.dtype)
    device.configure(placement)
    prediction = None if cfg.prediction == "auto" else cfg.prediction
    console.info(f"loading {cfg.model} ({placement.device}, {placement.dtype_name})")
    return checkpoint.load_models(cfg.model, cfg.vae, placement.dtype, placement.device, prediction, placement)


def load_refiner(cfg: RunConfig, models):
    """The --refiner checkpoint, loaded once beside the base model, or None. Its latent space must be the base's:
    it continues the base's latents. Its VAE (or --vae) decodes what it finished, as in A1111 (the refiner is then
    the loaded model) and diffusers' ensemble."""
    from .. import checkpoint

    if not cfg.refiner:
        return None
    console.info(f"loading refiner {cfg.refiner}")
    placement = models.placement
    refiner = checkpoint.load_models(cfg.refiner, cfg.vae, placement.dtype, placement.device, None, placement)
    if refiner.family.latent != models.family.latent or refiner.info.inpaint:
        raise UsageError(f"--refiner {cfg.refiner} ({refiner.family.title}) cannot continue the latents of "
                         f"{cfg.model} ({models.family.title}): another latent space or an inpainting model")
    return refiner


def check_refiner_use(cfg: RunConfig, txt2img: bool) -> None:
    """The refiner continues a text-to-image first pass; other passes are refused before any load."""
    if cfg.refiner and not txt2img:
        raise UsageError("--refiner continues a text-to-image render: not with img2img, --latent-in or --cond")
    if cfg.refiner and (cfg.hires_scale != 1.0 or cfg.seamless):
        raise UsageError("--refiner with --hires-scale or --seamless is not supported yet: use one of them")


def check_inpaint_model(models, cfg: RunConfig, mask: str | None) -> None:
    """An inpainting UNet cannot run without a mask, and a plain one has no input for it."""
    if models.info.inpaint and not mask:
        raise UsageError(f"{cfg.model} is an inpainting model (9-channel UNet): use "
                         "`sdcli img2img PROMPT -i IMAGE --mask MASK.png` (white = repaint)")
    if mask and not models.info.inpaint:
        raise UsageError(f"--mask needs an inpainting model (9-channel UNet, e.g. SD1.5-inpainting); "
                         f"{cfg.model} is not one")


def use_loras(state, specs: list) -> None:
    """Make `specs` the merged LoRAs of `state` (lora.LoraState), saying what a new merge did."""
    for report in state.use(specs):
        console.info(report.message())


# --- rendering -----------------------------------------------------------------------------------

def render_all(models, targets: list[Target], init: Init | None, cond, req, loras: dict[int, list],
               refiner=None) -> None:  # fmt: skip
    """Every job's images, each job with its LoRA set (`loras`: id(job) -> specs, from job_loras); `refiner`:
    load_refiner's models, or None."""
    from ..lora import LoraState

    started = time.perf_counter()
    by_job: dict[int, list[Target]] = {}
    for t in targets:
        by_job.setdefault(id(t.job), []).append(t)
    switching = len({tuple((s.path.resolve(), s.weight) for s in specs) for specs in loras.values()}) > 1
    state = LoraState(models, keep_originals=switching)
    for key, group in by_job.items():
        use_loras(state, loras[key])
        _render_job(models, group, init, cond, req, tuple(state.reports), refiner)
    took = time.perf_counter() - started
    console.info(f"done: {len(targets)} image{'s' if len(targets) != 1 else ''} in {took:.1f} s")


def prepare(models, cfg: RunConfig, job: Job, init: Init | None = None, cond_override=None,
            refiner=None) -> Prepared:  # fmt: skip
    """The job's plan, its Cond pair (the inpainting channels attached), its size, hires pass and refiner part."""
    from .. import pipeline
    from ..conditioning import conditioning

    plan = pipeline.make_plan(cfg.sampler, cfg.schedule, cfg.steps, cfg.sigmas, cfg.cfg, cfg.guidance_rescale,
                              models.family)
    concat = init.concat if init is not None else None
    if cond_override is not None:  # the embedding file is the prompt: one conditioning, nothing to schedule
        cond, uncond = _with_negative(models, cond_override, cfg)
    else:
        encoded: dict = {}  # shared with the hires pass: a plain prompt is encoded once, not twice
        cond, uncond = pipeline.encode_scheduled(models, job.text, cfg.negative, cfg.steps, cfg.clip_skip, None, encoded)
    width, height = _size(cfg, models, init)
    hires = _hires(cfg, (height, width), models) if init is None else None
    if hires is not None and cond_override is None:
        conds = pipeline.encode_scheduled(models, job.text, cfg.negative, cfg.steps, cfg.clip_skip,
                                          hires_steps=cfg.hires_steps or cfg.steps, encoded=encoded)
        hires = dataclasses.replace(hires, conds=tuple(conditioning(c) for c in conds))
    if hires is not None and hires.conds is not None:  # A1111 conditions the hires pass on its own size
        hires = dataclasses.replace(hires, conds=sized(models, cfg, hires.conds, hires.size))
    cond, uncond = sized(models, cfg, (cond, uncond), (height, width))
    refined = None
    if refiner is not None:
        plan, refiner_plan = pipeline.split_at_switch(plan, cfg.refiner_switch, models.family)
        refined = _refiner_part(refiner, cfg, job, refiner_plan, (height, width), len(plan.sigmas) - 1)
    return Prepared(plan, conditioning(cond, concat), conditioning(uncond, concat), (height, width), hires, refined)


def _refiner_part(models, cfg: RunConfig, job: Job, plan, size: tuple[int, int], steps_before: int):
    """The refiner's plan and conditioning (its own encoders, its own vector y), or None without steps for it."""
    from .. import pipeline
    from ..conditioning import conditioning

    if plan is None:
        return None
    conds = pipeline.encode_scheduled(models, job.text, cfg.negative, cfg.steps, cfg.clip_skip)
    cond, uncond = (_after(c, steps_before) for c in sized(models, cfg, conds, size))
    return Refiner(models, plan, conditioning(cond), conditioning(uncond), steps_before)


def _after(value, steps: int):
    """A prompt-editing schedule as seen by a sampler that starts `steps` evaluations in (the refiner counts its
    evaluations from 0; the schedule counts them over the whole run, as A1111's continuing sampler does)."""
    from ..prompt_schedule import ScheduledCond

    if not isinstance(value, ScheduledCond):
        return value
    entries = tuple((end - steps, c) for end, c in value.entries if end - steps >= 0)
    return ScheduledCond(entries or value.entries[-1:])


def size_cond(cfg: RunConfig, size: tuple[int, int]):
    """SDXL's size/crop conditioning for a pass rendering `size` (H, W): the configured sizes, else that size."""
    from ..config import pair_of
    from ..families.base import SizeCond

    def pair(key: str, default: tuple[int, int]) -> tuple[int, int]:
        value = getattr(cfg, key)
        return default if value is None else pair_of(key, value)

    return SizeCond(original=pair("original_size", size), crop=pair("crop_coords", (0, 0)),
                    target=pair("target_size", size), aesthetic=cfg.aesthetic_score,
                    negative_aesthetic=cfg.negative_aesthetic_score)


def sized(models, cfg: RunConfig, conds: tuple, size: tuple[int, int]) -> tuple:
    """(cond, uncond) with the family's vector y for a pass rendering `size` (unchanged for families without)."""
    from .. import pipeline

    at = size_cond(cfg, size)
    return (pipeline.with_size_vector(models, conds[0], at), pipeline.with_size_vector(models, conds[1], at, True))


def _with_negative(models, cond, cfg: RunConfig):
    """An embedding file's conditioning and the negative prompt's, padded to one chunk count by the rule the
    prompt encoder uses (prompts.pad_chunks: the empty prompt's encoding, as A1111)."""
    from .. import pipeline
    from ..prompts import pad_chunks

    uncond = pipeline.encode_text(models, "", cfg.negative, cfg.clip_skip)[1]
    return pad_chunks(cond.to(uncond), uncond, lambda: pipeline.encode_text(models, "", "", cfg.clip_skip)[0])


def _render_job(models, targets: list[Target], init: Init | None, cond_override, req, loras: tuple,
                refiner=None) -> None:  # fmt: skip
    from .. import pipeline

    cfg = targets[0].job.cfg
    p = prepare(models, cfg, targets[0].job, init, cond_override, refiner)
    with pipeline.seamless(models, cfg.seamless):
        for start in range(0, len(targets), cfg.batch_size):
            _render_batch(models, p, targets[start:start + cfg.batch_size], init, req, loras)


def _hires(cfg: RunConfig, size: tuple[int, int], models) -> Hires | None:
    """The second pass when hires_scale asks for one; says the output size (rounded to the latent grid)."""
    from .. import pipeline

    if cfg.hires_scale == 1.0:
        return None
    plan = pipeline.make_plan(cfg.sampler, cfg.schedule, cfg.hires_steps or cfg.steps, cfg.sigmas, cfg.cfg,
                              cfg.guidance_rescale, models.family)
    out = pipeline.hires_size(*size, cfg.hires_scale, models.family.latent.downscale)
    exact = (size[1] * cfg.hires_scale, size[0] * cfg.hires_scale)
    rounded = " (rounded to a multiple of 8)" if exact != (out[1], out[0]) else ""
    console.info(f"hires fix: {size[1]}x{size[0]} -> {out[1]}x{out[0]}{rounded}, "
                 f"strength {cfg.hires_strength}, {cfg.hires_steps or cfg.steps} steps")
    return Hires(plan, out, cfg.hires_strength)


def txt2img_passes(models, plan, cond, uncond, seeds: list[int], size: tuple[int, int], hires: Hires | None,
                   callback=None, refiner: Refiner | None = None):
    """Pass 1 at `size` (H, W) (handed to the refiner at the switch when there is one), then the hires fix's pass 2
    when asked. All draw from the same per-image generators, each part continuing their state, so image k of a
    batch still equals a single run with seed+k."""
    from .. import pipeline

    gens = pipeline.generators(seeds)
    latents = pipeline.txt2img(models, plan, cond, uncond, gens, *size, callback=callback)
    if refiner is not None:
        offset = refiner.steps_before
        step = None if callback is None else (lambda i, total, *rest: callback(i + offset, total + offset, *rest))
        latents = pipeline.continue_sampling(refiner.models, refiner.plan, latents, refiner.cond, refiner.uncond,
                                             gens, step)
    if hires is None:
        return latents
    cond, uncond = hires.conds or (cond, uncond)
    return pipeline.hires_fix(models, hires.plan, latents, cond, uncond, gens, hires.strength, hires.size, callback)


def _render_batch(models, p: Prepared, batch: list[Target], init: Init | None, req, loras: tuple) -> None:
    from .. import pipeline

    seeds = [t.seed for t in batch]
    t0 = time.perf_counter()
    steps = len(p.plan.sigmas) - 1 + (len(p.refiner.plan.sigmas) - 1 if p.refiner else 0)
    with Progress(seeds, steps if init is None else None, req.progress) as progress:
        step = _with_preview(progress, req.preview, models)
        if init is None or (init.concat is not None and init.strength >= 1.0):  # inpainting at 1: pure noise
            latents = txt2img_passes(models, p.plan, p.cond, p.uncond, seeds, p.size, p.hires, callback=step,
                                     refiner=p.refiner)
        else:
            latents = pipeline.img2img(models, p.plan, init.latent, p.cond, p.uncond, seeds, init.strength,
                                       callback=step)
    t1 = time.perf_counter()
    decoded = pipeline.decode_latents(decoder(models, p), latents)
    t2 = time.perf_counter()
    timings = {"sample_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3)}
    for k, target in enumerate(batch):
        save.save_one(models, target, decoded.images[k], latents[k:k + 1], decoded.fallbacks, p.size, init,
                      timings, req, p.hires, loras, p.refiner)


def decoder(models, p: Prepared):
    """The models whose VAE decodes a job's latents: the refiner's when it finished them (see load_refiner)."""
    return p.refiner.models if p.refiner is not None else models


def _with_preview(progress, preview: str | None, models):
    """The sampler callback: progress, and the live preview when asked for (either may be absent)."""
    from ..preview import PreviewWriter

    latent = models.family.latent
    writer = PreviewWriter(preview, rgb_factors=latent.rgb_factors, downscale=latent.downscale) if preview else None
    callbacks = [c for c in (progress, writer) if c is not None]
    if len(callbacks) < 2:
        return callbacks[0] if callbacks else None
    return lambda *args: [c(*args) for c in callbacks]


def _size(cfg: RunConfig, models, init: Init | None) -> tuple[int, int]:
    """(width, height): given, else the family's native size for this prediction type."""
    if init is not None:
        _, _, h, w = init.latent.shape
        down = models.family.latent.downscale
        return w * down, h * down
    native = models.family.native_size(models.info.prediction)
    return cfg.width or native, cfg.height or native
