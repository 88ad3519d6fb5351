"""Shared pieces for the schedule / denoiser / sampler tests: a deterministic stand-in UNet and a
driver for diffusers schedulers (the oracle).

The stand-in is "a UNet whose x0 prediction is D(x, sigma)": eps(x_in, t) = (x - D(x, sigma)) / sigma with
sigma = sigma(t) and x = x_in * sqrt(sigma^2 + 1). D is smooth and nonlinear, so a sampler that gets any
coefficient wrong drifts away from diffusers. Both worlds call the same eps function with the timestep
they would give a real UNet.
"""

from __future__ import annotations

import torch

from sdcli.sampling.schedule import t_to_sigma

SHAPE = (4, 8, 8)  # latent shape per image


def diffusers_alphas_cumprod() -> torch.Tensor:
    """The SD1.5 training schedule as diffusers builds it (float32): what the diffusers oracles use."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


AC = diffusers_alphas_cumprod()
SIGMAS = ((1 - AC.double()) / AC.double()) ** 0.5


def x0_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Deterministic nonlinear 'ideal denoiser' stand-in. sigma: (B,) float64 or float32."""
    s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
    xd = x.to(torch.float64)
    out = 0.3 + 0.8 / (0.8 + s**2) * (xd - 0.3) + 0.1 * torch.sin(1.3 * xd) / (1 + s)
    return out.to(x.dtype)


def eps_unet(x_in: torch.Tensor, t, cond=None) -> torch.Tensor:
    """Stand-in eps-UNet: unet(x_in, t, cond) -> eps, consistent with x0_fn. cond is ignored."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_in.shape[0])
    sigma = t_to_sigma(t, SIGMAS)  # (B,) float64
    s = sigma.reshape(-1, 1, 1, 1)
    x = x_in.to(torch.float64) * (s**2 + 1) ** 0.5
    return ((x - x0_fn(x, sigma).to(torch.float64)) / s).to(x_in.dtype)


def v_unet(x_in: torch.Tensor, t, cond=None) -> torch.Tensor:
    """Stand-in v-UNet with the same x0: v = alpha * eps - sigma_vp * x0."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_in.shape[0])
    sigma = t_to_sigma(t, SIGMAS).reshape(-1, 1, 1, 1)
    alpha, sig_vp = (sigma**2 + 1) ** -0.5, sigma * (sigma**2 + 1) ** -0.5
    eps = eps_unet(x_in, t).to(torch.float64)
    x = x_in.to(torch.float64) / alpha
    return (alpha * eps - sig_vp * x0_fn(x, sigma.reshape(-1)).to(torch.float64)).to(x_in.dtype)


def seeded(seed: int) -> tuple[torch.Generator, torch.Tensor]:
    """A CPU generator after the initial-noise draw, and that noise (1, C, H, W): the pipeline's order."""
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn((1, *SHAPE), generator=g, dtype=torch.float32)


def run_diffusers(sched, latents: torch.Tensor, generator=None, t_for_model=None, unet=eps_unet) -> torch.Tensor:
    """The standard diffusers loop: scale_model_input, UNet, step. t_for_model(sched, t) overrides the
    timestep the UNet sees (for schedulers that round it, where we do not)."""
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t)
        t_model = t if t_for_model is None else t_for_model(sched, t)
        out = unet(x_in, t_model)
        kwargs = {"generator": generator} if generator is not None else {}
        latents = sched.step(out, t, latents, **kwargs).prev_sample
    return latents
