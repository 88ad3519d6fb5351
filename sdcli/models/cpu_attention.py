"""bf16 attention on a CPU without AMX: the softmax's exponentials inside oneDNN's score GEMM.

Without AMX, torch's CPU flash kernel reaches a fifth to a third of the bf16 GEMM rate at the heads diffusion models
use (d = 40..128): its exponentials, rescaling and two thin GEMMs run as separate passes. OpenVINO's fused MHA is
~2x faster on the same CPU. Here each block of query rows takes two GEMMs and no pass of its own:

1. p = sigmoid(q k^T - shift), with the sigmoid as the GEMM's post-op on its fp32 accumulator. The shift is folded
   into the GEMM: q gets a column -shift, k a column of ones. The shift is an upper bound on the row's largest
   score (Cauchy-Schwarz, `_score_bound`) plus MARGIN, so every argument is at most -MARGIN, where
   sigmoid(x) = e^x / (1 + e^x) is e^x within a relative e^-MARGIN: exp(score - shift), computed from the fp32
   score (the softmax of torch's blocks rounded the scores to bf16 first). p is stored in bf16.
2. [o | l] = p [v | 1]: the output rows and, from a column of ones, each row's sum of the p it used.
   softmax(s) v = o / l, whatever the shift.

A shift far above the true maximum leaves every p of a row near or under fp32's smallest normal (e^-87): a row whose
sum is under MIN_SUM is done again with its true maximum as the shift. No step sums in an order set by the thread
count (without AMX oneDNN does not split a GEMM's sum between threads), so the result is the same at any count.
Measured against torch's flash kernel (Zen 5, 2 threads, bf16; docs/benchmarks.md): 0.40x the time at SD1.5's 4096
tokens (d = 40: 52% of the bf16 GEMM rate, flash 21%), 0.37x at SDXL's (d = 64), 0.45x at SD3.5's and FLUX's
1024px attention, 0.33x in the VAE (d = 512); a UNet call 0.72x, a FLUX step 0.79x, an SD3.5 Medium step 0.67x.
The error against fp32 attention is below that of the bf16-score softmax blocks this replaced and above flash's
(o and l are rounded to bf16 before the division); the image's PSNR against fp32 40.0 dB. Cross-attention on 77
text tokens stays with torch's kernel (as fast there).
`SDCLI_CPU_BLOCKED_ATTENTION=0` / `=1` forces torch's kernel / this path (also with AMX, where torch's flash kernel
runs its GEMMs on the tiles and is the default).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from sdcli.runtime import device

SWITCH_ENV = "SDCLI_CPU_BLOCKED_ATTENTION"
BLOCK_SCORES = 2**21  # p elements per block of query rows (4 MB): 512 rows at 4096 keys, measured fastest (256-1024)
MIN_KEYS = 256  # below it (cross-attention's 77 text tokens) torch's kernel is faster: one GEMM pair per head
MARGIN = 10.0  # sigmoid(x) / e^x - 1 = -e^x / (1 + e^x): at most e^-10 = 4.5e-5 for x <= -10, under bf16's 2^-9
MIN_SUM = math.exp(-60.0)  # a row's largest p is then >= e^-60 / N_keys: its terms that count are normal floats


def applies(q: Tensor, k: Tensor) -> bool:
    """bf16 heads on a CPU whose oneDNN runs bf16 post-op GEMMs, no AMX (unless forced), 256+ keys, no autograd."""
    forced = os.environ.get(SWITCH_ENV, "")
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] >= MIN_KEYS
            and not torch.is_grad_enabled() and forced != "0" and device.cpu_onednn_bf16()
            and (forced == "1" or not device.cpu_has_amx()))  # fmt: skip


def scaled_dot_product(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, H, N, d) heads, no mask: `blocked` where it applies, else torch's SDPA."""
    return blocked(q, k, v) if applies(q, k) else F.scaled_dot_product_attention(q, k, v)


