"""Issue 31's fp32 CPU levers in the UNet: GEGLU's dense gate (the same bytes) and the 3x3 convolutions on packed
weights (models/packed_conv.py, SDCLI_CPU_PACKED_CONV=1: a few ulp from torch's own convolution).

The oracle is torch's own op on the same random weights: nn.Conv2d (F.conv2d) for the packed convolution, within
1e-5 of the largest output (the brgemm kernel sums the 9 * C_in products in another order than the direct
kernel; measured ~5e-6), and the pre-lever GEGLU expression, bit for bit. Both must give one result at 1-4 threads
(the project's thread-count invariance, tests/test_thread_invariance.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdcli.models import packed_conv
from sdcli.models.invariant import gelu
from sdcli.models.packed_conv import PackedConv2d
from sdcli.models.unet import GEGLU

THREADS = (1, 2, 3, 4)


@pytest.fixture
def packing(monkeypatch):
    monkeypatch.setenv(packed_conv.SWITCH_ENV, "1")


@pytest.fixture(autouse=True)
def _threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def conv(cin: int, cout: int, stride: int = 1, seed: int = 0) -> PackedConv2d:
    torch.manual_seed(seed)
    m = PackedConv2d(cin, cout, 3, stride=stride, padding=1)
    with torch.no_grad():
        m.weight.mul_(3.0)  # larger outputs than the default init: more bits that can differ
    return m.requires_grad_(False)


def plain(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cin,cout,hw,stride", [(64, 96, 16, 1), (96, 64, 8, 1), (64, 64, 16, 2), (4, 32, 8, 1)])
def test_packed_matches_torch_and_threads(packing, cin, cout, hw, stride):
    m = conv(cin, cout, stride)
    x = torch.randn(2, cin, hw, hw)
    with torch.inference_mode():
        outs = []
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(m(x))
        ref = plain(m, x)
    assert m._packed is not None  # the packed path ran
    assert outs[0].is_contiguous() and outs[0].shape == ref.shape
    assert close(outs[0], ref) < 1e-5
    for t, o in zip(THREADS, outs):
        assert torch.equal(o, outs[0]), f"{t} threads"


def test_off_by_default_is_torch(monkeypatch):
    monkeypatch.delenv(packed_conv.SWITCH_ENV, raising=False)
    m = conv(32, 32)
    x = torch.randn(2, 32, 8, 8)
    with torch.inference_mode():
        assert torch.equal(m(x), plain(m, x))
    assert m._packed is None


def test_not_packed_where_it_does_not_apply(packing):
    m = conv(16, 16)
    big = torch.randn(1, 16, 32, 32)  # above PACKED_MAX_PIXELS
    with torch.inference_mode():
        assert torch.equal(m(big), plain(m, big))
        assert m._packed is None
        m.padding_mode = "circular"  # --seamless
        x = torch.randn(1, 16, 8, 8)
        assert torch.equal(m(x), nn.Conv2d.forward(m, x))
        assert m._packed is None
        m.padding_mode = "zeros"
        m64 = conv(16, 16).double()
        assert torch.equal(m64(x.double()), plain(m64, x.double()))  # fp64: torch's own
        assert m64._packed is None
    m = conv(16, 16).float()
    x = torch.randn(1, 16, 8, 8, requires_grad=True)  # autograd: torch's own
    assert torch.equal(m(x), plain(m, x))


def test_packed_again_when_the_weight_changes(packing):
    m = conv(32, 48)
    x = torch.randn(2, 32, 8, 8)
    with torch.inference_mode():
        m(x)
    first = m._packed
    m.weight = nn.Parameter(m.weight * 0.5, requires_grad=False)  # a LoRA merge: a new Parameter
    with torch.inference_mode():
        assert close(m(x), plain(m, x)) < 1e-5
        assert m._packed is not first
    with torch.no_grad():
        m.weight.add_(1.0)  # an in-place edit
    with torch.inference_mode():
        assert close(m(x), plain(m, x)) < 1e-5
        assert close(m(x[:1]), plain(m, x[:1])) < 1e-5  # another input shape


def old_geglu(module: GEGLU, x: torch.Tensor) -> torch.Tensor:
    """GEGLU as it was before issue 31: gelu through a dense copy of the strided gate and back, a strided product."""
    value, gate = module.proj(x).chunk(2, dim=-1)
    return value * gelu(gate, inplace=True)


@pytest.mark.parametrize("n", [77, 4096])
def test_geglu_same_bytes(n):
    torch.manual_seed(0)
    m = GEGLU(40, 160)
    x = torch.randn(2, n, 40)
    with torch.inference_mode():
        outs = []
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(m(x))
            assert torch.equal(outs[-1], old_geglu(m, x)), f"{t} threads"
    assert all(torch.equal(o, outs[0]) for o in outs)
    y = torch.randn(2, 8, 40, requires_grad=True)  # under autograd: the plain product, gradients flow
    m(y).sum().backward()
    assert y.grad is not None
