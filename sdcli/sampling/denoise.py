"""Denoisers: turn a UNet (eps- or v-prediction, discrete timesteps) into x0 = D(x, sigma).

This is the one place that knows about prediction types, the sigma <-> timestep map and input scaling;
samplers only ever see `model(x, sigma) -> x0` (k-diffusion external.py, sgm denoiser_scaling.py).

Scalings (sigma_data = 1, k-diffusion `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`):
    c_in  = 1 / sqrt(sigma^2 + 1)         the UNet sees the variance-preserving latent x * c_in
    eps:  x0 = x - sigma * F              (c_skip = 1,                  c_out = -sigma)
    v:    x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * F
where F is the UNet output and x = x0 + sigma * noise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from sdcli.sampling.conditioning import Cond, as_cond, cat
from sdcli.runtime.errors import UsageError
from sdcli.text.editing import ScheduledCond
from sdcli.sampling.schedule import model_sigmas, sigma_to_t

PREDICTIONS = ("eps", "v")


class Denoiser:
    """Wrap `unet(x_in, t, context, **optional) -> eps or v` as `denoiser(x, sigma, cond) -> x0`; `cond` is a
    conditioning.Cond (or a bare context tensor)."""

    def __init__(self, unet: Callable[..., Tensor], alphas_cumprod: Tensor,
                 prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise UsageError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.unet = unet
        self.prediction = prediction
        self.sigmas = model_sigmas(alphas_cumprod)  # (1000,) float64 CPU, ascending

    def scalings(self, sigma: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in), each (B, 1, 1, 1) in x's dtype: x0 = c_skip * x + c_out * unet(c_in * x)."""
        s = sigma.to(x.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_in = (s * s + 1) ** -0.5
        if self.prediction == "eps":
            c_skip, c_out = torch.ones_like(s), -s
        else:
            c_skip, c_out = 1 / (s * s + 1), -s * c_in
        return c_skip.to(x.dtype), c_out.to(x.dtype), c_in.to(x.dtype)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | Tensor | None) -> Tensor:
        # x: (B, C, H, W) at noise level sigma: (B,) or scalar; cond: Cond with context (B, T, D)
        cond = as_cond(cond)
        sigma = _batch_sigma(sigma, x)
        c_skip, c_out, c_in = self.scalings(sigma, x)
        t = sigma_to_t(sigma, self.sigmas)  # (B,) fractional, not rounded
        x_in = x * c_in
        if cond.concat is not None:
            # after the c_in scaling: only the noisy latent is scaled (diffusers concatenates after
            # scheduler.scale_model_input)
            x_in = torch.cat([x_in, cond.concat.to(x_in)], dim=1)  # (B, C + C', H, W)
        out = self.unet(x_in, t, cond.context, **cond.unet_kwargs(sigma))  # (B, C, H, W) eps or v
        return c_skip * x + c_out * out


