"""Rendering shared by the commands: every output decided and checked up front, the model loaded once, each job's
LoRAs merged (lora.LoraState), the conditioning built (conditioning.Cond), the passes run batch by batch, each
image saved through save.py.

Reproducibility: image k of a batch equals a single run with its own seeds (seed+k, or with a variation the seed and
subseed+k: A1111's numbering, sampling/seeds.py batch_seeds; see pipeline.py); the hires fix's second pass continues
the same per-image generators (`cpu` noise) or starts new ones from the same seeds (`gpu` / `nv`, as A1111).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli.runtime import console
from sdcli.config import RunConfig
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, UsageError, quote
from sdcli.jobs import Job
from sdcli.app import hires_fix, live_preview, save
from sdcli.app.hires_fix import Hires
from sdcli.app.planning import OutputPlan
from sdcli.app.progress import Progress
from sdcli.app.progress import run as progress_run


@dataclass(frozen=True)
class Target:
    """One image to render: which job, which seed (and variation seed), where it goes."""

    job: Job
    index: int  # position in the whole run, for {index}
    seed: int
    path: Path
    latent_path: Path | None = None  # --latent-out's name for this image
    subseed: int | None = None  # its variation seed; None: the job's (a batch of one)

    @property
    def image_subseed(self) -> int:
        return self.job.cfg.subseed if self.subseed is None else self.subseed


@dataclass
class Init:
    """Where sampling starts for img2img-like runs: a scaled latent and the strength."""

    latent: Any
    strength: float
    notes: list[str] = field(default_factory=list)
    concat: Any = None  # inpainting: the UNet's mask + masked-image channels (pipeline.inpaint_conditioning)
    mask: str | None = None  # inpainting: the mask file, for the metadata
    inpaint: Any = None  # inpainting / outpainting: app/inpaint.Inpaint (its fills, overlay and infotext)
    keep: Any = None  # inpainting with any model: (1, 1, h, w) latent mask, 1 = keep (sampling/inpaint.py)


@dataclass(frozen=True)
class Prepared:
    """What every batch of one job shares: the sampling plan, the conditioning, the size, the hires pass."""

    plan: Any
    cond: Any  # conditioning.Cond, or a prompt-editing schedule of them
    uncond: Any
    size: tuple[int, int]  # (H, W) of the first pass
    hires: Hires | None
    refiner: Any = None  # refine.Refiner: SDXL's refiner taking over at the switch


# --- before any work -----------------------------------------------------------------------------

def plan_outputs(jobs: list[Job], req) -> tuple[list[Target], OutputPlan]:
    """Every image of the run with its name (and its --latent-out name), and the run's OutputPlan holding them and
    the --preview file. Not yet checked: a command registers what else it writes (`plan.add("grid", path)`), then
    calls `plan.check()`, before the model loads."""
    plan = OutputPlan(overwrite=req.overwrite, json_stdout=req.json_out, formats=True)
    latent_out = getattr(req, "latent_out", None)
    targets, index = [], 0
    for job in jobs:
        seeds, subseeds = image_seeds(job.cfg)
        for k, (seed, subseed) in enumerate(zip(seeds, subseeds)):
            path = _name(job.cfg.output, index, seed, job.prompt)
            if not getattr(req, "grid_only", False):  # --grid-only: the name is never written
                plan.add("image", path)
            latent = plan.add("latent", _name(latent_out, index, seed, job.prompt)) if latent_out else None
            targets.append(Target(job, index, seed, path, latent, subseed))
            index += 1
    if getattr(req, "preview", None):
        plan.add("preview", _preview_name(req.preview))
        interval = getattr(req, "preview_interval", 0.5)
        if not 0 <= interval < float("inf"):
            raise UsageError(f"--preview-interval must be a number of seconds, 0 or more, got {interval}")
    return targets, plan


def _preview_name(name: str) -> str:
    """--preview names a PNG file; a name without .png (`--preview tae`) is more likely meant for --preview-vae."""
    suffix = Path(name).suffix.lower()
    if name == "-" or suffix == ".png":
        return name
    if not suffix:
        raise UsageError(f"--preview {name}: --preview names the PNG file to keep the preview in (FILE.png); "
                         "the decoder that draws it is --preview-vae FILE")
    raise UsageError(f"--preview {name}: the preview is a PNG, name it FILE.png")


def image_seeds(cfg: RunConfig) -> tuple[list[int], list[int]]:
    """(seeds, variation seeds) of the job's n images, numbered as A1111 numbers a batch (seeds.batch_seeds: seed+k,
    or with a variation the seed for all and subseed+k); without a variation every subseed is the job's own, so the
    record of each image says what was given."""
    from sdcli.sampling.seeds import batch_seeds  # no torch: a --server client plans with it

    seeds, subseeds = batch_seeds(cfg.seed, cfg.n, cfg.subseed, cfg.subseed_strength)
    return seeds, subseeds if cfg.subseed_strength != 0 else [cfg.subseed] * cfg.n


def noise_settings(cfg: RunConfig, subseeds: list[int]):
    """pipeline.NoiseSettings of the job's noise for images with these variation seeds."""
    from sdcli import config
    from sdcli.pipeline import NoiseSettings

    resize = config.pair_of("seed_resize_from", cfg.seed_resize_from) if cfg.seed_resize_from else (0, 0)
    return NoiseSettings(cfg.rng, tuple(subseeds), cfg.subseed_strength, (resize[1], resize[0]), cfg.ensd)


