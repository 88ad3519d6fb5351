"""bf16 CPU linear layers with GEGLU's GELU and product, or the residual add, inside oneDNN's GEMM
(models/fused_linear.py): what they compute, where they run, and that the separate ops are untouched elsewhere.

Oracle: the same arithmetic in fp32 with the fused path's one bf16 rounding per output made explicit, so what is
left is the GEMM's summation order (within one bf16 rounding of the output's scale); and the fused result is at
least as close to the all-fp32 layer as the separate bf16 ops are. Off the fused path (switched off, fp32,
autograd, a Linear subclass) the transformer block is the separate ops' formula, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdcli.models import fused_linear, unet

BF16_ULP = 2.0**-8  # one bf16 rounding is at most half of 2^-7 of the value's binade
ONEDNN_BF16 = fused_linear.device.cpu_onednn_bf16()
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 GEMM on this CPU (AVX2 only): "
                                       "the separate ops run there, as test_not_fused_where checks")


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def layer(cls, *args, seed: int = 0):
    torch.manual_seed(seed)
    m = cls(*args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    return m.requires_grad_(False).bfloat16()


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.delenv(fused_linear.SWITCH_ENV, raising=False)
    monkeypatch.delenv(fused_linear.BINARY_ENV, raising=False)
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def binary(monkeypatch, on: bool) -> None:
    monkeypatch.setenv(fused_linear.BINARY_ENV, "1" if on else "0")


@needs_onednn_bf16
@pytest.mark.parametrize("post_op", [True, False], ids=["binary post-op", "in place"])
def test_geglu_is_the_fp32_gelu_of_the_gate_rounded_once(post_op, monkeypatch):
    """The gate is gelu of the fp32 accumulator, rounded once; the product is the value's post-op (one rounding)
    or, without binary post-ops, the bf16 value times the gate in place (the value rounded first)."""
    binary(monkeypatch, post_op)
    m = layer(unet.GEGLU, 64, 128)
    x = torch.randn(2, 300, 64).bfloat16()
    with torch.inference_mode():
        got = m(x).float()
    w, b = m.proj.weight.float(), m.proj.bias.float()
    value, gate = F.linear(x.float(), w, b).chunk(2, dim=-1)
    emulated = bf16((value if post_op else bf16(value)) * bf16(F.gelu(gate)))
    scale = float(emulated.abs().max())
    assert float((got - emulated).abs().max()) <= BF16_ULP * scale
    exact = value * F.gelu(gate)
    with torch.inference_mode():
        separate = separate_geglu(m, x).float()
    if post_op:
        assert float((got - exact).abs().max()) <= float((separate - exact).abs().max())
    assert not torch.equal(got, separate)  # the GELU ran on the fp32 accumulator, not on the rounded gate


@needs_onednn_bf16
def test_binary_post_ops_only_with_amx(monkeypatch):
    """Measured faster only there (models/fused_linear.py); the switch forces either way."""
    monkeypatch.setattr(fused_linear.device, "cpu_has_amx", lambda: True)
    assert fused_linear.binary_post_ops()
    binary(monkeypatch, False)
    assert not fused_linear.binary_post_ops()
    monkeypatch.setattr(fused_linear.device, "cpu_has_amx", lambda: False)
    monkeypatch.delenv(fused_linear.BINARY_ENV)
    assert not fused_linear.binary_post_ops()
    binary(monkeypatch, True)
    assert fused_linear.binary_post_ops()


@needs_onednn_bf16
def test_geglu_gate_is_the_erf_gelu_not_the_tanh_one():
    """gate = x exactly and value = 1, so the output is bf16(gelu(x)): the tanh GELU is 10% off at x = -3."""
    m = unet.GEGLU(1, 1).bfloat16()
    with torch.no_grad():
        m.proj.weight.copy_(torch.tensor([[0.0], [1.0]]))
        m.proj.bias.copy_(torch.tensor([1.0, 0.0]))
    x = torch.linspace(-5, 5, 1001).bfloat16()[None, :, None]
    with torch.inference_mode():
        got = m(x).float()
    want = bf16(F.gelu(x.float()))
    assert ((got - want).abs() <= 2 * BF16_ULP * want.abs()).all()


@needs_onednn_bf16
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_is_one_rounding_of_the_fp32_gelu_it_names(approximate):
    """y = x exactly (one input, weight 1), so the output is bf16(gelu(x)) of that formula: erf and tanh GELU are
    10% apart at x = -3; and at real widths one rounding of the fp32 layer."""
    one = nn.Linear(1, 1).bfloat16()
    with torch.no_grad():
        one.weight.fill_(1.0)
        one.bias.zero_()
    x = torch.linspace(-5, 5, 1001).bfloat16()[None, :, None]
    with torch.inference_mode():
        got = fused_linear.linear_gelu(x, one, approximate).float()
    want = bf16(F.gelu(x.float(), approximate=approximate))
    assert ((got - want).abs() <= 2 * BF16_ULP * want.abs()).all()
    lin = layer(nn.Linear, 64, 96)
    x = torch.randn(2, 300, 64).bfloat16()
    with torch.inference_mode():
        got = fused_linear.linear_gelu(x, lin, approximate).float()
    exact = F.gelu(F.linear(x.float(), lin.weight.float(), lin.bias.float()), approximate=approximate)
    assert float((got - bf16(exact)).abs().max()) <= BF16_ULP * float(exact.abs().max())


@needs_onednn_bf16
def test_sd3s_mlp_runs_its_gelu_in_the_gemm():
    from sdcli.models import mmdit

    mlp = layer(mmdit.Mlp, 64, 256)
    x = torch.randn(2, 300, 64).bfloat16()
    with torch.inference_mode():
        got = mlp(x)
        assert torch.equal(got, mlp.fc2(fused_linear.linear_gelu(x, mlp.fc1, "tanh")))
        assert not torch.equal(got, mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))


@needs_onednn_bf16
def test_fluxs_mlps_run_their_gelu_in_the_gemm_piece_by_piece(monkeypatch):
    """FLUX's MLP input projections go through row pieces of the weight (a GGUF weight is never dequantized whole):
    each piece with the tanh GELU as its post-op, the same bits as one post-op GEMM over the whole weight."""
    from sdcli.models import flux
    from sdcli.quant import layers

    monkeypatch.setattr(layers, "PIECE_BYTES", 256 * 64 * 2)  # 256-row pieces of the 64 -> 1024 weight
    lin = layer(nn.Linear, 64, 1024)
    x = torch.randn(2, 300, 64).bfloat16()
    assert len(layers.row_pieces(lin, x, 0, 1024)) == 4
    with torch.inference_mode():
        got = layers.linear_pieces(lin, x, rows=flux.gelu_rows)
        assert torch.equal(got, fused_linear.linear_gelu(x, lin, "tanh"))
        assert torch.equal(flux.gelu_rows(lin, x, 256, 768), got[..., 256:768])
        assert not torch.equal(got, F.gelu(lin(x), approximate="tanh"))


def separate_geglu(m: unet.GEGLU, x: torch.Tensor) -> torch.Tensor:
    value, gate = m.proj(x).chunk(2, dim=-1)
    return value * F.gelu(gate)


def linear_add_case(k: int, n: int):
    """A (k -> n) layer, its input and a residual: (2, 300, .) bf16."""
    return layer(nn.Linear, k, n), torch.randn(2, 300, k).bfloat16(), torch.randn(2, 300, n).bfloat16()


@needs_onednn_bf16
@pytest.mark.parametrize("k, n", [(64, 64), (256, 64)])
def test_linear_add_is_one_rounding_of_the_fp32_sum(k, n, monkeypatch):
    binary(monkeypatch, True)
    lin, x, residual = linear_add_case(k, n)
    with torch.inference_mode():
        got = fused_linear.linear_add(x, lin, residual).float()
        separate = (residual + lin(x)).float()
    exact = residual.float() + F.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert float((got - bf16(exact)).abs().max()) <= BF16_ULP * float(exact.abs().max())
    assert float((got - exact).abs().max()) <= float((separate - exact).abs().max())
    assert not torch.equal(got, separate)


@needs_onednn_bf16
@pytest.mark.parametrize("k, n", [(64, 64), (256, 64)])
def test_linear_add_without_binary_post_ops_is_the_separate_ops(k, n, monkeypatch):
    """oneDNN's plain GEMM is torch's linear, bit for bit; the add then runs in place on its output."""
    binary(monkeypatch, False)
    lin, x, residual = linear_add_case(k, n)
    with torch.inference_mode():
        got = fused_linear.linear_add(x, lin, residual)
        assert torch.equal(got, residual + lin(x))
        assert torch.equal(fused_linear.linear_add(x, lin, residual.transpose(0, 1).contiguous().transpose(0, 1)),
                           got)  # a strided residual  # fmt: skip


@needs_onednn_bf16
@pytest.mark.parametrize("post_op", [True, False], ids=["binary post-op", "in place"])
def test_fused_layers_are_one_result_at_every_thread_count(post_op, monkeypatch):
    """Nothing of ours depends on the thread count (one oneDNN call per layer, no chunking). At these small shapes
    (K <= 128) no CPU measured splits the GEMM's sum between threads; at larger ones oneDNN's AMX kernels do, for
    the fused and the plain layers alike (the known gap: README, tests/test_thread_invariance.py)."""
    binary(monkeypatch, post_op)
    m, lin = layer(unet.GEGLU, 64, 128), layer(nn.Linear, 128, 64)
    x, residual = torch.randn(2, 256, 64).bfloat16(), torch.randn(2, 256, 64).bfloat16()
    outs = []
    with torch.inference_mode():
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            h = m(x)
            outs.append((h, fused_linear.linear_add(h, lin, residual)))
    for t, o in zip((1, 2, 3, 4), outs):
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0])), f"{t} threads"


@pytest.mark.parametrize("case", ["switched off", "fp32", "autograd", "Linear subclass", "no oneDNN bf16"])
def test_not_fused_where(case, monkeypatch):
    """Off the fused path the block is x + attn1(norm1(x)), + attn2(...), + ff(...): the separate ops' bits."""
    torch.manual_seed(0)
    block = unet.BasicTransformerBlock(64, 32, 2, 32)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.05)
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    block = block.to(dtype)
    if case == "switched off":
        monkeypatch.setenv(fused_linear.SWITCH_ENV, "0")
    if case == "no oneDNN bf16":
        monkeypatch.setattr(fused_linear.device, "cpu_onednn_bf16", lambda: False)
    if case == "Linear subclass":  # as a GGUF's QuantizedLinear: its own forward, never oneDNN's post-op GEMM
        for owner, key in ((block.ff.net[0], "proj"), (block.ff.net, 2), (block.attn1.to_out, 0),
                           (block.attn2.to_out, 0)):  # fmt: skip
            swap_for_subclass(owner, key, dtype)
    x, ctx = torch.randn(2, 300, 64, dtype=dtype), torch.randn(2, 77, 32, dtype=dtype)
    with torch.inference_mode(case != "autograd"):
        got = block(x, ctx)
        want = x + block.attn1.to_out(unet.attention(*(f(block.norm1(x)) for f in (
            block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)), 2))  # fmt: skip
        n2 = block.norm2(want)
        want = want + block.attn2.to_out(unet.attention(block.attn2.to_q(n2), block.attn2.to_k(ctx),
                                                        block.attn2.to_v(ctx), 2))  # fmt: skip
        want = want + block.ff.net[2](separate_plain_geglu(block.ff.net[0], block.norm3(want)))
    assert torch.equal(got, want)


