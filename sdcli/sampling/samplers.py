"""Samplers: pure functions over a denoiser, in k-diffusion's shape.

    sample_x(model, x, sigmas, noise, callback=None) -> x

- model(x, sigma_batch) -> denoised x0 (a `CFGDenoiser`); samplers never see prediction types.
- x starts as noise * sigmas[0] (txt2img) - the k-diffusion convention. diffusers' Euler-type schedulers
  scale their initial latents by init_noise_sigma = sqrt(sigma_max^2 + 1) for "linspace"/"trailing"
  spacing instead of sigma_max, so the same seed gives a (slightly) different start there.
- sigmas: float32, descending, usually ending with 0.0 (see schedule.py).
- noise() returns a fresh standard-normal tensor shaped like x; it is the ONLY source of randomness,
  called once per stochastic draw in step order (see `make_noise_source`).
- callback(step_index, total, x, denoised) after each step; it may raise to stop sampling.
- keyword parameters, A1111's (sampling/a1111_params.py says which sampler takes which, as A1111 passes them):
  `eta` for the ancestral and SDE samplers (default 1) and DDIM (default 0); `s_churn`, `s_tmin`, `s_tmax`,
  `s_noise` for Euler, Heun and DPM2 (Karras et al. 2022 Alg. 2's churn; defaults 0, 0, inf, 1). At their
  defaults every function computes exactly what it did before it took them.

Most functions follow k-diffusion `k_diffusion/sampling.py` (crowsonkb/k-diffusion, linked per function).
The SDE samplers take their noise from noise() where k-diffusion uses a Brownian tree: for dpm++_2m_sde
the per-step increments are independent anyway (as in diffusers' DPMSolverMultistepScheduler with
algorithm_type="sde-dpmsolver++"); dpm++_sde combines its two draws per step so that they have the
Brownian tree's correlation (see sample_dpmpp_sde).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from sdcli.runtime.errors import UsageError
from sdcli.sampling.names import SAMPLER_NAMES, SamplerName, resolve_sampler, sampler_help  # noqa: F401 (re-exported)

Model = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]


def make_noise_source(generators: list[torch.Generator], shape_per_image, device, dtype) -> Noise:
    """noise() for a batch: one CPU generator per image, drawn in image order, fp32, then moved.

    Image k's draws depend only on generator k, so image k of a batch equals a single run with seed+k.
    """
    shape = tuple(shape_per_image)

    def noise() -> Tensor:
        draws = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(draws).to(device=device, dtype=dtype)  # (B, *shape)

    return noise


# ----------------------------------------------------------------------------- helpers

def _to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The ODE derivative dx/dsigma = (x - x0) / sigma (k-diffusion to_d)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) for an ancestral step (k-diffusion get_ancestral_step)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


class _Churn:
    """Karras et al. 2022 Alg. 2's "churn" as k-diffusion's sample_euler / sample_heun / sample_dpm_2 apply it:
    before step i, gamma = min(s_churn / steps, sqrt 2 - 1) where s_tmin <= sigma_i <= s_tmax, and x gains
    eps * s_noise * sqrt(sigma_hat^2 - sigma_i^2) to sit at sigma_hat = sigma_i (1 + gamma). k-diffusion draws eps
    at every step once churn is on, where gamma is 0 too, so the draws line up with A1111's; with s_churn 0 it
    draws nothing (its draw would be unused) and the step is the plain one."""

    def __init__(self, steps: int, noise: Noise | None, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
        self.on = s_churn > 0
        if self.on and noise is None:
            raise UsageError("s_churn > 0 draws noise: pass a noise source")
        self.steps, self.noise, self.churn, self.tmin, self.tmax, self.s_noise = \
            steps, noise, s_churn, s_tmin, s_tmax, s_noise

    def __call__(self, x: Tensor, sigma: float) -> tuple[Tensor, float]:
        """(x at sigma_hat, sigma_hat) for the step from `sigma`."""
        if not self.on:
            return x, sigma
        gamma = min(self.churn / self.steps, 2**0.5 - 1) if self.tmin <= sigma <= self.tmax else 0.0
        eps = self.noise() * self.s_noise
        if gamma <= 0:
            return x, sigma
        sigma_hat = sigma * (gamma + 1)
        return x + eps * (sigma_hat**2 - sigma**2) ** 0.5, sigma_hat


class _Stepper:
    """Calls the model with a (B,) sigma and reports steps: keeps each sampler's loop to its math."""

    def __init__(self, model: Model, x: Tensor, sigmas: Tensor, callback):
        self.model, self.callback = model, callback
        self.sigmas = [float(s) for s in sigmas]  # python floats: coefficient math in float64
        self.total = len(self.sigmas) - 1
        self.ones = x.new_ones(x.shape[0], dtype=torch.float32)

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        return self.model(x, self.ones * sigma)

    def done(self, i: int, x: Tensor, denoised: Tensor) -> None:
        if self.callback is not None:
            self.callback(i, self.total, x, denoised)


