"""SDXL's passes beyond one model: the size/crop vector y each pass conditions on, and the refiner taking the
sampling over at the switch (diffusers' denoising_end/denoising_start ensemble, A1111's "Refiner switch at").

render.py calls these; nothing here branches on a family's name (the family says whether it has a vector y).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdcli.runtime import console
from sdcli.config import RunConfig
from sdcli.runtime.errors import UsageError
from sdcli.jobs import Job


@dataclass(frozen=True)
class Refiner:
    """The refiner's part of one job: its models, its part of the plan, its conditioning (its own text encoder
    and vector y)."""

    models: Any
    plan: Any  # pipeline.SamplingPlan: the sigmas from the switch on
    cond: Any
    uncond: Any
    steps_before: int  # steps the base model ran, for the progress count


def load_refiner(cfg: RunConfig, models):
    """The --refiner checkpoint, loaded once beside the base model, or None. Its latent space must be the base's:
    it continues the base's latents. Its VAE (or --vae) decodes what it finished, as in A1111 (the refiner is then
    the loaded model) and diffusers' ensemble."""
    from sdcli.loading import checkpoint

    if not cfg.refiner:
        return None
    console.info(f"loading refiner {cfg.refiner}")
    placement = models.placement
    refiner = checkpoint.load_models(cfg.refiner, cfg.vae, placement.dtype, placement.device, None, placement,
                                     models.parts.policy)
    refiner.parts.join(models.parts)  # one run: a stage of either acts on the parts of both
    if refiner.family.latent != models.family.latent or refiner.info.inpaint:
        raise UsageError(f"--refiner {cfg.refiner} ({refiner.family.title}) cannot continue the latents of "
                         f"{cfg.model} ({models.family.title}): another latent space or an inpainting model")
    return refiner


def check_refiner_use(cfg: RunConfig, txt2img: bool) -> None:
    """The refiner continues a text-to-image first pass; other passes are refused before any load."""
    if not cfg.refiner:
        return
    if not txt2img:
        raise UsageError("--refiner continues a text-to-image render: not with img2img, --latent-in or --cond")
    if cfg.hires_scale != 1.0 or cfg.seamless or getattr(cfg, "ray", None):
        raise UsageError("--refiner with --hires-scale, --seamless or --ray is not supported yet: use one of them")


def refiner_part(models, cfg: RunConfig, job: Job, plan, negative: str | None, size: tuple[int, int],
                 steps_before: int) -> Refiner | None:  # fmt: skip
    """The refiner's plan and conditioning, or None when the switch leaves it no step."""
    from sdcli import pipeline
    from sdcli.sampling.conditioning import conditioning

    if plan is None:
        return None
    conds = pipeline.encode_scheduled(models, job.text, negative, cfg.steps, cfg.clip_skip)
    cond, uncond = (after(c, steps_before) for c in sized(models, cfg, conds, size))
    return Refiner(models, plan, conditioning(cond), None if uncond is None else conditioning(uncond), steps_before)


def after(value, steps: int):
    """A prompt-editing schedule as seen by a sampler that starts `steps` evaluations in (the refiner counts its
    evaluations from 0; the schedule counts them over the whole run, as A1111's continuing sampler does)."""
    from sdcli.text.editing import ScheduledCond

    if not isinstance(value, ScheduledCond):
        return value
    entries = tuple((end - steps, c) for end, c in value.entries if end - steps >= 0)
    return ScheduledCond(entries or value.entries[-1:])


def decoder(models, refiner: Refiner | None):
    """The models whose VAE decodes a job's latents: the refiner's when it finished them (see load_refiner)."""
    return refiner.models if refiner is not None else models


def size_cond(cfg: RunConfig, size: tuple[int, int]):
    """SDXL's size/crop conditioning for a pass rendering `size` (H, W): the configured sizes, else that size."""
    from sdcli.config import pair_of
    from sdcli.families.base import SizeCond

    def pair(key: str, default: tuple[int, int]) -> tuple[int, int]:
        value = getattr(cfg, key)
        return default if value is None else pair_of(key, value)

    return SizeCond(original=pair("original_size", size), crop=pair("crop_coords", (0, 0)),
                    target=pair("target_size", size), aesthetic=cfg.aesthetic_score,
                    negative_aesthetic=cfg.negative_aesthetic_score)


def sized(models, cfg: RunConfig, conds: tuple, size: tuple[int, int]) -> tuple:
    """(cond, uncond) with the family's vector y for a pass rendering `size` (unchanged for families without;
    an absent uncond stays absent)."""
    from sdcli import pipeline

    at = size_cond(cfg, size)
    return (pipeline.with_size_vector(models, conds[0], at), pipeline.with_size_vector(models, conds[1], at, True))
