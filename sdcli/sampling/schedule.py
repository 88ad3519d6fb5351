"""Noise schedules: the SD training schedule -> sigmas, and the spacings users pick by name.

Conventions (k-diffusion's): sigma is the noise level of x = x0 + sigma * eps, so the UNet input is
x / sqrt(sigma^2 + 1). `model_sigmas` are the 1000 training sigmas, ascending (index = timestep).
Every schedule returns float32 sigmas, descending, ending with 0.0 (the clean image).
Timesteps given to the UNet are never rounded: `sigma_to_t` interpolates in log-sigma.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdcli.runtime.errors import UsageError, quote
from sdcli.sampling.names import SCHEDULE_ALIASES, SCHEDULE_LABELS, SCHEDULE_NAMES  # noqa: F401 (re-exported)

MAX_STEPS = 1000


def training_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Cumulative alpha products of SD's "scaled linear" training betas, in float64.

    LDM `make_beta_schedule("linear")`: betas = linspace(sqrt(start), sqrt(end), n) ** 2, computed in float64
    (https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/util.py).
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def model_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """Training sigmas ((1 - a) / a) ** 0.5, ascending with the timestep; float64 on the CPU."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)
    return ((1 - a) / a) ** 0.5


def alphas_cumprod_of(training) -> Tensor:
    """A family's training schedule (families.base.TrainingSchedule) as cumulative alpha products."""
    return training_alphas_cumprod(training.steps, training.beta_start, training.beta_end)


def sigmas_of(training) -> Tensor:
    """A family's training schedule as training sigmas."""
    return model_sigmas(alphas_cumprod_of(training))


def sigma_to_t(sigma: Tensor, model_sigmas: Tensor) -> Tensor:
    """Fractional timestep for each sigma, by linear interpolation of log-sigma between training steps.

    k-diffusion `DiscreteSchedule.sigma_to_t` (external.py) without quantizing. Computed in float64 on the
    CPU so that the timesteps (and so the images) do not depend on the device; returned as float32 on
    sigma's device.
    """
    log_sigmas = model_sigmas.detach().to("cpu", torch.float64).log()
    log_sigma = sigma.detach().to("cpu", torch.float64).clamp(min=1e-10).log()
    dists = log_sigma.reshape(-1) - log_sigmas[:, None]  # (n, S)
    low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
    t = (1 - w) * low + w * (low + 1)
    return t.reshape(sigma.shape).to(sigma.device, torch.float32)


def t_to_sigma(t: Tensor, model_sigmas: Tensor) -> Tensor:
    """Sigma at fractional timesteps t (float64), interpolating log-sigma; k-diffusion `t_to_sigma`."""
    log_sigmas = model_sigmas.detach().to("cpu", torch.float64).log()
    t = t.to(torch.float64).clamp(0, log_sigmas.shape[0] - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _finish(sigmas: Tensor) -> Tensor:
    """Append the final 0.0 and give the float32 schedule every caller expects."""
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)]).to(torch.float32)


def _normal(steps: int, ms: Tensor) -> Tensor:
    # k-diffusion DiscreteSchedule.get_sigmas / A1111 "Automatic": timesteps evenly spaced from 999 to 0.
    return _finish(t_to_sigma(torch.linspace(len(ms) - 1, 0, steps, dtype=torch.float64), ms))


def _sgm_uniform(steps: int, ms: Tensor) -> Tensor:
    # ComfyUI normal_scheduler(sgm=True): steps+1 evenly spaced timesteps, the last (t=0) dropped.
    return _finish(t_to_sigma(torch.linspace(len(ms) - 1, 0, steps + 1, dtype=torch.float64)[:-1], ms))


def _karras(steps: int, ms: Tensor, rho: float = 7.0) -> Tensor:
    # k-diffusion get_sigmas_karras (Karras et al. 2022, eq. 5), sigma range from the model.
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = float(ms[0]) ** (1 / rho), float(ms[-1]) ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho)


def _exponential(steps: int, ms: Tensor) -> Tensor:
    # k-diffusion get_sigmas_exponential: evenly spaced in log-sigma.
    return _finish(torch.linspace(math.log(ms[-1]), math.log(ms[0]), steps, dtype=torch.float64).exp())


def _simple(steps: int, ms: Tensor) -> Tensor:
    # ComfyUI simple_scheduler (comfy/samplers.py): every len/steps-th training sigma from the top.
    stride = len(ms) / steps
    return _finish(torch.stack([ms[-(1 + int(i * stride))] for i in range(steps)]))


def _trailing(steps: int, ms: Tensor) -> Tensor:
    """diffusers' timestep_spacing="trailing" (the Turbo / few-step models' schedule): timesteps
    round(1000 - i * 1000 / steps) - 1, so 999, 749, 499, 249 for 4 steps, at their training sigmas.

    Where steps divides 1000 this is `simple`; elsewhere it rounds where `simple` floors (3 steps: 999, 666, 332
    here, 999, 666, 333 there). diffusers EulerDiscreteScheduler.set_timesteps, "trailing" branch.
    """
    n = len(ms)
    t = torch.round(torch.arange(n, 0, -n / steps, dtype=torch.float64)).long() - 1
    return _finish(ms[t])