def sampler_params(cfg: RunConfig) -> dict:
    """The A1111 sampler parameters of the config, as make_plan takes them."""
    return {"eta": cfg.eta, "s_churn": cfg.s_churn, "s_tmin": cfg.s_tmin, "s_tmax": cfg.s_tmax,
            "s_noise": cfg.s_noise}


def slg_of(cfg: RunConfig, models, guidance: float):
    """The run's SD3.5 skip-layer guidance (sampling/slg.py), None when off; refused (exit 2) where it has no
    meaning."""
    from sdcli.sampling.slg import skip_layer_guidance

    return skip_layer_guidance(cfg.slg_scale, cfg.skip_layers, cfg.slg_start, cfg.slg_end, models.family,
                               getattr(models.info.unet, "depth", None), guidance)


def plan_grid(req, targets: list[Target], outputs: OutputPlan, sized: bool = False) -> None:
    """--grid FILE planned with the images, before the model loads (its name checked with theirs by the plan),
    and one image size for the whole run (a contact sheet's cells are all alike). `sized`: the jobs' -W/-H, when
    given, are the images' size (txt2img without a hires pass), so a sheet too big is refused now."""
    grid, grid_only = getattr(req, "grid", None), getattr(req, "grid_only", False)
    if grid is None:
        if grid_only:
            raise UsageError("--grid-only needs --grid FILE")
        return
    if req.grid_rows < -1:
        raise UsageError(f"--grid-rows must be -1 (automatic), 0 (one row per batch) or a row count, got {req.grid_rows}")
    if getattr(req, "skip_existing", False):
        raise UsageError("--grid puts every image of the run on one sheet: it cannot be used with --skip-existing")
    sizes = {(t.job.cfg.width, t.job.cfg.height, t.job.cfg.hires_scale) for t in targets}
    if len(sizes) > 1:
        raise UsageError("--grid puts every image of the run on one sheet, but the jobs render different sizes")
    width, height, scale = sizes.pop() if sizes else (None, None, 1.0)
    if sized and width and height and scale == 1.0 and not getattr(req, "latent_in", None):
        save.check_grid(req, len(targets), (width, height), targets[0].job.cfg.batch_size)
    outputs.add("grid", grid)


def _name(template: str, index: int, seed: int, prompt: str) -> Path:
    from sdcli.output.targets import STDOUT, expand_template

    return Path(STDOUT) if template == STDOUT else expand_template(template, index, seed, prompt)