class LCMDenoiser(Denoiser):
    """A Latent Consistency Model: x0 = c_skip(t) * x_in + c_out(t) * x0_pred (the consistency boundary
    condition, sigma_data = 0.5, timestep scaling 10), as diffusers LCMScheduler.step applies it to the
    variance-preserving sample x_in. It only matters at small t (c_skip < 1e-6 for t > 50)."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | Tensor | None) -> Tensor:
        # x: (B, C, H, W); sigma: (B,) or scalar
        sigma = _batch_sigma(sigma, x)
        x0 = super().__call__(x, sigma, cond)
        _, _, c_in = self.scalings(sigma, x)
        scaled = (sigma_to_t(sigma, self.sigmas) * 10.0).reshape(c_in.shape)  # (B, 1, 1, 1)
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        return (c_out * x0 + c_skip * x * c_in).to(x.dtype)


def _batch_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Sigma as a (B,) float32 tensor on x's device (a scalar is broadcast over the batch)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma


def guided(scale: float) -> bool:
    """Whether classifier-free guidance runs the negative pass at all: only above 1, as diffusers
    (`do_classifier_free_guidance = guidance_scale > 1`) and the Turbo / LCM model cards mean `cfg 0` or `1`. At
    or below 1 the conditional prediction is used alone: one UNet call per step, no negative prompt encoded.
    (A1111 still extrapolates below 1: uncond + scale * (cond - uncond); at 0 that is the negative's prediction.)"""
    return float(scale) > 1.0


DENOISERS = {"eps": Denoiser, "v": Denoiser, "lcm": LCMDenoiser}  # by ModelInfo.denoiser


def _match_batch(c: Cond | Tensor, n: int) -> Cond | Tensor:
    """Conditioning for n images: a batch of 1 is repeated, anything else must already be n. A bare context
    tensor stays a tensor: what the denoiser is given keeps the caller's form."""
    batch = as_cond(c).batch
    if batch == n:
        return c
    if batch == 1:
        return c.map(_expand(n)) if isinstance(c, Cond) else _expand(n)(c)
    raise UsageError(f"conditioning batch {batch} does not match latent batch {n}")


def _expand(n: int):
    return lambda t: t.expand(n, *t.shape[1:])


def _cat(conds: list) -> Cond | Tensor:
    """[uncond; cond] field by field (Cond) or along the batch (bare context tensors)."""
    if any(isinstance(c, Cond) for c in conds):
        return cat([as_cond(c) for c in conds])
    return torch.cat(conds)


def _scheduled(cond, evaluation: int):
    """A conditioning tensor, or from a prompt-editing schedule the one in force at this evaluation."""
    return cond.at(evaluation) if isinstance(cond, ScheduledCond) else cond


class CFGDenoiser:
    """Classifier-free guidance over a `Denoiser`: `cfg(x, sigma) -> x0`.

    uncond and cond (conditioning.Cond, or bare context tensors; either may be a prompt-editing schedule) go
    through the UNet in one batched call, [uncond; cond] field by field, unless their token lengths differ (then
    two calls: padding one prompt to the other's length would change its encoding). Nothing else in them is read.
    With scale <= 1 (see `guided`) or no uncond only cond is run. guidance rescale (phi, Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 2) is applied to the UNet's own output
    (eps or v), exactly as diffusers `rescale_noise_cfg`, by undoing the linear x0 scaling.
    """

    def __init__(self, denoiser: Denoiser, cond, uncond, scale: float,
                 rescale: float = 0.0):
        if not 0.0 <= rescale <= 1.0:
            raise UsageError(f"guidance rescale must be between 0 and 1, got {rescale}")
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.scale, self.rescale = float(scale), float(rescale)
        self.evaluations = 0  # model evaluations so far: where a prompt-editing schedule stands

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        # x: (B, C, H, W); sigma: (B,) or scalar
        sigma = _batch_sigma(sigma, x)
        b = x.shape[0]
        cond, uncond = (_scheduled(c, self.evaluations) for c in (self.cond, self.uncond))
        self.evaluations += 1
        cond = _match_batch(cond, b)
        if uncond is None or not guided(self.scale):
            return self.denoiser(x, sigma, cond)
        uncond = _match_batch(uncond, b)
        if as_cond(uncond).layout() == as_cond(cond).layout():
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), _cat([uncond, cond]))
            x0_u, x0_c = both.chunk(2)  # (B, C, H, W) each
        else:
            x0_u, x0_c = self.denoiser(x, sigma, uncond), self.denoiser(x, sigma, cond)
        return self.combine(x, sigma, cond, x0_u, x0_c)

    def combine(self, x: Tensor, sigma: Tensor, cond, x0_u: Tensor, x0_c: Tensor) -> Tensor:
        """The guided x0 from the two predictions (sampling/slg.py adds a third pass here)."""
        x0 = x0_u + self.scale * (x0_c - x0_u)
        return self._rescale(x, sigma, x0, x0_c) if self.rescale > 0 else x0

    def _rescale(self, x: Tensor, sigma: Tensor, x0_cfg: Tensor, x0_cond: Tensor) -> Tensor:
        # diffusers pipeline_stable_diffusion.rescale_noise_cfg, in the UNet's output space F.
        c_skip, c_out, _ = self.denoiser.scalings(sigma, x)
        f_cfg, f_cond = (x0_cfg - c_skip * x) / c_out, (x0_cond - c_skip * x) / c_out
        dims = list(range(1, x.ndim))
        f_rescaled = f_cfg * (f_cond.std(dim=dims, keepdim=True) / f_cfg.std(dim=dims, keepdim=True))
        f = self.rescale * f_rescaled + (1 - self.rescale) * f_cfg
        return c_skip * x + c_out * f
