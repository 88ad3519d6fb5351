"""Denoiser wrappers (eps / v, sigma -> t, input scaling), CFG and guidance rescale, against diffusers."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from _fixtures_sampling import AC, SHAPE, SIGMAS, eps_unet, v_unet, x0_fn
from sdcli.sampling.denoise import CFGDenoiser, Denoiser, LCMDenoiser
from sdcli.runtime.errors import UsageError
from sdcli.sampling.schedule import sigma_to_t

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class Recorder:
    """A stand-in UNet that remembers what it was called with; the output depends on x_in, t and cond."""

    def __init__(self, unet=eps_unet):
        self.unet, self.calls = unet, []

    def __call__(self, x_in, t, cond):
        self.calls.append((x_in.clone(), t.clone(), cond.clone()))
        return self.output(x_in, t, cond)

    def output(self, x_in, t, cond):
        # cond scales x_in so that guidance changes the output's spread (what guidance rescale acts on)
        return self.unet(x_in, t) + 0.2 * cond.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * x_in


@pytest.mark.parametrize("prediction,unet,dtype", [("eps", eps_unet, "epsilon"), ("v", v_unet, "v_prediction")])
def test_denoiser_matches_diffusers_euler_step(prediction, unet, dtype):
    sched = EulerDiscreteScheduler(**SD, use_karras_sigmas=True, prediction_type=dtype)
    sched.set_timesteps(9)
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0)) * 3
    cond = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    rec = Recorder(unet)
    denoiser = Denoiser(rec, AC, prediction)
    for i in (0, 4, 8):
        t, sigma = sched.timesteps[i], sched.sigmas[i]
        sched._step_index = i
        x_in = sched.scale_model_input(x, t)
        out = rec.output(x_in, t, cond)
        ref = sched.step(out, t, x).pred_original_sample
        got = denoiser(x, sigma.expand(2), cond)
        x_in_ours, t_ours, cond_ours = rec.calls[-1]
        torch.testing.assert_close(x_in_ours, x_in, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(t_ours, t.expand(2).float(), rtol=0, atol=2e-3)  # fractional, as diffusers
        assert torch.equal(cond_ours, cond)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # with a cond that adds nothing, both give the stand-in's own x0
    zero = torch.zeros_like(cond)
    torch.testing.assert_close(denoiser(x, sched.sigmas[4].expand(2), zero), x0_fn(x, sched.sigmas[4].expand(2)),
                               rtol=1e-5, atol=1e-5)


def test_denoiser_accepts_scalar_sigma_and_keeps_inputs():
    x = torch.randn((3, *SHAPE))
    cond = torch.zeros(3, 4, 8)
    x_copy = x.clone()
    d = Denoiser(Recorder(), AC)
    a = d(x, torch.tensor(2.0), cond)
    b = d(x, torch.full((3,), 2.0), cond)
    assert torch.equal(a, b) and torch.equal(x, x_copy)
    assert a.dtype == x.dtype and a.shape == x.shape


def test_denoiser_float64_input_keeps_dtype():
    x = torch.randn((1, *SHAPE), dtype=torch.float64)
    out = Denoiser(lambda x_in, t, c: x_in * 0.1, AC)(x, torch.tensor([1.5]), torch.zeros(1, 2, 2))
    assert out.dtype == torch.float64


def test_bad_prediction_type():
    with pytest.raises(UsageError, match="prediction"):
        Denoiser(eps_unet, AC, "sample")


def _cfg_reference(x, sigma, cond, uncond, scale, rescale, prediction="eps"):
    """diffusers' pipeline arithmetic: guidance (and rescale) on the UNet output, then x0 as its scheduler."""
    rec = Recorder(eps_unet if prediction == "eps" else v_unet)
    sched = EulerDiscreteScheduler(**SD, prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    sched.set_timesteps(sigmas=[float(sigma), 0.0])
    t = sched.timesteps[0]
    x_in = sched.scale_model_input(x, t)
    out_u, out_c = rec(x_in, t.expand(x.shape[0]), uncond), rec(x_in, t.expand(x.shape[0]), cond)
    out = out_u + scale * (out_c - out_u)
    if rescale > 0:
        out = rescale_noise_cfg(out, out_c, guidance_rescale=rescale)
    return sched.step(out, t, x).pred_original_sample


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("scale,rescale", [(7.5, 0.0), (5.0, 0.7), (3.0, 1.0)])
def test_cfg_and_rescale_match_diffusers(prediction, scale, rescale):
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, *SHAPE), generator=g) * 4
    cond, uncond = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    sigma = torch.tensor(3.7)
    rec = Recorder(eps_unet if prediction == "eps" else v_unet)
    cfg = CFGDenoiser(Denoiser(rec, AC, prediction), cond, uncond, scale, rescale)
    got = cfg(x, sigma.expand(2))
    assert len(rec.calls) == 1  # one batched UNet call ...
    x_in, t, c = rec.calls[0]
    assert x_in.shape[0] == 4 and torch.equal(c, torch.cat([uncond, cond]))  # ... as [uncond; cond]
    ref = _cfg_reference(x, sigma, cond, uncond, scale, rescale, prediction)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


