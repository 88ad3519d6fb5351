"""bf16 CPU attention with the exponentials inside the score GEMM (models/cpu_attention.py, issue 31): where it
runs, what it computes, its fallback for a loose bound, and one result at any thread count.

Oracles: (1) the same arithmetic in fp32 with its bf16 roundings made explicit (q * scale and the shift; p; o and l;
the output), so what is left is fp32 summation order and sigmoid(x) against e^x (relative e^-10): within one bf16
rounding of the output's scale; (2) fp32 attention itself, within the error those roundings can add. Elsewhere
(fp32, autograd, fewer than 256 keys, switched off, a CPU with AMX) the attention is torch's SDPA, bit for bit.
Whether this CPU has AMX is patched in each test, so the suite checks both choices on every machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdcli.models import cpu_attention, flux, mmdit, unet, vae
from sdcli.runtime import device

BF16_ULP = 2.0**-8  # bf16's 8-bit significand: one rounding is at most half of 2^-7 of the value's binade
pytestmark = pytest.mark.skipif(not device.cpu_onednn_bf16(), reason="needs oneDNN's bf16 kernels (x86-64)")


def heads(n: int, d: int, seed: int = 0, h: int = 2, nk: int | None = None):
    """(1, H, N, d) bf16 q, k, v."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, m, d, generator=g).bfloat16() for m in (n, nk or n, nk or n)]


def emulated(q, k, v):
    """The blocked path's arithmetic in fp32: its roundings to bf16 explicit, e^x for the sigmoid."""
    d = q.shape[-1]
    qs = (q.float() * d**-0.5).bfloat16().float()
    shift = (cpu_attention._score_bound(qs, k.float()) + cpu_attention.MARGIN).bfloat16().float()
    p = torch.exp(qs @ k.float().transpose(-1, -2) - shift[..., None]).bfloat16().float()
    o, l = (p @ v.float()).bfloat16().float(), p.sum(-1, keepdim=True).bfloat16().float()
    return (o / l).bfloat16().float()


def exact(q, k, v):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()


def exact_after_scaling(q, k, v):
    """fp64 attention of q * scale as the path rounds it to bf16: at scores of ~100 that rounding alone moves p by
    ~20%, in any bf16 attention that scales q (the flash kernel scales in fp32)."""
    d = q.shape[-1]
    qs = (q.float() * d**-0.5).bfloat16().double()
    return torch.softmax(qs @ k.double().transpose(-1, -2), -1).matmul(v.double()).float()


def rounding_bound(v, ref) -> float:
    """What rounding p, o, l and the output to bf16 (half a step each, 2^-9 relative) can move an output by: p's
    by at most 2^-9 max|v|, the other three by 2^-9 of the output each (o's, as o / l, a little more)."""
    return 2**-9 * (float(v.abs().max()) + 4 * float(ref.abs().max()))


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.delenv(cpu_attention.SWITCH_ENV, raising=False)
    monkeypatch.setattr(cpu_attention.device, "cpu_has_amx", lambda: False)
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


# With AMX, oneDNN splits the sum of the (d x 4096) . (4096 x rows) product over threads at some counts, so the
# blocks are one result at any thread count only where they are chosen: on CPUs without AMX.
THREADS = (1,) if device.cpu_has_amx() else (1, 2, 3, 4)


@pytest.mark.parametrize("n, d", [(4096, 40), (600, 128)])
def test_blocked_is_its_arithmetic_and_one_result_at_every_thread_count(n, d):
    q, k, v = heads(n, d)
    outs = []
    with torch.inference_mode():
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(cpu_attention.scaled_dot_product(q, k, v))
    for t, o in zip(THREADS, outs):
        assert torch.equal(o, outs[0]), f"{t} threads"
    out, emu, ref = outs[0].float(), emulated(q, k, v), exact(q, k, v)
    scale = float(emu.abs().max())
    assert float((out - emu).abs().max()) <= BF16_ULP * scale
    assert float((out - ref).abs().max()) <= rounding_bound(v, ref) + 2**-8 * scale  # + q * scale's rounding
    flash = F.scaled_dot_product_attention(q, k, v)
    assert not torch.equal(outs[0], flash)  # the blocked path ran


def _counting_blocks(monkeypatch) -> list:
    calls = []
    real = cpu_attention._block

    def spy(qa, ka, vt, into):
        calls.append(qa.shape[0])
        real(qa, ka, vt, into)

    monkeypatch.setattr(cpu_attention, "_block", spy)
    return calls


