"""Schedules against diffusers where it has the same spacing, against independent formulas where it
does not (ComfyUI's spacings), and their common properties."""

from types import SimpleNamespace

import mpmath
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from _fixtures_sampling import AC, SIGMAS
from sdcli.runtime.errors import UsageError
from sdcli.sampling.schedule import (
    AYS_SD1,
    SCHEDULES,
    beta_ppf,
    get_sigmas,
    img2img_sigmas,
    model_sigmas,
    parse_sigmas,
    sigma_to_t,
    t_to_sigma,
    training_alphas_cumprod,
)

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def euler_sigmas(steps, **cfg) -> torch.Tensor:
    sched = EulerDiscreteScheduler(**SD, **cfg)
    sched.set_timesteps(steps)
    return sched.sigmas


def test_training_schedule_matches_diffusers():
    ours = training_alphas_cumprod()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours.float(), EulerDiscreteScheduler(**SD).alphas_cumprod, rtol=1e-6, atol=0)
    ms = model_sigmas(ours)
    assert torch.all(ms[1:] > ms[:-1])
    assert abs(float(ms[0]) - 0.0292) < 1e-4 and abs(float(ms[-1]) - 14.6146) < 1e-3


@pytest.mark.parametrize("steps", [4, 10, 28])  # 999 / (steps - 1) is whole: integer timesteps
def test_normal_matches_diffusers_linspace(steps):
    torch.testing.assert_close(get_sigmas("normal", steps, SIGMAS), euler_sigmas(steps, timestep_spacing="linspace"),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [7, 20, 30])
