"""Skip-layer guidance (SLG) of SD3.5: on some steps a third pass runs the prompt with a few joint blocks skipped,
and the guided prediction moves away from it: x0 = cfg(x0) + scale * (x0_cond - x0_skipped). The skipped blocks
(7, 8, 9), the step window (from 1% to 20% of the steps) and the names (--slg-scale, --skip-layers, --slg-start,
--slg-end) are stable-diffusion.cpp's; the step rule is diffusers' (StableDiffusion3Pipeline: step i of N runs
the pass when N * start < i < N * end, and only under CFG). The pass is linear in the prediction, so mixing x0
(= x - sigma v) is mixing v as diffusers does.
Upstream: diffusers pipeline_stable_diffusion_3.py (skip_guidance_layers); stable-diffusion.cpp
stable-diffusion.cpp (sample(), slg); ComfyUI comfy_extras/nodes_slg.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from sdcli.runtime.errors import UsageError
from sdcli.sampling.denoise import CFGDenoiser

DEFAULT_LAYERS = "7,8,9"


@dataclass(frozen=True)
class SkipLayerGuidance:
    scale: float
    layers: tuple[int, ...]
    start: float = 0.01  # fractions of the steps
    end: float = 0.2

    def steps(self, n: int) -> set[int]:
        """The step indices (0-based, of n) that run the skipped pass: diffusers' strict window."""
        return {i for i in range(n) if n * self.start < i < n * self.end}


def parse_layers(text: str | tuple | list) -> tuple[int, ...]:
    """"7,8,9", "[7, 8, 9]" (as infotexts write them) or a list -> (7, 8, 9); UsageError for anything else."""
    if isinstance(text, (tuple, list)):
        items = [str(v) for v in text]
    else:
        items = [v for v in str(text).strip().strip("[]").replace(" ", ",").split(",") if v]
    try:
        layers = tuple(int(v) for v in items)
    except ValueError:
        raise UsageError(f"--skip-layers {text!r}: give block indices like 7,8,9") from None
    if not layers or min(layers) < 0:
        raise UsageError(f"--skip-layers {text!r}: give one or more block indices (0 or more) like 7,8,9")
    return tuple(sorted(set(layers)))


def skip_layer_guidance(scale: float, layers, start: float, end: float, family, depth: int | None,
                        cfg: float) -> SkipLayerGuidance | None:
    """The run's SLG, None when off (scale 0). Refused (exit 2) on a family whose network cannot skip blocks, for
    blocks it does not have, for an empty window, and without CFG (the pass is part of the guidance)."""
    if scale == 0:
        return None
    if not family.skip_layer_guidance:
        raise UsageError(f"--slg-scale: skip-layer guidance is for SD3 / SD3.5 (MMDiT) models, not {family.title}")
    slg = SkipLayerGuidance(float(scale), parse_layers(layers), float(start), float(end))
    if depth is not None and max(slg.layers) >= depth:
        raise UsageError(f"--skip-layers {','.join(map(str, slg.layers))}: this model has joint blocks 0 to "
                         f"{depth - 1}")
    if not slg.start < slg.end:
        raise UsageError(f"--slg-start {slg.start} must be below --slg-end {slg.end}")
    if cfg <= 1:
        raise UsageError("--slg-scale needs CFG above 1 (the skipped pass is part of classifier-free guidance)")
    return slg


class SkipLayerCFG(CFGDenoiser):
    """CFGDenoiser plus the skipped pass: `skipping(x, sigma, cond) -> x0` is the denoiser over the network with
    the blocks skipped; an evaluation belongs to the step whose sigma interval [sigmas[i], sigmas[i+1]) holds its
    sigma (a first-order sampler evaluates at sigmas[i] exactly)."""

    def __init__(self, denoiser, cond, uncond, scale: float, rescale: float, skipping: Callable[..., Tensor],
                 slg: SkipLayerGuidance, sigmas: Tensor):
        super().__init__(denoiser, cond, uncond, scale, rescale)
        self.skipping, self.slg = skipping, slg
        self.sigmas = sigmas.float().cpu()
        self.active = slg.steps(len(sigmas) - 1)

    def step_of(self, sigma: Tensor) -> int:
        s = float(sigma.reshape(-1)[0])
        return int((self.sigmas[:-1] >= s).sum()) - 1

    def combine(self, x: Tensor, sigma: Tensor, cond, x0_u: Tensor, x0_c: Tensor) -> Tensor:
        x0 = super().combine(x, sigma, cond, x0_u, x0_c)
        if self.step_of(sigma) not in self.active:
            return x0
        return x0 + self.slg.scale * (x0_c - self.skipping(x, sigma, cond))  # (B, C, H, W)


__all__ = ["DEFAULT_LAYERS", "SkipLayerCFG", "SkipLayerGuidance", "parse_layers", "skip_layer_guidance"]