def blocked(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The two-GEMM path on (B, H, N, d) bf16 heads -> (B, H, N, d), a view of (B, N, H, d) memory."""
    b, h, n, d = q.shape
    qa, ka, vt = _augmented(q, k, v)
    sums = q.new_empty(b, h, d + 1, n)  # [o | l] per query, transposed: the second GEMM's natural output
    rows = max(64, BLOCK_SCORES // k.shape[2])
    heads = (t.flatten(0, 1).unbind(0) for t in (qa, ka, vt, sums))  # views made in one op each, not per block
    for qh, kh, vh, into in zip(*heads):
        for qb, ib in zip(qh.split(rows), into.split(rows, dim=1)):
            _block(qb, kh, vh, ib)
    _redo_underflowed(qa, ka, vt, sums, rows)
    out = q.new_empty(b, n, h, d)  # the heads interleaved, as every caller lays them out next
    torch.div(sums[:, :, :d], sums[:, :, d:], out=out.permute(0, 2, 3, 1))  # in fp32, rounded once
    return out.transpose(1, 2)


def _augmented(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[q / sqrt(d) | -shift | 0], [k | 1 | 0] (an even width for the bf16 kernels) and [v | 1]^T per head."""
    b, h, n, d = q.shape
    nk = k.shape[2]
    qa = q.new_empty(b, h, n, d + 2)
    torch.mul(q, d**-0.5, out=qa[..., :d])  # the scale folded into q: one rounding, not one per score
    qa[..., d] = -(_score_bound(qa[..., :d].float(), k.float()) + MARGIN)
    qa[..., d + 1] = 0
    ka = k.new_empty(b, h, nk, d + 2)
    ka[..., :d] = k
    ka[..., d] = 1
    ka[..., d + 1] = 0
    vt = v.new_empty(b, h, d + 1, nk)
    vt[:, :, :d] = v.transpose(-1, -2)
    vt[:, :, d] = 1
    return qa, ka, vt


def _score_bound(qs: Tensor, k: Tensor) -> Tensor:
    """An upper bound on each query's largest score, (B, H, N), from fp32 qs and k (k is changed): the smaller of
    |q| max|k| and, about the keys' mean c, q.c + |q| max|k - c| (tight where the keys share a large common part,
    as activations do). Any c gives a bound, so c's rounding does not matter; every reduction is over one row,
    or the keys' mean of each (head, channel): one result at any thread count."""
    norm = torch.linalg.vector_norm
    qn = norm(qs, dim=-1)
    plain = qn * norm(k, dim=-1).amax(-1, keepdim=True)
    center = k.mean(-2, keepdim=True)  # (B, H, 1, d)
    spread = norm(k.sub_(center), dim=-1).amax(-1, keepdim=True)  # (B, H, 1)
    return torch.minimum(plain, (qs @ center.transpose(-1, -2)).squeeze(-1) + qn * spread)


def _block(qa: Tensor, ka: Tensor, vt: Tensor, into: Tensor) -> None:
    """[o | l]^T of one block of query rows into `into` (d + 1, rows)."""
    p = torch.ops.mkldnn._linear_pointwise(qa, ka, None, "sigmoid", [], "")  # (rows, N_keys) = qa ka^T, sigmoid'd
    torch.mm(vt, p.t(), out=into)  # (d + 1, N_keys) x (N_keys, rows): ~1.7x faster than p v at d = 40


def _redo_underflowed(qa: Tensor, ka: Tensor, vt: Tensor, sums: Tensor, rows: int) -> None:
    """Rows whose bound was so loose that their p underflowed: again, `rows` at a time, shifted by their true
    largest score (from an fp32 score GEMM: slower, for inputs whose scores are far apart, as SD2's can be)."""
    d = vt.shape[2] - 1
    bad = ~(sums[:, :, d].float() > MIN_SUM)  # (B, H, N); NaN counts as bad (and stays NaN, as in torch's kernel)
    for i, j in bad.any(-1).nonzero().tolist():
        keys = ka[i, j, :, :d].float().t()
        for idx in bad[i, j].nonzero().squeeze(1).split(rows):
            qr = qa[i, j, idx]  # a copy (index tensor)
            qr[:, d] = -((qr[:, :d].float() @ keys).amax(-1) + MARGIN)
            into = sums.new_empty(d + 1, idx.numel())
            _block(qr, ka[i, j], vt[i, j], into)
            sums[i, j, :, idx] = into
