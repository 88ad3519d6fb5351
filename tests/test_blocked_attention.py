"""The bf16 CPU attention in query blocks (models/unet.py `_attention_bf16_blocks`, issue 31): where it runs,
what it computes, and one result at any thread count.

Oracle: the same arithmetic in fp32 with its three bf16 roundings made explicit (q * scale, the scores q k^T, the
probabilities), so what is left is fp32 summation order: within one bf16 rounding of the output's scale. (Against
the exact fp32 attention the bf16 scores cost ~4x the flash kernel's error; the image-level guard, PSNR against
fp32, is measured in docs/benchmarks.md.) Elsewhere (fp32, autograd, head dim 64+, fewer than 4096 keys, switched
off, a CPU with AMX) the attention is torch's SDPA, bit for bit. Whether this CPU has AMX is patched in each test,
so the suite checks both choices on every machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdcli.models import unet
from sdcli.runtime import device

BF16_ULP = 2.0**-8  # bf16's 8-bit significand: one rounding is at most half of 2^-7 of the value's binade


def heads(n: int, d: int, seed: int = 0, h: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, h * d, generator=g).bfloat16() for _ in range(3)]


def emulated(q, k, v, h: int):
    """fp32 attention with the blocked path's roundings: q * scale, the scores and the probabilities in bf16."""
    b, n, inner = q.shape
    d = inner // h
    q, k, v = (t.float().reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))
    qs = (q * d**-0.5).bfloat16().float()
    p = torch.softmax((qs @ k.transpose(-1, -2)).bfloat16().float(), dim=-1).bfloat16().float()
    return (p @ v).transpose(1, 2).reshape(b, n, inner)


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.delenv(unet.BLOCKED_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(unet.device, "cpu_has_amx", lambda: False)
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


# With AMX, oneDNN splits the sum of the (40 x 4096) . (4096 x 256) product over threads at 3 of them, so the
# blocks are one result at any thread count only where they are chosen: on CPUs without AMX.
THREADS = (1,) if device.cpu_has_amx() else (1, 2, 3, 4)


def test_blocked_is_its_arithmetic_and_one_result_at_every_thread_count():
    q, k, v = heads(4096, 40)
    outs = []
    with torch.inference_mode():
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(unet.attention(q, k, v, 2))
    for t, o in zip(THREADS, outs):
        assert torch.equal(o, outs[0]), f"{t} threads"
    out = outs[0].float()
    emu = emulated(q, k, v, 2)
    scale = float(emu.abs().max())
    assert float((out - emu).abs().max()) <= BF16_ULP * scale
    with torch.inference_mode():
        flash = F.scaled_dot_product_attention(*(t.reshape(1, 4096, 2, 40).transpose(1, 2) for t in (q, k, v)))
    assert not torch.equal(out, flash.transpose(1, 2).reshape(1, 4096, 80).float())  # the blocked path ran


@pytest.mark.parametrize("case", ["fp32", "autograd", "head dim 64", "few keys", "switched off", "AMX"])
def test_sdpa_where_blocks_do_not_apply(case, monkeypatch):
    n, d = (1024, 40) if case == "few keys" else (4096, 64 if case == "head dim 64" else 40)
    q, k, v = heads(n, d, h=1)
    if case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    if case == "switched off":
        monkeypatch.setenv(unet.BLOCKED_ATTENTION_ENV, "0")
    if case == "AMX":
        monkeypatch.setattr(unet.device, "cpu_has_amx", lambda: True)
    with torch.inference_mode(case != "autograd"):
        got = unet.attention(q, k, v, 1)
        want = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
    assert torch.equal(got, want)


def test_forced_on_runs_the_blocks_with_amx_too(monkeypatch):
    monkeypatch.setattr(unet.device, "cpu_has_amx", lambda: True)
    monkeypatch.setenv(unet.BLOCKED_ATTENTION_ENV, "1")
    q, k, v = heads(4096, 40, h=1)
    with torch.inference_mode():
        got = unet.attention(q, k, v, 1)
        monkeypatch.setenv(unet.BLOCKED_ATTENTION_ENV, "0")
        flash = unet.attention(q, k, v, 1)
    assert torch.equal(got, unet._attention_bf16_blocks(*(t[:, None] for t in (q, k, v)))[:, 0])
    assert not torch.equal(got, flash)


def test_the_flash_kernel_that_amx_cpus_take_is_one_result_at_every_thread_count(monkeypatch):
    """The bf16 path on AMX (torch's flash kernel, on the tiles where the machine has them)."""
    monkeypatch.setattr(unet.device, "cpu_has_amx", lambda: True)
    q, k, v = heads(4096, 40)
    outs = []
    with torch.inference_mode():
        for t in (1, 2, 3, 4):
            torch.set_num_threads(t)
            outs.append(unet.attention(q, k, v, 2))
    for t, o in zip((1, 2, 3, 4), outs):
        assert torch.equal(o, outs[0]), f"{t} threads"
