"""Samplers against the diffusers schedulers implementing the same method (same sigmas, same starting x,
same noise draws, same deterministic stand-in UNet), plus properties for every sampler.

Conventions that differ from diffusers, and how these tests line them up:
- our x lives in k-diffusion space (x = x0 + sigma * eps). diffusers' Euler-type schedulers use the same
  space; DPMSolver / UniPC / DDIM / PNDM / LCM keep x / sqrt(sigma^2 + 1). We hand those the scaled start.
- we start from noise * sigmas[0]; diffusers' Euler-type pipelines multiply by init_noise_sigma, which is
  sqrt(sigma_max^2 + 1) for "linspace" spacing. Here both sides get the same explicit start.
- DPMSolver/UniPC round the timestep they give the UNet when sigmas are Karras; we never round. Their UNet
  is handed sigma_to_t(current sigma) instead, so that both sides evaluate the same function.
"""

import pytest
import torch
import numpy as np
from types import SimpleNamespace

import diffusers.schedulers.scheduling_lms_discrete as lms_module
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from _fixtures_sampling import AC, SHAPE, SIGMAS, eps_unet, run_diffusers, seeded
from sdcli.sampling.denoise import Denoiser, LCMDenoiser
from sdcli.runtime.errors import UsageError
from sdcli.sampling.samplers import SAMPLERS, make_noise_source, resolve_sampler, sample, sampler_help
from sdcli.sampling.schedule import get_sigmas, sigma_to_t

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ATOL = 2e-5  # float32 latents of magnitude ~1 after 10-25 steps; measured max abs diffs are 2e-7 .. 4e-6

# No diffusers twin: dpm++_2s_a (DPMSolverSinglestepScheduler is not ancestral) and dpm++_sde
# (DPMSolverSDEScheduler needs torchsde's Brownian tree). Those two are covered by the properties below:
# convergence to the Gaussian data distribution, bit-exact batch invariance, callbacks.


def ours(name: str, sigmas: torch.Tensor, seed: int, unet=eps_unet, wrapper=Denoiser) -> torch.Tensor:
    """Our sampler from seed's initial noise (k-diffusion start x = noise * sigma_0)."""
    g, init = seeded(seed)
    denoiser = wrapper(unet, AC)
    noise = make_noise_source([g], SHAPE, "cpu", torch.float32)
    return sample(name, lambda x, s: denoiser(x, s, None), init * sigmas[0], sigmas, noise)


def unrounded_t(sched, t):
    """The timestep we give the UNet for the scheduler's current sigma (not rounded)."""
    return sigma_to_t(sched.sigmas[sched.step_index or 0].reshape(1), SIGMAS)


def vp_start(seed: int, sigma0: float):
    g, init = seeded(seed)
    return g, init * sigma0 / (sigma0**2 + 1) ** 0.5


@pytest.mark.parametrize("steps,karras", [(10, False), (4, False), (12, True)])
def test_euler_matches_diffusers(steps, karras):
    sched = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    _, init = seeded(1)
    ref = run_diffusers(sched, init * sigmas[0])
    got = ours("euler", sigmas, 1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 4])
def test_euler_a_matches_diffusers_same_generator(steps):
    # EulerAncestralDiscreteScheduler has no Karras option; the sigmas are what the test controls anyway
    sched = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    g, init = seeded(7)
    ref = run_diffusers(sched, init * sigmas[0], generator=g)
    got = ours("euler_a", sigmas, 7)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # the noise matters: a different generator state gives a clearly different image
    assert (ours("euler_a", sigmas, 8) - ref).abs().max() > 0.1