def check_samplers(jobs: list[Job], base: RunConfig | None = None, origin=None, warn: bool = True) -> None:
    """Fail on a bad sampler/schedule/sigma list before the model is loaded, naming where the value came from;
    with `warn`, say once per sampler which A1111 parameters it does not take (warn_unused_params)."""
    from sdcli.sampling import names

    for job in jobs:
        if job.cfg.sampler == "help":
            print(names.sampler_help())  # asked-for data: stdout
            raise SystemExit(0)
        try:
            _name, schedule_used = names.resolve_sampler_schedule(job.cfg.sampler, job.cfg.schedule)
        except UsageError as e:
            raise _located(e, job, "sampler", base, origin) from None
        if job.cfg.sigmas:
            from sdcli.sampling import schedule  # parses into a tensor: torch only when --sigmas is given

            try:
                schedule.parse_sigmas(job.cfg.sigmas)
            except UsageError as e:
                raise _located(e, job, "sigmas", base, origin) from None
        elif schedule_used not in names.SCHEDULE_NAMES:
            known = ", ".join(names.SCHEDULE_NAMES)
            e = UsageError(f"unknown schedule '{quote(job.cfg.schedule, 60)}' (known: {known})")
            raise _located(e, job, "schedule", base, origin)
    if warn:
        warn_unused_params(jobs)


def warn_unused_params(jobs: list[Job]) -> None:
    """A1111's sampler parameters set for a sampler that does not take them (eta for Euler, churn for Euler a):
    A1111 ignores them, so sdcli does too, and says so once per sampler and parameter on stderr."""
    from sdcli.sampling.a1111_params import unused
    from sdcli.sampling.names import resolve_sampler_schedule  # torch-free, as the checks before it

    said = set()
    for job in jobs:
        cfg = job.cfg
        sampler = resolve_sampler_schedule(cfg.sampler, cfg.schedule)[0]
        params = sampler_params(cfg)
        for key in unused(sampler, cfg.eta, params):
            if (sampler, key) not in said:
                said.add((sampler, key))
                console.info(f"{key} {params[key]} is not a parameter of sampler {sampler} (A1111 ignores it "
                             "there too): it changes nothing")


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
    from sdcli.loading.lora import check_file, parse_spec, resolve_prompt_lora

    parsed = [parse_spec(s) for s in flags]
    parsed += [resolve_prompt_lora(t.name, t.weight, job.cfg.lora_dir) for t in job.loras]
    for spec in parsed:
        check_file(spec)
    return parsed


def job_loras(jobs: list[Job], flags: list[str]) -> dict[int, list]:
    """id(job) -> its LoRAs (--lora, then the prompt's tags), resolved and sniffed once, before the model load."""
    return {id(job): lora_specs(flags, job) for job in jobs}


def load(cfg: RunConfig, lazy: bool = False):
    """The run's checkpoint, its parts held by the run's residency policy (residency.choose: `lazy` for a
    command that uses one part, so it reads no other)."""
    from sdcli import pipeline
    from sdcli.loading import checkpoint
    from sdcli.runtime import device
    from sdcli.loading import residency

    check_model_given(cfg)
    check_embeddings_dir(cfg)
    placement = device.choose(cfg.device, cfg.dtype)
    device.configure(placement, cfg.threads)
    prediction = None if cfg.prediction == "auto" else cfg.prediction
    console.info(f"loading {cfg.model} ({placement.device}, {placement.dtype_name})")
    policy = residency.choose(cfg.offload, placement.device, lazy)
    from sdcli.config import TEXT_FILE_KEYS

    text_files = {key: getattr(cfg, key) for key in TEXT_FILE_KEYS}
    models = checkpoint.load_models(cfg.model, cfg.vae, placement.dtype, placement.device, prediction, placement,
                                    policy, text_files)
    from sdcli.loading.components import absent_optional

    for flag in absent_optional(models.family, models.info.texts):
        console.info(f"{models.family.title} without its optional text encoder: it conditions on zeros in its "
                     f"place (diffusers' rule); give the file with {flag} for the full conditioning")
    return pipeline.with_embeddings(models, cfg.embeddings_dir) if cfg.embeddings_dir else models


def check_model_given(cfg: RunConfig) -> None:
    """Before any heavy import: a run needs a model."""
    if not cfg.model:
        raise UsageError("no model given: pass --model FILE.safetensors | FOLDER | HUB_ID, or set 'model:' in a config")