def _ddim_uniform(steps: int, ms: Tensor) -> Tensor:
    """Timesteps 1, 1+k, 1+2k, ... with k = 1000 // steps: diffusers' "leading" spacing with steps_offset=1.

    ComfyUI's ddim_uniform walks the same grid but keeps going while t < 1000, which gives steps+1 sigmas
    when 1000 % steps >= 2; we keep exactly `steps`, so ours equals ComfyUI's whenever steps divides 1000.
    """
    stride = max(len(ms) // steps, 1)
    t = torch.arange(steps, dtype=torch.long) * stride + 1
    return _finish(ms[t.flip(0)])


def _beta(steps: int, ms: Tensor, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI beta_scheduler: timesteps at Beta(0.6, 0.6) quantiles, rounded, consecutive repeats dropped.

    Like ComfyUI, a repeated timestep is dropped, so at very high step counts fewer than steps+1 sigmas
    can come back. The quantile function is our own (`beta_ppf`), not scipy's.
    """
    total = len(ms) - 1
    sigmas, last = [], -1
    for i in range(steps):
        t = round(beta_ppf(1.0 - i / steps, alpha, beta) * total)  # round-half-even, as numpy.rint
        if t != last:
            sigmas.append(ms[t])
        last = t
    return _finish(torch.stack(sigmas))


# Align Your Steps (Sabour et al. 2024), the SD1.5 10-step list as published by NVIDIA / ComfyUI
# (comfy_extras/nodes_align_your_steps.py NOISE_LEVELS["SD1"]).
AYS_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177,
           1.3943805092, 0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]


def _align_your_steps(steps: int, ms: Tensor) -> Tensor:
    # ComfyUI AlignYourStepsScheduler: log-linear interpolation of the list to steps+1 points, last -> 0.
    levels = torch.tensor(AYS_SD1, dtype=torch.float64)
    if steps + 1 != len(levels):
        xs = torch.linspace(0, 1, len(levels), dtype=torch.float64)
        new_xs = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        levels = _interp(new_xs, xs, levels.flip(0).log()).exp().flip(0)
    return _finish(levels[:-1])


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """numpy.interp for increasing xp (torch has no 1-D piecewise-linear interpolation)."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return y0 + (x - x0) / (x1 - x0) * (y1 - y0)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta function (Numerical Recipes 6.4, modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b), float64 (continued fraction on the side where it converges)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of `beta_cdf` by bisection (the cdf is monotone; 100 halvings reach float64 resolution)."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return 0.5 * (lo + hi)


def _lcm(steps: int, ms: Tensor, original_steps: int = 50) -> Tensor:
    """diffusers LCMScheduler: `steps` evenly spaced picks from the 50 distillation timesteps 999, 979, ..., 19."""
    if steps > original_steps:
        raise UsageError(f"the lcm schedule allows at most {original_steps} steps, got {steps}")
    k = len(ms) // original_steps
    origin = (torch.arange(original_steps, 0, -1) * k - 1).long()  # 999, 979, ..., 19
    picks = torch.floor(torch.linspace(0, original_steps, steps + 1, dtype=torch.float64)[:-1]).long()
    return _finish(ms[origin[picks]])


SCHEDULES = {
    "normal": _normal,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": _sgm_uniform,
    "simple": _simple,
    "trailing": _trailing,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "align_your_steps": _align_your_steps,
    "lcm": _lcm,
}

# The names (ours, A1111's labels, other spellings) are kept torch-free in names.py.
assert tuple(SCHEDULES) == SCHEDULE_NAMES


def get_sigmas(schedule: str, steps: int, model_sigmas: Tensor) -> Tensor:
    """Sigmas for `steps` steps of the named schedule: float32, descending, ending with 0.0.

    Length is steps + 1 (the `beta` schedule may drop repeated timesteps at very high step counts).
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"unknown schedule {quote(repr(schedule))}; choose one of: {', '.join(SCHEDULES)}")
    if not 1 <= int(steps) <= MAX_STEPS or int(steps) != steps:
        raise UsageError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps}")
    ms = model_sigmas.detach().to("cpu", torch.float64)
    return SCHEDULES[schedule](int(steps), ms)


def parse_sigmas(text: str) -> Tensor:
    """Parse --sigmas "14.6,7.0,...,0": finite, >= 0, strictly descending, at least two values."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UsageError(f"--sigmas must be comma-separated numbers, got {quote(repr(text))}") from None
    if len(values) < 2:
        raise UsageError(f"--sigmas needs at least two values (one step), got {quote(repr(text))}")
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UsageError(f"--sigmas values must be finite and >= 0, got {quote(repr(text))}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise UsageError(f"--sigmas must be strictly descending, got {quote(repr(text))}")
    return torch.tensor(values, dtype=torch.float32)


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a schedule that img2img runs: of N steps, the last int(strength * N), as diffusers.

    diffusers StableDiffusionImg2ImgPipeline.get_timesteps: init = min(int(N * strength), N), start = N - init.
    With strength small enough that no step runs, this returns just the final sigma (no steps).
    """
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"strength must be between 0 and 1, got {strength}")
    n = len(sigmas) - 1
    run = min(int(n * strength), n)
    return sigmas[n - run:].clone()