def test_normal_and_sgm_uniform_interpolate_log_sigma(steps):
    # Where timesteps are fractional, diffusers interpolates sigma linearly; k-diffusion / A1111 / ComfyUI
    # interpolate log-sigma. Check ours against numpy's interp on log-sigma.
    log_s = np.log(SIGMAS.numpy())
    for name, t in [("normal", np.linspace(999, 0, steps)), ("sgm_uniform", np.linspace(999, 0, steps + 1)[:-1])]:
        expected = np.append(np.exp(np.interp(t, np.arange(1000), log_s)), 0.0)
        np.testing.assert_allclose(get_sigmas(name, steps, SIGMAS).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("steps", [5, 20, 37])
@pytest.mark.parametrize("name,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
def test_karras_and_exponential_match_diffusers(name, flag, steps):
    ref = euler_sigmas(steps, **{flag: True})
    torch.testing.assert_close(get_sigmas(name, steps, SIGMAS), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [4, 10, 20, 25])  # steps dividing 1000: integer timesteps
def test_simple_matches_diffusers_trailing(steps):
    torch.testing.assert_close(get_sigmas("simple", steps, SIGMAS), euler_sigmas(steps, timestep_spacing="trailing"),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8, 13, 30, 999, 1000])
def test_trailing_matches_diffusers_trailing(steps):
    # The Turbo / few-step schedule: diffusers' timesteps exactly (4 steps: 999, 749, 499, 249), each at its
    # training sigma (diffusers computes those in float32, hence the rtol).
    sched = EulerDiscreteScheduler(**SD, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    ours = get_sigmas("trailing", steps, SIGMAS)
    expected = torch.cat([SIGMAS[sched.timesteps.long()], torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.equal(ours, expected)
    torch.testing.assert_close(ours, sched.sigmas, rtol=1e-6, atol=0)
    if steps == 4:
        assert sched.timesteps.long().tolist() == [999, 749, 499, 249]


def test_trailing_is_not_simple_where_steps_do_not_divide_1000():
    # `simple` floors the stride (ComfyUI / A1111), trailing rounds: an alias would be wrong at 3, 6, 7 steps
    assert torch.equal(get_sigmas("trailing", 4, SIGMAS), get_sigmas("simple", 4, SIGMAS))
    assert not torch.equal(get_sigmas("trailing", 3, SIGMAS), get_sigmas("simple", 3, SIGMAS))


@pytest.mark.parametrize("steps", [7, 10, 50])
def test_ddim_uniform_matches_diffusers_ddim_leading(steps):
    sched = DDIMScheduler(**SD, timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(steps)
    expected = torch.cat([SIGMAS[sched.timesteps.long()], torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.equal(get_sigmas("ddim_uniform", steps, SIGMAS), expected)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_schedule_matches_diffusers_lcm(steps):
    sched = LCMScheduler(**SD)
    sched.set_timesteps(steps)
    expected = torch.cat([SIGMAS[sched.timesteps.long()], torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.equal(get_sigmas("lcm", steps, SIGMAS), expected)


@pytest.mark.parametrize("q", [1e-6, 0.01, 0.3, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("a,b", [(0.6, 0.6), (2.0, 5.0), (0.5, 1.5)])
def test_beta_ppf_matches_mpmath(q, a, b):
    # mpmath (torch's own dependency) as the oracle: its regularized incomplete beta at our quantile
    x = beta_ppf(q, a, b)
    assert float(mpmath.betainc(a, b, 0, x, regularized=True)) == pytest.approx(q, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("steps", [5, 20])
def test_beta_schedule_against_mpmath_quantiles(steps):
    def ppf(q):  # oracle: mpmath root of I_x(0.6, 0.6) = q
        if q >= 1:
            return 1.0
        return float(mpmath.findroot(lambda x: mpmath.betainc(0.6, 0.6, 0, x, regularized=True) - q, (0, 1),
                                     solver="bisect", tol=1e-30, maxsteps=200))
    ts = [int(np.rint(ppf(1 - i / steps) * 999)) for i in range(steps)]
    ts = [t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    expected = torch.cat([SIGMAS[ts], torch.zeros(1, dtype=torch.float64)]).float()
    assert torch.equal(get_sigmas("beta", steps, SIGMAS), expected)


def test_align_your_steps():
    ten = get_sigmas("align_your_steps", 10, SIGMAS)
    torch.testing.assert_close(ten, torch.tensor(AYS_SD1[:-1] + [0.0]), rtol=1e-7, atol=0)
    twenty = get_sigmas("align_your_steps", 20, SIGMAS)
    # log-linear interpolation keeps the published levels at every other point, geometric means between
    torch.testing.assert_close(twenty[0:20:2], ten[:10], rtol=1e-6, atol=0)
    torch.testing.assert_close(twenty[1:20:2], (ten[:10] * torch.tensor(AYS_SD1[1:])) ** 0.5, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 9, 30])
def test_schedule_properties(name, steps):
    s = get_sigmas(name, steps, SIGMAS)
    assert s.dtype == torch.float32 and s.ndim == 1
    assert len(s) == steps + 1
    assert s[-1] == 0 and torch.all(s[1:] < s[:-1])
    assert float(s[0]) <= float(SIGMAS[-1]) * (1 + 1e-6) and float(s[-2]) >= float(SIGMAS[0]) * (1 - 1e-6)


@pytest.mark.parametrize("args", [("nope", 10), ("normal", 0), ("karras", 1001), ("normal", 2.5), ("lcm", 51)])
def test_get_sigmas_rejects_bad_input(args):
    with pytest.raises(UsageError):
        get_sigmas(args[0], args[1], SIGMAS)


def test_sigma_to_t_matches_diffusers_and_inverts_t_to_sigma():
    sigmas = get_sigmas("karras", 12, SIGMAS)[:-1]
    sched = EulerDiscreteScheduler(**SD)
    log_sigmas = np.log(SIGMAS.numpy())
    ref = np.array([sched._sigma_to_t(s, log_sigmas) for s in sigmas.double().numpy()])
    t = sigma_to_t(sigmas, SIGMAS)
    assert t.dtype == torch.float32 and t.shape == sigmas.shape
    np.testing.assert_allclose(t.numpy(), ref, rtol=0, atol=1e-3)
    assert not torch.equal(t, t.round())  # not rounded
    torch.testing.assert_close(t_to_sigma(t.double(), SIGMAS).float(), sigmas, rtol=1e-5, atol=0)
    whole = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(sigma_to_t(SIGMAS[whole].float(), SIGMAS), whole.float(), rtol=0, atol=1e-3)


def test_sigma_to_t_is_device_and_shape_preserving():
    s = torch.tensor([[1.0, 2.0]])
    assert sigma_to_t(s, SIGMAS).shape == (1, 2)
    assert sigma_to_t(torch.tensor(3.0), model_sigmas(AC)).shape == ()


@pytest.mark.parametrize("text,expected", [("14.6,7.0,1,0", [14.6, 7.0, 1.0, 0.0]), (" 3, 1.5 ,0.5", [3, 1.5, 0.5]),
                                           ("2,0,", [2.0, 0.0])])
def test_parse_sigmas(text, expected):
    got = parse_sigmas(text)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("text", ["", "5", "1,2", "3,3,0", "3,abc,0", "3,nan,0", "3,inf,0", "3,-1", "3;2;0"])
def test_parse_sigmas_rejects(text):
    with pytest.raises(UsageError, match="--sigmas"):
        parse_sigmas(text)


@pytest.mark.parametrize("steps,strength", [(20, 0.75), (10, 0.3), (25, 1.0), (30, 0.51), (10, 0.05), (7, 0.0)])
def test_img2img_sigmas_runs_the_steps_diffusers_runs(steps, strength):
    sched = EulerDiscreteScheduler(**SD)
    sched.set_timesteps(steps)
    timesteps, n_run = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), steps,
                                                                    strength, "cpu")
    full = sched.sigmas
    tail = img2img_sigmas(full, strength)
    assert len(tail) - 1 == n_run == len(timesteps)
    assert torch.equal(tail, full[len(full) - 1 - n_run:])


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_img2img_strength_out_of_range(strength):
    with pytest.raises(UsageError, match="strength"):
        img2img_sigmas(get_sigmas("normal", 10, SIGMAS), strength)