def check_embeddings_dir(cfg: RunConfig) -> None:
    """A named embeddings folder must exist: said before the (slow) model load."""
    if cfg.embeddings_dir and not Path(cfg.embeddings_dir).expanduser().is_dir():
        raise ModelNotFoundError(f"embeddings_dir {cfg.embeddings_dir}: no such folder")


def check_model_options(models, cfg: RunConfig, mask: str | None) -> None:
    """What the loaded model cannot do with this run's options: an inpainting UNet without a mask (any model
    inpaints with one: app/inpaint.py); token merging on a transformer (it merges tokens in a UNet's blocks)."""
    from sdcli import pipeline

    check_inpaint_model(models, cfg, mask)
    pipeline.check_token_merging(models, cfg.tome_ratio, cfg.tome_ratio_hr)


def check_inpaint_model(models, cfg: RunConfig, mask: str | None) -> None:
    if models.info.inpaint and not mask:
        raise UsageError(f"{cfg.model} is an inpainting model (9-channel UNet): use "
                         "`sdcli img2img PROMPT -i IMAGE --mask MASK.png` (white = repaint) or --pad")


def use_loras(state, specs: list) -> None:
    """Make `specs` the merged LoRAs of `state` (lora.LoraState), saying what a new merge did."""
    for report in state.use(specs):
        console.info(report.message())


# --- rendering -----------------------------------------------------------------------------------

def render_all(models, targets: list[Target], init: Init | None, cond, req, loras: dict[int, list],
               refiner=None, nets: dict | None = None) -> None:  # fmt: skip
    """Every job's images, each job with its LoRA set (`loras`: id(job) -> specs, from job_loras) and its
    ControlNet units (`nets`: the run's loaded ControlNets, control_config.load_nets); `refiner`:
    refine.load_refiner's models, or None."""
    from sdcli.loading.lora import LoraState

    if getattr(req, "grid", None):  # the sheet's size is known now (the family's size): refuse it before the work
        save.check_grid(req, len(targets), _final_size(targets[0].job.cfg, models, init),
                        targets[0].job.cfg.batch_size)
    started = time.perf_counter()
    by_job: dict[int, list[Target]] = {}
    for t in targets:
        by_job.setdefault(id(t.job), []).append(t)
    switching = len({tuple((s.path.resolve(), s.weight) for s in specs) for specs in loras.values()}) > 1
    state = LoraState(models, keep_originals=switching)
    saved: list[save.Saved] = []
    with progress_run(len(targets)):  # each batch's bar says its place in the run and the run's time left
        for n, (key, group) in enumerate(by_job.items()):
            use_loras(state, loras[key])
            saved += _render_job(models, group, init, cond, req, tuple(state.reports), refiner=refiner, nets=nets,
                                 last=n == len(by_job) - 1)
    if getattr(req, "grid", None):
        save.save_grid(saved, req, targets[0].job.cfg.batch_size)
    took = time.perf_counter() - started
    console.info(f"done: {len(targets)} image{'s' if len(targets) != 1 else ''} in {took:.1f} s")