def test_rescale_changes_the_result():
    x = torch.randn((1, *SHAPE)) * 4
    cond, uncond = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    plain = CFGDenoiser(Denoiser(Recorder(), AC), cond, uncond, 9.0, 0.0)(x, torch.tensor([5.0]))
    resc = CFGDenoiser(Denoiser(Recorder(), AC), cond, uncond, 9.0, 0.7)(x, torch.tensor([5.0]))
    assert (plain - resc).abs().max() > 1e-3


def test_cfg_scale_one_runs_cond_only():
    x = torch.randn((2, *SHAPE))
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rec = Recorder()
    got = CFGDenoiser(Denoiser(rec, AC), cond, uncond, 1.0)(x, torch.tensor([2.0, 2.0]))
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == 2 and torch.equal(rec.calls[0][2], cond)
    assert torch.equal(got, Denoiser(Recorder(), AC)(x, torch.tensor([2.0, 2.0]), cond))


def test_cfg_broadcasts_a_single_conditioning_and_handles_unequal_lengths():
    x = torch.randn((3, *SHAPE))
    cond, uncond = torch.randn(1, 154, 8), torch.randn(1, 77, 8)  # two prompt chunks vs one
    rec = Recorder()
    got = CFGDenoiser(Denoiser(rec, AC), cond, uncond, 6.0)(x, torch.tensor(4.0))
    assert len(rec.calls) == 2  # lengths differ: two calls, nothing padded
    d = Denoiser(Recorder(), AC)
    u, c = d(x, torch.tensor(4.0), uncond.expand(3, -1, -1)), d(x, torch.tensor(4.0), cond.expand(3, -1, -1))
    torch.testing.assert_close(got, u + 6.0 * (c - u))


def test_cfg_rejects_mismatched_batches_and_bad_rescale():
    cfg = CFGDenoiser(Denoiser(Recorder(), AC), torch.zeros(2, 3, 8), None, 7.0)
    with pytest.raises(UsageError, match="batch"):
        cfg(torch.zeros(3, *SHAPE), torch.tensor(1.0))
    with pytest.raises(UsageError, match="rescale"):
        CFGDenoiser(Denoiser(Recorder(), AC), torch.zeros(1, 3, 8), None, 7.0, rescale=1.5)


@pytest.mark.parametrize("t", [999, 259, 19])
def test_lcm_denoiser_matches_diffusers_boundary_condition(t):
    sched = LCMScheduler(**SD)
    sched.set_timesteps(4)
    sched._step_index = 0
    sigma = SIGMAS[t].float()
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(t)) * float(sigma)
    x_vp = x / (sigma**2 + 1) ** 0.5
    out = eps_unet(x_vp, torch.tensor(float(t)))
    ref = sched.step(out, torch.tensor(t), x_vp, generator=torch.Generator().manual_seed(0)).denoised
    got = LCMDenoiser(lambda x_in, tt, c: eps_unet(x_in, tt), AC)(x, sigma.expand(2), None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sigma_to_t(sigma, SIGMAS), torch.tensor(float(t)), atol=1e-3)