def test_a_loose_bound_redoes_the_underflowed_rows_with_their_true_maximum(monkeypatch):
    """Keys of norm 200 in random directions: the bound is ~200 above zero, the true maxima ~100 lower, so every p
    of a row underflows (its sum is 0). The rows are done again; without that the output is 0 / 0."""
    q, k, v = heads(512, 40, h=1)
    k = (k.float() / k.float().norm(dim=-1, keepdim=True) * 200).bfloat16()
    monkeypatch.setattr(cpu_attention, "BLOCK_SCORES", 128 * 512)  # blocks of 128 rows, the redone rows too
    calls = _counting_blocks(monkeypatch)
    with torch.inference_mode():
        out = cpu_attention.blocked(q, k, v).float()
        assert calls == [128] * 8  # every row twice: once with the bound, once redone
        monkeypatch.setattr(cpu_attention, "_redo_underflowed", lambda *a: None)
        assert not torch.isfinite(cpu_attention.blocked(q, k, v)).all()
    ref = exact_after_scaling(q, k, v)
    assert float((out - ref).abs().max()) <= rounding_bound(v, ref)


def test_keys_with_a_large_common_part_get_a_tight_bound(monkeypatch):
    """Keys = c + noise with |c| = 1000 (activations share such parts): |q| max|k| is far above every score, the
    bound about the keys' mean is not, so no row is redone, and the output is fp32's within the bf16 roundings."""
    q, k, v = heads(512, 40, h=1)
    k = (k.float() + 1000 * torch.nn.functional.normalize(torch.randn(40), dim=0)).bfloat16()
    calls = _counting_blocks(monkeypatch)
    with torch.inference_mode():
        out = cpu_attention.blocked(q, k, v).float()
    assert sum(calls) == 512
    ref = exact_after_scaling(q, k, v)
    assert float((out - ref).abs().max()) <= rounding_bound(v, ref)


def test_nan_propagates_as_in_torchs_kernel():
    q, k, v = heads(256, 40, h=1)
    q[0, 0, 3, 5] = float("nan")
    with torch.inference_mode():
        out = cpu_attention.blocked(q, k, v)
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(out[0, 0, 4:]).all()


@pytest.mark.parametrize("case", ["fp32", "autograd", "few keys", "switched off", "AMX"])
def test_sdpa_where_blocks_do_not_apply(case, monkeypatch):
    n = cpu_attention.MIN_KEYS - 1 if case == "few keys" else cpu_attention.MIN_KEYS
    q, k, v = (t.transpose(1, 2).reshape(1, n, 40) for t in heads(n, 40, h=1))
    if case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    if case == "switched off":
        monkeypatch.setenv(cpu_attention.SWITCH_ENV, "0")
    if case == "AMX":
        monkeypatch.setattr(cpu_attention.device, "cpu_has_amx", lambda: True)
    with torch.inference_mode(case != "autograd"):
        got = unet.attention(q, k, v, 1)
        want = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    assert torch.equal(got, want)


def test_forced_on_runs_the_blocks_with_amx_too(monkeypatch):
    monkeypatch.setattr(cpu_attention.device, "cpu_has_amx", lambda: True)
    monkeypatch.setenv(cpu_attention.SWITCH_ENV, "1")
    q, k, v = heads(1024, 40, h=1)
    with torch.inference_mode():
        got = cpu_attention.scaled_dot_product(q, k, v)
        monkeypatch.setenv(cpu_attention.SWITCH_ENV, "0")
        flash = cpu_attention.scaled_dot_product(q, k, v)
    assert torch.equal(got, cpu_attention.blocked(q, k, v))
    assert not torch.equal(got, flash)


def test_every_model_family_takes_it():
    """The UNet's, SD3's and FLUX's multi-head attention and the VAE's single-head one all run the blocked path."""
    q, k, v = heads(256, 64, h=2)
    with torch.inference_mode():
        want = cpu_attention.blocked(q, k, v)
        as_rows = want.transpose(1, 2).reshape(1, 256, 128)
        assert torch.equal(unet.attention(*(t.transpose(1, 2).reshape(1, 256, 128) for t in (q, k, v)), 2), as_rows)
        assert torch.equal(mmdit.attention(q, k, v), as_rows)
        assert torch.equal(flux.attention([q, k, v]), as_rows)
        maps = [t[:, :1].transpose(2, 3).reshape(1, 64, 16, 16) for t in (q, k, v)]
        single = cpu_attention.blocked(q[:, :1], k[:, :1], v[:, :1])
        assert torch.equal(vae.spatial_attention(*maps), single.transpose(2, 3).reshape(1, 64, 16, 16))


def test_the_flash_kernel_that_amx_cpus_take_is_one_result_at_every_thread_count(monkeypatch):
    """The bf16 path on AMX (torch's flash kernel, on the tiles where the machine has them)."""
    monkeypatch.setattr(cpu_attention.device, "cpu_has_amx", lambda: True)
    q, k, v = heads(4096, 40)
    outs = []
    with torch.inference_mode():
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            outs.append(cpu_attention.scaled_dot_product(q, k, v))
    for t, o in zip((1, 2, 3, 4), outs):
        assert torch.equal(o, outs[0]), f"{t} threads"