def prepare(models, cfg: RunConfig, job: Job, init: Init | None = None, cond_override=None,
            encoded: dict | None = None, refiner=None, nets: dict | None = None) -> Prepared:
    """The job's plan, its Cond pair (the inpainting channels and ControlNet units attached, the family's vector y
    built for each pass's size), its size, hires pass and refiner part. `encoded` ((text, negative) -> encoding)
    lets jobs with one clip_skip and one LoRA set share their text encodings; `nets`: the run's loaded
    ControlNets (control_config.load_nets)."""
    from sdcli.app.refine import refiner_part, sized

    from sdcli import pipeline
    from sdcli.sampling.denoise import guided

    width, height = _size(cfg, models, init)
    plan = pass_plan(cfg, models, cfg.steps, (height, width), cfg.tome_ratio)
    concat = init.concat if init is not None else None
    negative = cfg.negative if guided(plan.cfg) else None  # cfg <= 1: the prompt alone, no negative encoded
    if cond_override is not None:  # the embedding file is the prompt: one conditioning, nothing to schedule
        cond, uncond = _with_negative(models, cond_override, cfg) if negative is not None else (cond_override, None)
    else:
        encoded = {} if encoded is None else encoded  # shared with the hires pass: a prompt is encoded once
        with console.stage("text encode"):
            cond, uncond = pipeline.encode_scheduled(models, job.text, negative, cfg.steps, cfg.clip_skip, None,
                                                     encoded)  # fmt: skip
    # img2img's result gets the second pass too (its callers refuse it with inpainting and --latent-in)
    hires = _hires(cfg, (height, width), models) if init is None or init.inpaint is None else None
    if hires is not None and cond_override is None:
        with console.stage("text encode (hires pass)"):
            conds = pipeline.encode_scheduled(models, job.text, negative, cfg.steps, cfg.clip_skip,
                                              hires_steps=cfg.hires_steps or cfg.steps, encoded=encoded)
        hires = dataclasses.replace(hires, conds=tuple(_conditioning(c) for c in conds))
    if hires is not None and hires.conds is not None:  # A1111 conditions the hires pass on its own size
        hires = dataclasses.replace(hires, conds=_guided(models, cfg, sized(models, cfg, hires.conds, hires.size)))
    cond, uncond = _guided(models, cfg, sized(models, cfg, (cond, uncond), (height, width)))
    refined = None
    if refiner is not None:
        plan, rest = pipeline.split_at_switch(plan, cfg.refiner_switch, models.family)
        refined = refiner_part(refiner, cfg, job, rest, negative, (height, width), len(plan.sigmas) - 1)
    cond, uncond = _conditioning(cond, concat), _conditioning(uncond, concat)
    if cfg.controlnets:
        cond, uncond, hires = _with_control(models, cfg, nets, cond, uncond, hires)
    return Prepared(plan, cond, uncond, (height, width), hires, refined)


def pass_plan(cfg: RunConfig, models, steps: int, size: tuple[int, int], tome_ratio: float):
    """The sampling plan of one pass (pass 1, or the hires pass at its size and steps): the job's sampler and
    schedule over the family's sigmas, its token merging and SD3.5 skip-layer guidance."""
    from sdcli import pipeline

    plan = pipeline.make_plan(cfg.sampler, cfg.schedule, steps, cfg.sigmas, cfg.cfg, cfg.guidance_rescale,
                              models.family, sampler_params(cfg), size=size, shift=cfg.flow_shift)
    return dataclasses.replace(plan, token_merging=tome_ratio, slg=slg_of(cfg, models, plan.cfg))


def _hires(cfg: RunConfig, size: tuple[int, int], models) -> Hires | None:
    """The hires fix's second pass when hires_scale asks for one (app/hires_fix.py), planned at its own size."""
    if cfg.hires_scale == 1.0:
        return None
    out = hires_fix.output_size(models.family, size, cfg.hires_scale)
    plan = pass_plan(cfg, models, cfg.hires_steps or cfg.steps, out, cfg.tome_ratio_hr or cfg.tome_ratio)
    return hires_fix.second_pass(cfg, models, size, out, plan)


def _guided(models, cfg: RunConfig, conds: tuple) -> tuple:
    """(cond, uncond) with a guidance-distilled family's strength (--guidance) in each (pipeline.with_guidance)."""
    from sdcli import pipeline

    return tuple(pipeline.with_guidance(models, c, cfg.guidance) for c in conds)


def _conditioning(value, concat=None):
    """conditioning.conditioning, keeping an absent uncond (no guidance) absent."""
    from sdcli.sampling.conditioning import conditioning

    return None if value is None else conditioning(value, concat)


def _with_control(models, cfg: RunConfig, nets: dict | None, cond, uncond, hires: Hires | None):
    """The job's ControlNet units on both passes' conditioning (the hint is fitted to each pass's size)."""
    from sdcli.control.apply import attach
    from sdcli.control.settings import units_for

    units = units_for(cfg.controlnets, {} if nets is None else nets, models)
    if hires is not None and hires.conds is not None:
        hires = dataclasses.replace(hires, conds=attach(*hires.conds, units))
    return (*attach(cond, uncond, units), hires)