# ----------------------------------------------------------------------------- first/second order

def sample_euler(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """Euler (Karras et al. 2022 Alg. 2, churn as `_Churn`); k-diffusion sample_euler."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    churn = _Churn(run.total, noise, s_churn, s_tmin, s_tmax, s_noise)
    for i in range(run.total):
        x, sigma = churn(x, s[i])
        denoised = run(x, sigma)
        x = x + _to_d(x, sigma, denoised) * (s[i + 1] - sigma)
        run.done(i, x, denoised)
    return x


def sample_euler_a(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None, eta: float = 1.0) -> Tensor:
    """Euler ancestral; k-diffusion sample_euler_ancestral. One noise() per step but the last (at any eta)."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        x = x + _to_d(x, s[i], denoised) * (down - s[i])
        if s[i + 1] > 0:
            x = x + noise() * up
        run.done(i, x, denoised)
    return x


def sample_heun(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """Heun's method (Karras et al. 2022 Alg. 2, churn as `_Churn`); Euler for the step to sigma = 0;
    k-diffusion sample_heun."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    churn = _Churn(run.total, noise, s_churn, s_tmin, s_tmax, s_noise)
    for i in range(run.total):
        x, sigma = churn(x, s[i])
        denoised = run(x, sigma)
        d = _to_d(x, sigma, denoised)
        dt = s[i + 1] - sigma
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, s[i + 1], run(x_2, s[i + 1]))
            x = x + (d + d_2) / 2 * dt
        run.done(i, x, denoised)
    return x


def sample_dpm2(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None,
                s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 (midpoint in log-sigma, churn as `_Churn`); k-diffusion sample_dpm_2."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    churn = _Churn(run.total, noise, s_churn, s_tmin, s_tmax, s_noise)
    for i in range(run.total):
        x, sigma = churn(x, s[i])
        denoised = run(x, sigma)
        d = _to_d(x, sigma, denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma)
        else:
            mid = math.exp((math.log(sigma) + math.log(s[i + 1])) / 2)
            x_2 = x + d * (mid - sigma)
            x = x + _to_d(x_2, mid, run(x_2, mid)) * (s[i + 1] - sigma)
        run.done(i, x, denoised)
    return x


def sample_dpm2_a(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None, eta: float = 1.0) -> Tensor:
    """Ancestral DPM-Solver-2; k-diffusion sample_dpm_2_ancestral. One noise() per step but the last (at any
    eta)."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        d = _to_d(x, s[i], denoised)
        if down == 0:
            x = x + d * (down - s[i])
        else:
            mid = math.exp((math.log(s[i]) + math.log(down)) / 2)
            x_2 = x + d * (mid - s[i])
            x = x + _to_d(x_2, mid, run(x_2, mid)) * (down - s[i])
            x = x + noise() * up
        run.done(i, x, denoised)
    return x


# ----------------------------------------------------------------------------- DPM-Solver++ family
# In these, t = -log(sigma) (half log-SNR, lambda) and h is the step in t.

def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022); k-diffusion sample_dpmpp_2m. First order on the first and last step."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    old = None
    for i in range(run.total):
        denoised = run(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # the first-order step to sigma = 0 lands exactly on x0
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            d = denoised
            if old is not None:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old = denoised
        run.done(i, x, denoised)
    return x


def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None,
                        eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint; k-diffusion sample_dpmpp_2m_sde with Gaussian noise().

    One noise() per step but the last (none with eta 0: the ODE solver DPM-Solver++(2M) with these weights).
    """
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    old, h_last = None, None
    for i in range(run.total):
        denoised = run(x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h  # h itself at eta 1, so the default computes what it always did
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old is not None:
                x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_last) * (denoised - old)
            if eta:
                x = x + noise() * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)))
            h_last = h
        old = denoised
        run.done(i, x, denoised)
    return x


def sample_dpmpp_2s_a(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None,
                      eta: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) ancestral, r = 1/2; k-diffusion sample_dpmpp_2s_ancestral. One noise() per step but the
    last (at any eta)."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = x + _to_d(x, s[i], denoised) * (down - s[i])
        else:
            h = math.log(s[i]) - math.log(down)
            mid = math.exp(-(-math.log(s[i]) + h / 2))  # sigma at t + h/2
            x_2 = (mid / s[i]) * x - math.expm1(-h / 2) * denoised
            x = (down / s[i]) * x - math.expm1(-h) * run(x_2, mid)
        if s[i + 1] > 0:
            x = x + noise() * up
        run.done(i, x, denoised)
    return x


def sample_dpmpp_sde(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None, eta: float = 1.0) -> Tensor:
    """DPM-Solver++ SDE (2 stages, r = 1/2); k-diffusion sample_dpmpp_sde.

    k-diffusion draws both stages' noise from one Brownian motion in sigma: the stage-2 increment over
    [sigma_next, sigma] contains the stage-1 increment over [sigma_mid, sigma]. We build exactly that joint
    law from two independent draws z1, z2 of noise() per step (none on the last step):
        n1 = z1,  n2 = (sqrt(d1) z1 + sqrt(d2 - d1) z2) / sqrt(d2),  d1 = sigma - sigma_mid, d2 = sigma - sigma_next
    Same distribution as k-diffusion's Brownian tree, not the same numbers. (With independent n1, n2 the
    method is visibly less accurate: ~12% too little variance on Gaussian data at 20 steps.)
    """
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        if s[i + 1] == 0:
            x = x + _to_d(x, s[i], denoised) * (s[i + 1] - s[i])
        else:
            mid = math.sqrt(s[i] * s[i + 1])  # sigma at t + h/2
            down, up = _ancestral_step(s[i], mid, eta)
            x_2 = (down / s[i]) * x - math.expm1(math.log(down) - math.log(s[i])) * denoised
            z1 = noise()
            x_2 = x_2 + z1 * up
            denoised_d = run(x_2, mid)  # (1 - fac) * d1 + fac * d2 with fac = 1 / (2r) = 1
            down, up = _ancestral_step(s[i], s[i + 1], eta)
            x = (down / s[i]) * x - math.expm1(math.log(down) - math.log(s[i])) * denoised_d
            d1, d2 = s[i] - mid, s[i] - s[i + 1]
            z2 = (math.sqrt(d1) * z1 + math.sqrt(d2 - d1) * noise()) / math.sqrt(d2)  # Brownian bridge
            x = x + z2 * up
        run.done(i, x, denoised)
    return x


# ----------------------------------------------------------------------------- multistep (LMS, PLMS, UniPC)

def _lms_coeff(order: int, s: list[float], i: int, j: int) -> float:
    """Integral from s[i] to s[i+1] of the Lagrange basis polynomial for node s[i-j] over s[i], ..., s[i-order+1].

    k-diffusion linear_multistep_coeff integrates this numerically (scipy quad); it is a polynomial, so we
    expand it and integrate it exactly (coefficients in increasing powers).
    """
    poly = [1.0]
    for k in range(order):
        if k == j:
            continue
        scale = s[i - j] - s[i - k]
        # poly *= (tau - s[i-k]) / scale
        poly = [((poly[p - 1] if p > 0 else 0.0) - s[i - k] * (poly[p] if p < len(poly) else 0.0)) / scale
                for p in range(len(poly) + 1)]
    antideriv = lambda tau: sum(c * tau ** (p + 1) / (p + 1) for p, c in enumerate(poly))  # noqa: E731
    return antideriv(s[i + 1]) - antideriv(s[i])


def sample_lms(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None,
               order: int = 4) -> Tensor:
    """Linear multistep in sigma (order 4, warming up); k-diffusion sample_lms / diffusers LMSDiscreteScheduler."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    ds: list[Tensor] = []
    for i in range(run.total):
        denoised = run(x, s[i])
        ds = (ds + [_to_d(x, s[i], denoised)])[-order:]
        cur = min(i + 1, order)
        x = x + sum(_lms_coeff(cur, s, i, j) * d for j, d in enumerate(reversed(ds)))
        run.done(i, x, denoised)
    return x


def sample_plms(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None) -> Tensor:
    """PLMS (Liu et al. 2022, "Pseudo Numerical Methods"): Adams-Bashforth on eps, then a DDIM step.

    In sigma space a DDIM (eta = 0) step with eps e is x + e * (sigma_next - sigma), and eps = to_d.
    The first step is the pseudo improved Euler (two model calls), as LDM's PLMSSampler and diffusers
    PNDMScheduler(skip_prk_steps=True). The AB weights assume evenly spaced timesteps, as the original.
    """
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    old: list[Tensor] = []
    for i in range(run.total):
        denoised = run(x, s[i])
        e = _to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if not old and s[i + 1] > 0:
            x_2 = x + e * dt
            e_prime = (e + _to_d(x_2, s[i + 1], run(x_2, s[i + 1]))) / 2
        elif len(old) <= 1:
            e_prime = e if not old else (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = x + e_prime * dt
        old = (old + [e])[-3:]
        run.done(i, x, denoised)
    return x


def _unipc_predict(x: Tensor, ms: list[Tensor], s: list[float], i: int, order: int) -> Tensor:
    """UniP-bh2 step from s[i] to s[i+1] on x0 predictions ms[-1] (at s[i]) and ms[-2] (at s[i-1])."""
    if s[i + 1] == 0:
        return ms[-1]  # h = inf: the first-order step lands on x0
    h = math.log(s[i]) - math.log(s[i + 1])
    b_h = math.expm1(-h)
    m = ms[-1]
    if order == 2:
        r1 = (math.log(s[i]) - math.log(s[i - 1])) / h
        m = m + 0.5 * (ms[-2] - ms[-1]) / r1
    return (s[i + 1] / s[i]) * x - b_h * m


def _unipc_correct(x_last: Tensor, m_new: Tensor, ms: list[Tensor], s: list[float], i: int, order: int) -> Tensor:
    """UniC-bh2: redo the step s[i-1] -> s[i] from x_last using the new x0 m_new (no extra model call)."""
    h = math.log(s[i - 1]) - math.log(s[i])
    b_h = math.expm1(-h)
    m0 = ms[-1]
    if order == 1:
        m = m0 + 0.5 * (m_new - m0)
    else:
        # rhos solve [[1, 1], [r1, 1]] rho = [b1, b2] with b_k = k! * h_phi_k(-h) / B(h)
        r1 = (math.log(s[i - 1]) - math.log(s[i - 2])) / h
        phi_1 = math.expm1(-h) / -h - 1
        phi_2 = phi_1 / -h - 0.5
        b1, b2 = phi_1 / b_h, 2 * phi_2 / b_h
        rho0 = (b1 - b2) / (1 - r1)
        m = m0 + rho0 * (ms[-2] - m0) / r1 + (b1 - rho0) * (m_new - m0)
    return (s[i] / s[i - 1]) * x_last - b_h * m


def sample_unipc(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None) -> Tensor:
    """UniPC (Zhao et al. 2023), bh2, order 2, data prediction, as diffusers UniPCMultistepScheduler.

    Order 1 on the first and last step (warm-up / lower_order_final); the corrector reuses the model call
    made at the predicted point, so one model call per step.
    https://github.com/huggingface/diffusers/blob/main/src/diffusers/schedulers/scheduling_unipc_multistep.py
    """
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    ms: list[Tensor] = []
    x_last, last_order = x, 1
    for i in range(run.total):
        denoised = run(x, s[i])
        if i > 0:
            x = _unipc_correct(x_last, denoised, ms, s, i, last_order)
        ms = (ms + [denoised])[-2:]
        last_order = 1 if i == 0 or i == run.total - 1 else 2
        x_last = x
        x = _unipc_predict(x, ms, s, i, last_order)
        run.done(i, x, denoised)
    return x


# ----------------------------------------------------------------------------- DDIM, LCM

def sample_ddim(model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None, callback=None,
                eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021). In sigma space its eta = 0 update is exactly an Euler step: x0 + sigma_next * eps
    with eps = (x - x0) / sigma. With eta, DDIM's sigma_t = eta sqrt((1 - a') / (1 - a) (1 - a / a')) (a, a' the
    alphas_cumprod of this step and the next) divided by sqrt(a') is k-diffusion's sigma_up for that eta, and the
    rest of its step is the step down to sqrt(sigma_next^2 - sigma_up^2): an ancestral Euler step, one noise() per
    step but the last (A1111 sd_samplers_timesteps_impl.ddim draws one at every step, also at eta 0, where it is
    multiplied by 0). Usually run on the `ddim_uniform` schedule."""
    if not eta:
        return sample_euler(model, x, sigmas, noise, callback)
    if noise is None:
        raise UsageError("DDIM with eta > 0 draws noise: pass a noise source")
    return sample_euler_a(model, x, sigmas, noise, callback, eta=eta)


def sample_lcm(model: Model, x: Tensor, sigmas: Tensor, noise: Noise, callback=None) -> Tensor:
    """Latent Consistency Model sampling: jump to x0, re-noise to the next sigma; diffusers LCMScheduler.step
    and k-diffusion/ComfyUI sample_lcm. One noise() per step but the last. The LCM boundary condition
    (c_skip, c_out) belongs to the model: see `denoise.LCMDenoiser`."""
    run = _Stepper(model, x, sigmas, callback)
    s = run.sigmas
    for i in range(run.total):
        denoised = run(x, s[i])
        x = denoised
        if s[i + 1] > 0:
            x = x + noise() * s[i + 1]
        run.done(i, x, denoised)
    return x


# ----------------------------------------------------------------------------- registry and names

@dataclass(frozen=True)
class SamplerSpec(SamplerName):
    """A sampler's names (names.py, torch-free) and its function."""

    fn: Callable[..., Tensor] | None = None


_FUNCTIONS = {"euler": sample_euler, "euler_a": sample_euler_a, "heun": sample_heun, "dpm2": sample_dpm2,
              "dpm2_a": sample_dpm2_a, "dpm++_2m": sample_dpmpp_2m, "dpm++_2m_sde": sample_dpmpp_2m_sde,
              "dpm++_2s_a": sample_dpmpp_2s_a, "dpm++_sde": sample_dpmpp_sde, "lms": sample_lms,
              "ddim": sample_ddim, "plms": sample_plms, "unipc": sample_unipc, "lcm": sample_lcm}
SAMPLERS: dict[str, SamplerSpec] = {
    name: SamplerSpec(**{f.name: getattr(spec, f.name) for f in fields(SamplerName)}, fn=_FUNCTIONS[name])
    for name, spec in SAMPLER_NAMES.items()}


def sample(name: str, model: Model, x: Tensor, sigmas: Tensor, noise: Noise | None = None,
           callback=None, **options: float) -> Tensor:
    """Run the named sampler (any alias) from x at sigmas[0] down the schedule; returns the final x. `options`:
    the sampler's keyword parameters (eta, s_churn, ...: see the module docstring)."""
    spec = SAMPLERS[resolve_sampler(name)[0]]
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise UsageError(f"sigmas must be a 1-D list of at least 2 values, got shape {tuple(sigmas.shape)}")
    if (spec.stochastic or options.get("eta") or options.get("s_churn")) and noise is None:
        raise UsageError(f"sampler {spec.name} draws noise: pass a noise source")
    return spec.fn(model, x, sigmas, noise, callback, **options)
