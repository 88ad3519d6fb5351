"""Inpainting with any model: the denoiser's x0 is pinned to the original latent wherever the mask keeps it.

AUTOMATIC1111's k-diffusion path (modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward, "Blend in the original
latents (after)", and processing.py StableDiffusionProcessingImg2Img.sample): after classifier-free guidance,
    denoised = denoised * nmask + init_latent * mask      (mask: 1 = keep, nmask = 1 - mask, both 0/1)
and once more on the sampler's result. The original is blended in clean, not re-noised: a sampler that moves x
towards x0 keeps the known area on the path init + sigma * noise by itself. For Euler with a 0/1 mask this is
exactly diffusers' StableDiffusionInpaintPipeline with a 4-channel UNet, which instead sets the known area of
the latent to `scheduler.add_noise(init, noise, t_next)` after each step: in the kept area x_i = init + s_i * n,
so x_{i+1} = x_i + (x_i - init) / s_i * (s_{i+1} - s_i) = init + s_{i+1} * n.

Nothing here knows the family or the sampler: it wraps any `model(x, sigma) -> x0`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class MaskedDenoiser:
    """`model(x, sigma) -> x0` with the kept area's x0 replaced by the original latent. `original`: (1 or B, C, h,
    w) scaled latents; `keep`: (1 or B, 1 or C, h, w), 1 = keep, 0 = repaint (a soft mask blends)."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], original: Tensor, keep: Tensor):
        self.model, self.original, self.keep = model, original, keep

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        # x: (B, C, h, w) at sigma: (B,)
        return blend(self.model(x, sigma), self.original, self.keep)


def blend(x: Tensor, original: Tensor, keep: Tensor) -> Tensor:
    """x where it repaints, the original where it keeps, in A1111's order (x * nmask + original * mask)."""
    keep = keep.to(x)
    return x * (1 - keep) + original.to(x) * keep


def masked_start(original: Tensor, keep: Tensor, fill: str, noise: Tensor | None = None) -> Tensor:
    """The latent img2img starts from, for A1111's latent "Masked content" (processing.py init): "latent-noise"
    puts `noise` (B, C, h, w) in the repainted area, "latent-nothing" zeros; anything else is the original.
    (A1111 draws that noise from the first seeds of the run; here each image's own seed, so image k of a batch
    stays a single run with seed + k.)"""
    if fill == "latent-noise":
        return original * keep + noise * (1 - keep)  # processing.py: init_latent * mask + noise * nmask
    if fill == "latent-nothing":
        return original * keep
    return original


def seed_noise(seeds: list[int], shape: tuple[int, ...], source: str = "cpu") -> Tensor:
    """(B, *shape) fp32: a fresh generator of the noise source (sampling/rng.py) per seed, drawn once (A1111's
    create_random_tensors: the same numbers as the first draw of each image's noise, without a variation)."""
    if source != "cpu":
        from sdcli.sampling.rng import randn

        return torch.stack([randn(s, shape, source) for s in seeds])
    draws = [torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return torch.cat(draws)