def _with_negative(models, cond, cfg: RunConfig):
    """An embedding file's conditioning and the negative prompt's, padded to one chunk count by the rule the
    prompt encoder uses (prompts.pad_chunks: the empty prompt's encoding, as A1111)."""
    from sdcli import pipeline
    from sdcli.text.prompts import pad_chunks

    uncond = pipeline.encode_text(models, "", cfg.negative, cfg.clip_skip)[1]
    return pad_chunks(cond.to(uncond), uncond, lambda: pipeline.encode_text(models, "", "", cfg.clip_skip)[0])


def _render_job(models, targets: list[Target], init: Init | None, cond_override, req, loras: tuple,
                refiner=None, nets: dict | None = None, last: bool = False) -> list:  # fmt: skip
    """One job's batches; `last`: the run's last job, whose last batch is the run's last sampling."""
    from sdcli import pipeline

    cfg = targets[0].job.cfg
    p = prepare(models, cfg, targets[0].job, init, cond_override, refiner=refiner, nets=nets)
    saved = []
    with pipeline.seamless(models, cfg.seamless):
        for start in range(0, len(targets), cfg.batch_size):
            final = last and start + cfg.batch_size >= len(targets)
            saved += _render_batch(models, p, targets[start:start + cfg.batch_size], init, req, loras, final)
    return saved