class OtherLinear(nn.Linear):
    pass


def swap_for_subclass(owner: nn.Module, key: str | int, dtype: torch.dtype) -> None:
    old = owner[key] if isinstance(key, int) else getattr(owner, key)
    new = OtherLinear(old.in_features, old.out_features).to(dtype)
    new.load_state_dict(old.state_dict())
    if isinstance(key, int):
        owner[key] = new
    else:
        setattr(owner, key, new)


def separate_plain_geglu(m: unet.GEGLU, x: torch.Tensor) -> torch.Tensor:
    value, gate = m.proj(x).chunk(2, dim=-1)
    return value * unet.gelu(gate.contiguous())


@needs_onednn_bf16
def test_a_block_runs_fused_on_a_bf16_cpu():
    torch.manual_seed(0)
    block = unet.BasicTransformerBlock(64, 32, 2, 32)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.05)
    block = block.bfloat16()
    x, ctx = torch.randn(2, 300, 64).bfloat16(), torch.randn(2, 77, 32).bfloat16()
    with torch.inference_mode():
        fused = block(x, ctx)
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setenv(fused_linear.SWITCH_ENV, "0")
        separate = block(x, ctx)
    assert not torch.equal(fused, separate)
    assert float((fused.float() - separate.float()).abs().max()) < 0.05 * float(separate.float().abs().max())
