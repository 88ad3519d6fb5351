"""Memory layout (sdcli/models/layout.py): channels_last on a CPU (bf16; fp32 on x86-64), the same results either way
(within bf16's rounding, or fp32's few ulp)."""

from __future__ import annotations

import copy

import torch

from sdcli.models import layout
from sdcli.models.unet import UNetConfig, UNetModel
from sdcli.models.vae import AutoencoderKL, VAEConfig
from sdcli.runtime.device import SWITCH_ENV, cpu_onednn

TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_levels=(True, True), num_heads=2,
                       context_dim=32)  # fmt: skip
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def _unet(dtype: torch.dtype) -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(TINY_UNET).to(dtype).eval().requires_grad_(False)


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 4]


def _unet_inputs(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 12, 10, generator=g), torch.tensor([10.0, 500.0]), torch.randn(2, 7, 32, generator=g)


def test_bf16_cpu_unet_runs_channels_last_and_matches_contiguous(monkeypatch):
    # Built outside inference mode, as the loader builds them: a module made under inference_mode holds inference
    # tensors, which CPUs without native bf16 convolutions (AVX2) refuse to convert in place.
    fast = _unet(torch.bfloat16)
    plain = copy.deepcopy(fast)
    x, t, ctx = _unet_inputs(torch.bfloat16)
    with torch.inference_mode():
        out = fast(x, t, ctx)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fast))
    assert out.is_contiguous()  # callers may .view() the prediction
    monkeypatch.setattr(layout, "wants_channels_last", lambda x: False)
    with torch.inference_mode():
        ref = plain(x, t, ctx)
    assert all(w.is_contiguous() for w in _conv_weights(plain))
    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2  # bf16 rounding, not a layout bug


def test_fp32_cpu_unet_channels_last_on_x86_within_ulps_of_contiguous(monkeypatch):
    """fp32 runs channels_last on an x86-64 CPU (oneDNN's brgemm convolutions: another summation order than the
    contiguous direct kernel, a few ulp), contiguous elsewhere; either way one result call after call."""
    fast = _unet(torch.float32)
    plain = copy.deepcopy(fast)
    x, t, ctx = _unet_inputs(torch.float32)
    with torch.inference_mode():
        out = fast(x, t, ctx)
        assert torch.equal(out, fast(x, t, ctx))
    assert getattr(fast, "_channels_last", False) == cpu_onednn()
    assert all(w.is_contiguous(memory_format=torch.channels_last) == cpu_onednn() for w in _conv_weights(fast))
    assert out.is_contiguous()
    monkeypatch.setenv(SWITCH_ENV, "0")
    with torch.inference_mode():
        ref = plain(x, t, ctx)
    assert all(w.is_contiguous() for w in _conv_weights(plain))
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_fp32_cpu_vae_channels_last_within_ulps_of_contiguous(monkeypatch):
    torch.manual_seed(0)
    fast = AutoencoderKL(TINY_VAE).eval().requires_grad_(False)
    plain = copy.deepcopy(fast)
    z = torch.randn(1, 4, 6, 5)
    with torch.inference_mode():
        img = fast.decode(z)
    assert img.is_contiguous()
    assert all(w.is_contiguous(memory_format=torch.channels_last) == cpu_onednn() for w in _conv_weights(fast))
    monkeypatch.setenv(SWITCH_ENV, "0")
    with torch.inference_mode():
        ref = plain.decode(z)
    assert (img - ref).abs().max() / ref.abs().max() < 1e-5


def test_bf16_cpu_vae_channels_last_matches_contiguous(monkeypatch):
    torch.manual_seed(0)
    fast = AutoencoderKL(TINY_VAE).to(torch.bfloat16).eval().requires_grad_(False)
    plain = copy.deepcopy(fast)
    z = torch.randn(1, 4, 6, 5)
    with torch.inference_mode():
        img = fast.decode(z)
        mean, _ = fast.encode(img)
    assert img.is_contiguous() and mean.is_contiguous()
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(fast))
    monkeypatch.setattr(layout, "wants_channels_last", lambda x: False)
    with torch.inference_mode():
        ref = plain.decode(z)
    assert (img.float() - ref.float()).norm() / ref.float().norm() < 2e-2


def test_lora_style_weight_replacement_after_channels_last_still_runs():
    """A LoRA merge replaces conv weights by new Parameters built from the old ones; either layout must run."""
    unet = _unet(torch.bfloat16)
    x, t, ctx = _unet_inputs(torch.bfloat16)
    with torch.inference_mode():
        unet(x, t, ctx)
    conv = unet.input_blocks[0][0]
    with torch.no_grad():
        conv.weight = torch.nn.Parameter(conv.weight.float().contiguous().to(torch.bfloat16), requires_grad=False)
        conv.weight.add_(0)
    with torch.inference_mode():
        assert torch.isfinite(unet(x, t, ctx).float()).all()


def test_switch_env_keeps_bf16_contiguous(monkeypatch):
    monkeypatch.setenv(SWITCH_ENV, "0")
    unet = _unet(torch.bfloat16)
    with torch.inference_mode():
        unet(*_unet_inputs(torch.bfloat16))
    assert all(w.is_contiguous() for w in _conv_weights(unet))