def txt2img_passes(models, plan, cond, uncond, seeds: list[int], size: tuple[int, int], hires: Hires | None,
                   callback=None, refiner=None, noise=None):
    """Pass 1 at `size` (H, W) (handed to the refiner at the switch when there is one), then the hires fix's pass 2
    when asked. Pass 1 and the refiner draw from the same per-image generators (pipeline.image_noise with `noise`,
    a pipeline.NoiseSettings, default `cpu`); pass 2 continues them or, with `gpu` / `nv` noise, starts new ones at
    its size as A1111 does. Image k of a batch still equals a single run with its seeds."""
    from sdcli import pipeline

    down = models.family.latent.downscale
    shape = (models.family.latent.channels, size[0] // down, size[1] // down)
    draws = pipeline.image_noise(models, seeds, shape, noise)
    with console.stage("sampling pass 1"):
        latents = pipeline.txt2img(models, plan, cond, uncond, draws, *size, callback=callback)
    if refiner is not None:
        offset = refiner.steps_before
        step = None if callback is None else (lambda i, total, *rest: callback(i + offset, total + offset, *rest))
        with console.stage("sampling (refiner)"):
            latents = pipeline.continue_sampling(refiner.models, refiner.plan, latents, refiner.cond,
                                                 refiner.uncond, draws, step)  # fmt: skip
    return hires_fix.run(models, hires, latents, cond, uncond, seeds, draws, callback, noise)


@dataclass(frozen=True)
class Rendered:
    """One finished image as its PNG file's bytes (metadata included), before anything is written: the local run
    writes it at once, a Ray worker (app/cluster.py) sends it to the driver, which writes it the same way."""

    target: Target
    png: bytes
    latent: Any  # the final latent of this image, for --latent-out
    size: tuple[int, int]  # (H, W) of the output
    timings: dict
    fallbacks: list
    picture: Any = None  # save.Saved (PIL image and metadata) for --grid; dropped before a worker sends it


def _render_batch(models, p: Prepared, batch: list[Target], init: Init | None, req, loras: tuple,
                  last: bool = False) -> list:  # fmt: skip
    rendered = render_batch(models, p, batch, init, req, loras, last)
    for done in rendered:
        with console.stage(f"save (write {done.target.path})"):
            save.save_rendered(models, done, req)
    return [done.picture for done in rendered]


def render_batch(models, p: Prepared, batch: list[Target], init: Init | None, req, loras: tuple,
                 last: bool = False) -> list[Rendered]:  # fmt: skip
    """One UNet batch of a job, sampled, decoded and encoded as PNG files: the one place images are made. `last`:
    no sampling follows in this run, so the residency may let the UNet go before the decode."""
    from sdcli import pipeline
    from sdcli.app.refine import decoder
    from sdcli.models.packed_conv import packed_convs

    seeds = [t.seed for t in batch]
    noise = noise_settings(batch[0].job.cfg, [t.image_subseed for t in batch])
    t0 = time.perf_counter()
    steps = len(p.plan.sigmas) - 1 + (len(p.refiner.plan.sigmas) - 1 if p.refiner else 0)
    # one packing session over the sampling and lean's release of the UNet: a UNet let go is not unpacked first
    with packed_convs(models.device):
        with Progress(seeds, steps if init is None else None, req.progress) as progress:
            step = live_preview.step_callback(progress, req, models, batch[0].job.cfg.vae_dir)
            latents = sample_batch(models, p, seeds, init, step, noise)
        t1 = time.perf_counter()
        if last:
            models.parts.done_sampling()
    with console.stage("VAE decode"):
        decoded = pipeline.decode_latents(decoder(models, p.refiner), latents, pipeline.vae_tiling(batch[0].job.cfg))
    t2 = time.perf_counter()
    timings = {"sample_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3)}
    out_size = p.hires.size if p.hires else p.size
    with console.stage("save (encode the image files)"):
        pictures = [save.picture_for(models, t, decoded.images[k], decoded.fallbacks, p.size, init, p.hires, loras,
                                     p.refiner) for k, t in enumerate(batch)]  # fmt: skip
        return [Rendered(t, save.file_bytes(pic, t.path, req), latents[k:k + 1], out_size, timings, decoded.fallbacks,
                         pic) for k, (t, pic) in enumerate(zip(batch, pictures))]  # fmt: skip


def sample_batch(models, p: Prepared, seeds: list[int], init: Init | None, callback=None, noise=None):
    """The final latents of one batch: from noise (txt2img, its hires pass and refiner; a 9-channel inpainting
    model at strength 1), else img2img from the init latent, the inpainting's latent fill and mask applied.
    `noise`: pipeline.NoiseSettings (noise_settings), default `cpu`."""
    from sdcli import pipeline

    if init is None or (init.concat is not None and init.strength >= 1.0):  # inpainting at 1: pure noise
        return txt2img_passes(models, p.plan, p.cond, p.uncond, seeds, p.size, p.hires, callback=callback,
                              refiner=p.refiner, noise=noise)
    source = noise.source if noise is not None else "cpu"
    start = init.inpaint.start(init.latent, seeds, source) if init.inpaint is not None else init.latent
    draws = pipeline.image_noise(models, seeds, tuple(start.shape[1:]), noise)
    with console.stage("sampling (img2img)"):
        latents = pipeline.img2img(models, p.plan, start, p.cond, p.uncond, draws, init.strength, callback=callback,
                                   keep=init.keep)
    return hires_fix.run(models, p.hires, latents, p.cond, p.uncond, seeds, draws, callback, noise)


def _final_size(cfg: RunConfig, models, init: Init | None) -> tuple[int, int]:
    """(width, height) of the saved images: after the hires pass when there is one, rounded as that pass rounds
    (hires_fix.output_size), so a grid or plot checked with it has the images' size."""
    w, h = _size(cfg, models, init)
    if cfg.hires_scale == 1.0:
        return w, h
    h, w = hires_fix.output_size(models.family, (h, w), cfg.hires_scale)
    return w, h


def _size(cfg: RunConfig, models, init: Init | None) -> tuple[int, int]:
    """(width, height): given, else the family's native size for this prediction type."""
    if init is not None:
        _, _, h, w = init.latent.shape
        down = models.family.latent.downscale
        return w * down, h * down
    family = models.family
    native = family.native_size(models.info.prediction)
    width, height = cfg.width or native, cfg.height or native
    if width % family.size_multiple or height % family.size_multiple:
        raise UsageError(f"{family.title} renders sides that are multiples of {family.size_multiple} px; "
                         f"got {width}x{height}")
    return width, height
