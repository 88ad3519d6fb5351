"""Flow matching (rectified flow: SD3 / SD3.5, FLUX.1): sigma schedules, img2img noising, the denoiser, samplers.

A flow model sees x = (1 - sigma) * x0 + sigma * noise with sigma in [0, 1] and predicts the velocity
v = noise - x0, so the clean image is x0 = x - sigma * v (ComfyUI model_sampling.CONST). In sdcli's k-diffusion
shape the denoiser returns that x0, and the probability-flow ODE is

    dx/dsigma = v = (x - x0) / sigma

exactly the form the variance-exploding samplers integrate. So every deterministic sampler of sampling.samplers
(euler, heun, dpm2, lms, dpm++_2m, ddim, plms, unipc) runs a flow model unchanged, as ComfyUI runs them. Samplers
that add noise assume x = x0 + sigma * noise, which a flow model's x is not (run as they are, the signal keeps
growing: the result's mean drifts far off). They need the variants here (`FLOW_VARIANTS`), where the signal is
rescaled to (1 - sigma) when noise is put back: euler_a, dpm2_a and dpm++_2s_a as ComfyUI's "_RF" samplers,
dpm++_2m_sde in half-log-SNR, lcm with the flow forward process. dpm++_sde has none yet (`NO_FLOW_VARIANT`).

Schedules reproduce diffusers' FlowMatchEulerDiscreteScheduler sigmas bit for bit, dtype quirks included.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from sdcli.runtime.errors import UsageError
from sdcli.sampling.samplers import Model, Noise, _Stepper

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' flow schedulers: sigma = t / 1000
SD3_SHIFT = 3.0  # SD3 / SD3.5 scheduler_config.json "shift"
SD3_TIMESTEP_SCALE = 1000.0  # SD3's MMDiT is given t = sigma * 1000
FLUX_TIMESTEP_SCALE = 1.0  # Flux is given t = sigma and scales by 1000 inside (models/flux.py)


# ----------------------------------------------------------------------------- sigma schedules

def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """Constant time shift sigma' = s * sigma / (1 + (s - 1) * sigma) (SD3 paper eq. 23; ComfyUI time_snr_shift;
    diffusers FlowMatchEulerDiscreteScheduler), in the sigmas' own dtype."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_mu(image_seq_len: int, base_seq: int = 256, max_seq: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:  # fmt: skip
    """Flux's resolution-dependent shift: linear in the number of image tokens, 0.5 at 256 tokens (512 px) and
    1.15 at 4096 (1024 px), extrapolated outside (diffusers pipeline_flux `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    b = base_shift - m * base_seq
    return image_seq_len * m + b


def time_shift_exponential(mu: float, sigmas: Tensor) -> Tensor:
    """sigma' = e^mu / (e^mu + (1 / sigma - 1)) (BFL sampling.py time_shift with sigma = 1; diffusers
    `_time_shift_exponential`), computed as diffusers does on its float32 sigmas: e^mu rounded to the sigmas'
    dtype, one rounding per operation. sigma = 0 maps to 0."""
    e = torch.tensor(math.exp(mu), dtype=sigmas.dtype)
    return torch.div(e, e + (1 / sigmas - 1))  # an explicit tensor division: `float / tensor` rounds twice


def _finish(sigmas: Tensor) -> Tensor:
    """float32 sigmas with the terminal 0.0 appended (every sdcli schedule ends with the clean image)."""
    sigmas = sigmas.to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sd3_sigmas(steps: int, shift: float = SD3_SHIFT) -> Tensor:
    """(steps + 1,) float32 sigmas of diffusers' SD3 pipelines (FlowMatchEulerDiscreteScheduler(shift)).

    diffusers' quirk, kept: the unshifted timesteps are spaced from 1000 down to 1000 * sigma_min, where
    sigma_min is the scheduler table's smallest sigma ALREADY shifted (shift(1/1000), 0.002994 at shift 3), and
    the spaced values are then shifted again. 4 steps: 1, 0.857692, 0.602151, 0.008929, 0.
    """
    _check_steps(steps)
    table_min = shift_sigmas(torch.tensor([1.0]) / NUM_TRAIN_TIMESTEPS, shift)  # float32, as the table is built
    timesteps = np.linspace(1.0 * NUM_TRAIN_TIMESTEPS, table_min.item() * NUM_TRAIN_TIMESTEPS, steps)  # float64
    sigmas = torch.from_numpy(timesteps / NUM_TRAIN_TIMESTEPS)
    return _finish(shift_sigmas(sigmas, shift))  # shifted in float64, then rounded to float32


def flux_sigmas(steps: int, image_seq_len: int, dynamic: bool = True, shift: float = 1.0) -> Tensor:
    """(steps + 1,) float32 sigmas of diffusers' FluxPipeline: linspace(1, 1/steps, steps) in float32, then the
    resolution shift `time_shift_exponential(flux_mu(image_seq_len))` (dev: dynamic) or the constant `shift`
    (schnell: shift 1.0, the plain linspace). image_seq_len = (height / 16) * (width / 16) in pixels."""
    _check_steps(steps)
    sigmas = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps).astype(np.float32))
    if dynamic:
        return _finish(time_shift_exponential(flux_mu(image_seq_len), sigmas))
    return _finish(shift_sigmas(sigmas, shift))


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps}")


# ----------------------------------------------------------------------------- img2img

def img2img_start(steps: int, strength: float) -> int:
    """Index of the first sigma an img2img at `strength` runs from: diffusers' SD3 / Flux img2img `get_timesteps`
    (t_start = int(steps - min(steps * strength, steps))), so it runs steps - t_start steps: 3 at 4 x 0.6 (the SD
    pipelines' rounding runs 2)."""
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength must be between 0 and 1, got {strength}")
    return int(max(steps - min(steps * strength, steps), 0))


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a full schedule (steps + 1 sigmas, ending with 0) that an img2img at `strength` runs."""
    start = img2img_start(len(sigmas) - 1, strength)
    if start >= len(sigmas) - 1:
        raise UsageError(f"strength {strength} leaves no step out of {len(sigmas) - 1}: raise strength or steps")
    return sigmas[start:]


def noise_latent(latent: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """The flow forward process x = sigma * noise + (1 - sigma) * latent (diffusers `scale_noise`, ComfyUI CONST
    noise_scaling), in the latent's dtype. txt2img is the case latent = 0, sigma = 1: x = noise."""
    s = torch.as_tensor(sigma, dtype=latent.dtype, device=latent.device)
    s = s.reshape(-1, *([1] * (latent.ndim - 1))) if s.ndim else s
    return s * noise + (1.0 - s) * latent


# ----------------------------------------------------------------------------- denoiser

class FlowDenoiser:
    """Wrap a velocity model `model(x, t, cond) -> v` as `denoiser(x, sigma, cond) -> x0 = x - sigma * v`.

    `timestep_scale` maps sigma to the model's t: 1000 for SD3 (diffusers passes timesteps = sigma * 1000),
    1 for Flux (its time embedding scales by 1000 itself; BFL and ComfyUI pass sigma as is). There is no input
    scaling (c_in = 1). `scalings` gives CFGDenoiser's rescale the same (c_skip, c_out, c_in) view as Denoiser.
    """

    def __init__(self, model: Callable[..., Tensor], timestep_scale: float):
        self.model = model
        self.timestep_scale = float(timestep_scale)

    def scalings(self, sigma: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) = (1, -sigma, 1), each (B, 1, ..., 1) in x's dtype: x0 = x - sigma * model(x)."""
        s = sigma.to(x.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.ones_like(s).to(x.dtype), (-s).to(x.dtype), torch.ones_like(s).to(x.dtype)

    def __call__(self, x: Tensor, sigma: Tensor | float, cond=None) -> Tensor:
        # x: (B, C, H, W) at noise level sigma: (B,) or scalar
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        t = sigma * self.timestep_scale  # (B,) float32; * 1.0 is exact, so Flux gets sigma itself
        v = self.model(x, t, cond)  # (B, C, H, W) velocity
        return x - v * sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


# ----------------------------------------------------------------------------- samplers that add noise

def _rf_ancestral(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """(sigma_down, signal rescale, renoise) of an eta = 1 ancestral step of a flow model (ComfyUI's "_RF"
    samplers): go down the ODE to sigma_down = sigma_next^2 / sigma, then x <- rescale * x + renoise * noise
    brings the signal from (1 - sigma_down) back to (1 - sigma_next) and the noise up to sigma_next exactly."""
    down = sigma_next * sigma_next / sigma  # downstep ratio 1 + (s'/s - 1) * eta with eta = 1
    alpha_next, alpha_down = 1 - sigma_next, 1 - down
    renoise = (sigma_next**2 - down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return down, alpha_next / alpha_down, renoise


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) = log((1 - sigma) / sigma) of a flow noise level (ComfyUI sigma_to_half_log_snr
    for CONST); -inf at sigma = 1."""
    return -math.inf if sigma >= 1 else math.log1p(-sigma) - math.log(sigma)


def sample_euler_a_flow(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None) -> Tensor:
    """Euler ancestral for flow models, eta = 1 (ComfyUI k_diffusion sample_euler_ancestral_RF): an Euler step
    to sigma_down, then the flow renoising of `_rf_ancestral`. Lands on x0 at the end. One noise() per step but
    the last."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            down, rescale, renoise = _rf_ancestral(s[i], s[i + 1])
            x = (down / s[i]) * x + (1 - down / s[i]) * denoised  # the Euler step x + d * (down - sigma)
            x = rescale * x + noise() * renoise
        run.done(i, x, denoised)
    return x


def sample_dpm2_a_flow(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None) -> Tensor:
    """Ancestral DPM-Solver-2 for flow models (ComfyUI sample_dpm_2_ancestral_RF): sdcli's dpm2_a step (midpoint
    in log-sigma) down to sigma_down, then the flow renoising. One noise() per step but the last."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        d = (x - denoised) / s[i]
        if s[i + 1] == 0:
            x = x + d * (0 - s[i])
        else:
            down, rescale, renoise = _rf_ancestral(s[i], s[i + 1])
            mid = math.exp((math.log(s[i]) + math.log(down)) / 2)
            x_2 = x + d * (mid - s[i])
            x = x + (x_2 - run(x_2, mid)) / mid * (down - s[i])
            x = rescale * x + noise() * renoise
        run.done(i, x, denoised)
    return x


def sample_dpmpp_2s_a_flow(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None) -> Tensor:
    """DPM-Solver++(2S) ancestral for flow models (ComfyUI sample_dpmpp_2s_ancestral_RF): the intermediate point
    sits halfway in half-log-SNR between sigma and sigma_down (at 0.9999 when sigma = 1, where that is -inf, as
    ComfyUI), then the flow renoising. One noise() per step but the last."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            down, rescale, renoise = _rf_ancestral(s[i], s[i + 1])
            lam = (_half_log_snr(s[i]) + _half_log_snr(down)) / 2
            mid = 0.9999 if s[i] == 1.0 else 1 / (math.exp(lam) + 1)
            x_2 = (mid / s[i]) * x + (1 - mid / s[i]) * denoised
            x = (down / s[i]) * x + (1 - down / s[i]) * run(x_2, mid)
            x = rescale * x + noise() * renoise
        run.done(i, x, denoised)
    return x


def sample_dpmpp_2m_sde_flow(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint, eta = 1, for flow models: k-diffusion sample_dpmpp_2m_sde written with the
    half-log-SNR lambda = log((1 - sigma) / sigma) and signal scale alpha = 1 - sigma, as ComfyUI runs it for CONST
    models. With alpha = 1 and lambda = -log(sigma) it is samplers.sample_dpmpp_2m_sde.

    From sigma = 1 (lambda = -inf) the step is its exact limit, x = alpha' * x0 + sigma' * noise, with no
    second-order term after it; ComfyUI instead moves the first sigma to just under 1 (offset_first_sigma_for_snr).
    Independent noise per step, as sdcli's VE version. One noise() per step but the last.
    """
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    old, h_last = None, None
    for i in range(run.total):
        denoised = run(x, s[i])
        if s[i + 1] == 0:
            x, h = denoised, None
        else:
            h = _half_log_snr(s[i + 1]) - _half_log_snr(s[i])  # > 0; inf from sigma = 1
            decay = math.exp(-h)  # e^-h: 0 from sigma = 1
            alpha = 1 - s[i + 1]
            x = (s[i + 1] / s[i]) * decay * x + alpha * -math.expm1(-2 * h) * denoised
            if old is not None and h_last is not None and math.isfinite(h_last):
                x = x + 0.5 * alpha * -math.expm1(-2 * h) * (h / h_last) * (denoised - old)
            x = x + noise() * (s[i + 1] * math.sqrt(-math.expm1(-2 * h)))
        old, h_last = denoised, h
        run.done(i, x, denoised)
    return x


def sample_lcm_flow(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None) -> Tensor:
    """LCM sampling for flow models: jump to x0, re-noise with the flow forward process x = (1 - s') x0 + s' noise
    (ComfyUI sample_lcm with CONST noise_scaling; diffusers FlowMatchEulerDiscreteScheduler with
    stochastic_sampling=True). One noise() per step but the last."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        x = denoised if s[i + 1] == 0 else noise_latent(denoised, noise(), s[i + 1])
        run.done(i, x, denoised)
    return x


# sdcli sampler name -> its flow variant; samplers not listed run flow models unchanged (see the module docstring),
# except those in NO_FLOW_VARIANT
FLOW_VARIANTS: dict[str, Callable[..., Tensor]] = {
    "euler_a": sample_euler_a_flow,
    "dpm2_a": sample_dpm2_a_flow,
    "dpm++_2s_a": sample_dpmpp_2s_a_flow,
    "dpm++_2m_sde": sample_dpmpp_2m_sde_flow,
    "lcm": sample_lcm_flow,
}
# stochastic samplers whose VE noise injection is wrong for flow models and that have no flow variant yet
NO_FLOW_VARIANT = ("dpm++_sde",)
