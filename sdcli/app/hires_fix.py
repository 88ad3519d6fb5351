"""The hires fix (A1111 "Hires. fix") as a render plans and runs it: the second pass's output size, its upscaler (a
model file loaded once per run), the upscalers checked before the model load, and the pass itself on pass 1's
latents. Its sampling plan is render.pass_plan's (pass 1's rules at the second pass's size and steps).

The output size is rounded in one place (output_size): the pass itself, the size a --grid or a sweep plot is
checked with before the first image, and --dry-run all take it from there, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdcli.runtime import console
from sdcli.config import RunConfig
from sdcli.jobs import Job


@dataclass(frozen=True)
class Hires:
    """The hires fix's second pass (A1111 "Hires. fix"): its plan, output size, strength and upscaler."""

    plan: Any  # pipeline.SamplingPlan with hires_steps (or steps)
    size: tuple[int, int]  # (height, width) of the output, on the family's latent grid (output_size)
    strength: float
    conds: tuple | None = None  # (cond, uncond) when prompt editing schedules this pass apart; else pass 1's
    upscaler: Any = None  # upscale.resize.HiresUpscaler: how pass 1 reaches the size (None: "Latent")


def grid_of(family) -> int:
    """The pixel multiple a family's hires size is rounded to: the VAE's 8, or the family's own size multiple when
    larger (16 for SD3 / FLUX: a token is a 2x2 patch of 8-pixel latent cells)."""
    return max(family.latent.downscale, family.size_multiple)


def output_size(family, size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(height, width) of the second pass for a first pass of `size` (H, W): scaled and rounded to grid_of(family)
    (pipeline.hires_size)."""
    from sdcli import pipeline

    return pipeline.hires_size(*size, scale, grid_of(family))


def second_pass(cfg: RunConfig, models, size: tuple[int, int], out: tuple[int, int], plan) -> Hires:
    """The second pass from `size` to `out` (output_size) with `plan`, its upscaler loaded; says both sizes (and the
    rounding, when the scale did not land on the grid) on stderr."""
    exact = (size[1] * cfg.hires_scale, size[0] * cfg.hires_scale)
    rounded = f" (rounded to a multiple of {grid_of(models.family)})" if exact != (out[1], out[0]) else ""
    chosen = upscaler(cfg, models)
    named = "" if chosen.choice.name == "Latent" else f", upscaler {chosen.choice.name}"
    console.info(f"hires fix: {size[1]}x{size[0]} -> {out[1]}x{out[0]}{rounded}, "
                 f"strength {cfg.hires_strength}, {cfg.hires_steps or cfg.steps} steps{named}")
    return Hires(plan, out, cfg.hires_strength, upscaler=chosen)


def upscaler(cfg: RunConfig, models):
    """The job's hires upscaler (upscale.resize.HiresUpscaler), its network loaded once per run on the model's
    device and dtype when it is a model file."""
    from sdcli.upscale.names import choose
    from sdcli.upscale.resize import HiresUpscaler

    from sdcli.loading.residency import stamps

    choice = choose(cfg.hires_upscaler, cfg.upscaler_dir)
    if choice.kind != "model":
        return HiresUpscaler(choice)
    # the file's stamp in the key: a process that runs again (serve, a test) must not keep a network whose file
    # was replaced since, while the metadata records the new file's hash
    key = (str(choice.path), tuple(stamps([choice.path]).values()), models.dtype, models.device)
    if key not in _MODELS:
        from sdcli.upscale.files import load_upscaler

        _MODELS.clear()  # one run, one hires upscaler
        console.info(f"hires upscaler: {choice.path}")
        _MODELS[key] = load_upscaler(choice.path, models.dtype, models.device)
    return HiresUpscaler(choice, _MODELS[key])


_MODELS: dict = {}


def check_upscalers(jobs: list[Job]) -> None:
    """Every hires upscaler the jobs name, found (exit 4 naming the file and where it was looked for) and known
    to be an upscaler (exit 3 / 8): said before the (slow) model load. Imports torch only for a model file."""
    from sdcli.upscale.names import choose

    checked = set()
    for job in jobs:
        if job.cfg.hires_scale == 1.0:
            continue
        choice = choose(job.cfg.hires_upscaler, job.cfg.upscaler_dir)
        if choice.kind == "model" and choice.path not in checked:
            from sdcli.upscale.files import inspect_upscaler

            inspect_upscaler(choice.path)
            checked.add(choice.path)


def run(models, hires: Hires | None, latents, cond, uncond, seeds: list[int], draws, callback=None, noise=None):
    """The hires fix's pass 2 on pass 1's `latents` (text to image or img2img), drawing from pass 1's generators
    `draws` or, with `gpu` / `nv` noise, new ones at its size as A1111 does; the latents as they are without one."""
    from sdcli import pipeline

    if hires is None:
        return latents
    if noise is not None and noise.fresh_hires_noise:
        down = models.family.latent.downscale
        big = (models.family.latent.channels, hires.size[0] // down, hires.size[1] // down)
        draws = pipeline.image_noise(models, seeds, big, noise)
    cond, uncond = hires.conds or (cond, uncond)
    with console.stage("sampling pass 2 (hires fix)"):
        return pipeline.hires_fix(models, hires.plan, latents, cond, uncond, draws, hires.strength, hires.size,
                                  callback, hires.upscaler)  # fmt: skip