@pytest.mark.parametrize("steps,karras", [(10, False), (8, True)])
def test_heun_matches_diffusers(steps, karras):
    sched = HeunDiscreteScheduler(**SD, timestep_spacing="linspace", use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    sigmas = torch.unique_consecutive(sched.sigmas)  # diffusers interleaves each sigma twice
    assert len(sigmas) == steps + 1
    _, init = seeded(2)
    ref = run_diffusers(sched, init * sigmas[0])
    torch.testing.assert_close(ours("heun", sigmas, 2), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_karras_matches_diffusers(steps):
    sched = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                        use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    _, start = vp_start(3, float(sigmas[0]))
    ref = run_diffusers(sched, start, t_for_model=unrounded_t)
    torch.testing.assert_close(ours("dpm++_2m", sigmas, 3), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 16])
def test_dpmpp_2m_sde_matches_diffusers_same_generator(steps):
    sched = DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++", solver_order=2,
                                        use_karras_sigmas=True, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    g, start = vp_start(4, float(sigmas[0]))
    ref = run_diffusers(sched, start, generator=g, t_for_model=unrounded_t)
    torch.testing.assert_close(ours("dpm++_2m_sde", sigmas, 4), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps,karras", [(10, False), (7, True)])
def test_dpm2_matches_diffusers_kdpm2(steps, karras):
    sched = KDPM2DiscreteScheduler(**SD, timestep_spacing="linspace", use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    sigmas = torch.unique_consecutive(sched.sigmas)
    assert len(sigmas) == steps + 1
    _, init = seeded(5)

    def t_model(sched, t):  # KDPM2 rounds the Karras timesteps (not the midpoint ones); we do not
        return unrounded_t(sched, t) if sched.state_in_first_order else t

    ref = run_diffusers(sched, init * sigmas[0], t_for_model=t_model)
    torch.testing.assert_close(ours("dpm2", sigmas, 5), ref, atol=ATOL, rtol=0)


def _gauss_legendre_quad(f, a, b, epsrel=None):
    """scipy.integrate.quad stand-in (scipy is not a dependency): 8-point Gauss-Legendre is exact for the
    LMS integrands, which are polynomials of degree <= 3."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    mid, half = (a + b) / 2, (b - a) / 2
    return half * sum(w * f(mid + half * n) for n, w in zip(nodes, weights)), 0.0


@pytest.mark.parametrize("steps,karras", [(10, False), (15, True)])
def test_lms_matches_diffusers(monkeypatch, steps, karras):
    monkeypatch.setattr(lms_module, "integrate", SimpleNamespace(quad=_gauss_legendre_quad), raising=False)
    sched = lms_module.LMSDiscreteScheduler(**SD, timestep_spacing="linspace", use_karras_sigmas=karras)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    _, init = seeded(6)
    ref = run_diffusers(sched, init * sigmas[0])  # step(order=4) is diffusers' default
    torch.testing.assert_close(ours("lms", sigmas, 6), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers_on_ddim_uniform(steps):
    sched = DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    sigmas = get_sigmas("ddim_uniform", steps, SIGMAS)
    g, start = vp_start(8, float(sigmas[0]))
    ref = run_diffusers(sched, start)  # eta = 0
    torch.testing.assert_close(ours("ddim", sigmas, 8), ref, atol=ATOL, rtol=0)


def test_ddim_sd15_config_stops_at_sigma_min():
    # SD1.5's shipped config has set_alpha_to_one=False: diffusers' last DDIM step goes to alphas_cumprod[0]
    # (sigma_min ~ 0.029), not to 0. Our schedules end at 0; given that last sigma we match it too.
    steps = 10
    sched = DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    sigmas = get_sigmas("ddim_uniform", steps, SIGMAS).clone()
    sigmas[-1] = SIGMAS[0]
    g, start = vp_start(9, float(sigmas[0]))
    ref_vp = run_diffusers(sched, start)
    got = ours("ddim", sigmas, 9)
    torch.testing.assert_close(got, ref_vp * (sigmas[-1] ** 2 + 1) ** 0.5, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 20])
def test_plms_matches_diffusers_pndm(steps):
    sched = PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1,
                          timestep_spacing="leading")
    sched.set_timesteps(steps)
    sigmas = get_sigmas("ddim_uniform", steps, SIGMAS)
    _, start = vp_start(10, float(sigmas[0]))
    ref = run_diffusers(sched, start)
    torch.testing.assert_close(ours("plms", sigmas, 10), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps,karras", [(10, True), (20, True), (8, False)])
def test_unipc_matches_diffusers(steps, karras):
    sched = UniPCMultistepScheduler(**SD, solver_order=2, solver_type="bh2", predict_x0=True,
                                    use_karras_sigmas=karras, final_sigmas_type="zero")
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.clone()
    _, start = vp_start(11, float(sigmas[0]))
    ref = run_diffusers(sched, start, t_for_model=unrounded_t)
    torch.testing.assert_close(ours("unipc", sigmas, 11), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [4, 8])
def test_lcm_matches_diffusers_same_generator(steps):
    sched = LCMScheduler(**SD)
    sched.set_timesteps(steps)
    sigmas = get_sigmas("lcm", steps, SIGMAS)
    g, start = vp_start(12, float(sigmas[0]))
    ref = run_diffusers(sched, start, generator=g)
    torch.testing.assert_close(ours("lcm", sigmas, 12, wrapper=LCMDenoiser), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [10, 6])
def test_dpm2_a_matches_diffusers_kdpm2_ancestral_same_generator(steps):
    sched = KDPM2AncestralDiscreteScheduler(**SD, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    sigmas = torch.unique_consecutive(sched.sigmas)
    g, init = seeded(13)
    ref = run_diffusers(sched, init * sigmas[0], generator=g)
    torch.testing.assert_close(ours("dpm2_a", sigmas, 13), ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- properties, all samplers

def _gaussian_denoiser(mu: float, s: float):
    """Ideal denoiser for data ~ N(mu, s^2) per element: E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    def model(x, sigma):
        sig = sigma.reshape(-1, 1, 1, 1)
        return mu + s**2 / (s**2 + sig**2) * (x - mu)
    return model


def _consistency_function(mu: float, s: float):
    """Ideal consistency model for the same data: the probability-flow ODE's endpoint from (x, sigma)."""
    def model(x, sigma):
        sig = sigma.reshape(-1, 1, 1, 1)
        return mu + (x - mu) * s / (s**2 + sig**2) ** 0.5
    return model


FIRST_ORDER = {"euler", "euler_a", "ddim"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_converges_to_gaussian_data_distribution(name):
    mu, s = 0.7, 0.5
    if name == "lcm":  # LCM needs a consistency model; with one, 4 steps are exact
        model, sigmas = _consistency_function(mu, s), get_sigmas("lcm", 4, SIGMAS)
    else:
        model = _gaussian_denoiser(mu, s)
        sigmas = get_sigmas("karras", 200 if name in FIRST_ORDER else 40, SIGMAS)
    g = torch.Generator().manual_seed(0)
    init = torch.randn((1, 4, 64, 64), generator=g)
    # exact marginal at sigma_0: N(mu, s^2 + sigma_0^2)
    x = mu + init * (s**2 + float(sigmas[0]) ** 2) ** 0.5
    noise = make_noise_source([g], (4, 64, 64), "cpu", torch.float32)
    out = sample(name, model, x, sigmas, noise)
    assert abs(out.mean().item() - mu) < 0.02  # 16384 samples: standard error 0.004
    assert abs(out.std().item() / s - 1) < 0.03  # standard error of the std ~0.6%


def test_first_order_error_shrinks_with_steps():
    # Euler's variance deficit on Gaussian data is discretisation error: it must shrink as steps grow
    mu, s = 0.0, 0.5
    errs = []
    for steps in (10, 20, 40):
        sigmas = get_sigmas("karras", steps, SIGMAS)
        x = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(0)) * (s**2 + sigmas[0] ** 2) ** 0.5
        errs.append(abs(sample("euler", _gaussian_denoiser(mu, s), x, sigmas).std().item() - s))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_batch_invariance_bit_exact(name):
    sigmas = get_sigmas("lcm" if name == "lcm" else "karras", 6, SIGMAS)
    denoiser = Denoiser(eps_unet, AC)
    model = lambda x, s: denoiser(x, s, None)  # noqa: E731

    def run(seeds):
        gens = [torch.Generator().manual_seed(k) for k in seeds]
        init = torch.cat([torch.randn((1, *SHAPE), generator=g) for g in gens])
        noise = make_noise_source(gens, SHAPE, "cpu", torch.float32)
        return sample(name, model, init * sigmas[0], sigmas, noise)

    batch = run([10, 11, 12])
    for k, seed in enumerate([10, 11, 12]):
        assert torch.equal(batch[k:k + 1], run([seed])), f"image {k} of the batch differs from seed {seed} alone"
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_and_no_input_mutation(name):
    sigmas = get_sigmas("lcm" if name == "lcm" else "normal", 5, SIGMAS)
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    x_copy, sigmas_copy = x.clone(), sigmas.clone()
    seen = []
    noise = make_noise_source([torch.Generator().manual_seed(k) for k in (1, 2)], SHAPE, "cpu", torch.float32)
    out = sample(name, _gaussian_denoiser(0.0, 1.0), x, sigmas, noise,
                 callback=lambda i, n, xi, d: seen.append((i, n, xi.shape, d.shape)))
    assert [i for i, *_ in seen] == list(range(5)) and all(n == 5 for _, n, *_ in seen)
    assert all(a == x.shape and b == x.shape for *_, a, b in seen)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, x_copy) and torch.equal(sigmas, sigmas_copy)


def test_callback_can_stop_sampling():
    class Stop(Exception):
        pass

    def cb(i, n, x, d):
        if i == 1:
            raise Stop

    calls = []
    model = _gaussian_denoiser(0.0, 1.0)
    with pytest.raises(Stop):
        sample("euler", lambda x, s: calls.append(1) or model(x, s), torch.zeros(1, *SHAPE),
               get_sigmas("normal", 10, SIGMAS), callback=cb)
    assert len(calls) == 2


def test_noise_source_draw_order_matches_single_generator():
    gens = [torch.Generator().manual_seed(k) for k in (5, 6)]
    noise = make_noise_source(gens, SHAPE, "cpu", torch.float64)
    a, b = noise(), noise()
    g5 = torch.Generator().manual_seed(5)
    first, second = torch.randn((1, *SHAPE), generator=g5), torch.randn((1, *SHAPE), generator=g5)
    assert a.dtype == torch.float64 and a.shape == (2, *SHAPE)
    assert torch.equal(a[:1], first.double()) and torch.equal(b[:1], second.double())


# ----------------------------------------------------------------------------- names

@pytest.mark.parametrize("label,expected", [
    ("DPM++ 2M Karras", ("dpm++_2m", "karras")),
    ("Euler a", ("euler_a", None)),
    ("euler_ancestral", ("euler_a", None)),
    ("dpmpp_2m_sde", ("dpm++_2m_sde", None)),
    ("DPM++ 2M SDE Exponential", ("dpm++_2m_sde", "exponential")),
    ("dpmpp_2m_sgm_uniform", ("dpm++_2m", "sgm_uniform")),
    ("DPMSolverMultistepScheduler", ("dpm++_2m", None)),
    ("EulerDiscreteScheduler", ("euler", None)),
    ("KDPM2AncestralDiscreteScheduler", ("dpm2_a", None)),
    ("PNDMScheduler", ("plms", None)),
    ("UniPC", ("unipc", None)),
    ("DPM2 a Karras", ("dpm2_a", "karras")),
    ("  LMS  ", ("lms", None)),
    ("dpm++_2s_a", ("dpm++_2s_a", None)),
])
def test_resolve_sampler(label, expected):
    assert resolve_sampler(label) == expected


def test_unknown_sampler_lists_close_matches():
    with pytest.raises(UsageError, match="dpm\\+\\+_2m"):
        resolve_sampler("dpm++ 2n")
    with pytest.raises(UsageError, match="unknown sampler"):
        resolve_sampler("restart")


def test_sampler_help_lists_every_name_and_alias():
    text = sampler_help()
    for spec in SAMPLERS.values():
        assert spec.name in text and all(a in text for a in spec.aliases)


def test_stochastic_sampler_without_noise_source_is_a_usage_error():
    with pytest.raises(UsageError, match="noise"):
        sample("euler_a", _gaussian_denoiser(0, 1), torch.zeros(1, *SHAPE), get_sigmas("normal", 3, SIGMAS))
