"""The same bytes at any CPU thread count: the few operations of the networks whose result on the CPU depends on
how many intra-op threads torch runs, in formulations that do not (scripts/probe_threads.py finds them, op by op).

- Element-wise SiLU, GELU, sigmoid, tanh: torch splits an element-wise op into one chunk per thread, and each
  chunk runs the SIMD loop from its start and the scalar code (another exp/erf than the SIMD one, last bits apart)
  on its last few elements. Chunk edges that fall off the SIMD stride move results with the thread count (3, 6, 7
  threads on 320x64x64). Here the op runs in pieces whose chunks all start on a 256-element boundary: every element
  then takes the path it takes with one thread. Only where torch's own split is off the boundary; +0-5% of the op.
  GELU's kernel has its own split (numel // threads per chunk above 16384 elements): its pieces follow that rule.
  SD3's and FLUX's tanh-GELU MLPs (2 x 333 x 6144 at SD3.5 Medium) move at 3, 5, 6 and 7 threads without this.
- 1x1 convolutions in fp32: torch runs them as a GEMM (THNN) with one thread and through oneDNN with more
  (Convolution.cpp, `use_mkldnn`: "MKLDNN is faster than THNN when multi-threaded"). Here they are that GEMM always
  (MKL's: the same CPU time as oneDNN's within the noise here).
- GroupNorm on channels_last maps of 1024+ pixels (bf16 on the CPU): torch's kernel sums per thread and then
  across the threads. Here the sums go per row of pixels, then over the rows, in a fixed order: 3-4.5x the fused
  kernel's time (its fp32 copy and passes), ~+1% of a bf16 step where GroupNorm is 0.3-0.5% of it (Zen 4).

A whole fp32 512px UNet step cost the same with and without these (CPU time on/off 0.93 at 2 threads, 0.97 at 3;
scripts/bench_threads.py --toggle). Everything else the networks run was measured invariant here (AVX2, 1-8
threads): MKL GEMMs, oneDNN 3x3 convolutions, LayerNorm, softmax, scaled_dot_product_attention, interpolation,
reductions. Off the CPU, and under autograd, every function here is the plain torch op.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.runtime.device import is_channels_last

GRAIN = 32768  # at::internal::GRAIN_SIZE: torch splits element-wise work into chunks of at least this many
ALIGN = 256  # elements; a multiple of every SIMD loop's stride (2 vectors: 16 fp32 on AVX2 .. 64 bf16 on AVX512)
GELU_SPLIT = 16384  # elements above which GELU's kernel splits into numel // threads-element chunks
GROUP_NORM_SPLIT = 1024  # pixels from which torch's channels_last GroupNorm sums per thread (impl-2)


# --- element-wise ops -----------------------------------------------------------------------------------------

def _chunks(numel: int, threads: int, rule: str) -> int:
    """How many chunks at::parallel_for (OpenMP) cuts `numel` elements into: n = min(threads, ceil(numel / grain)),
    one chunk under the grain. The grain is GRAIN, but GELU's kernel (Activation.cpp, GeluKernelImpl) takes
    numel // threads above GELU_SPLIT elements: `rule` "gelu"."""
    if rule == "gelu":
        if numel <= GELU_SPLIT:
            return 1
        grain = max(1, numel // threads)
    elif numel < GRAIN:
        return 1
    else:
        grain = GRAIN
    return min(threads, -(-numel // grain))


def _chunk_aligned(numel: int, threads: int, rule: str = "grain") -> bool:
    """Whether torch's own split (ceil(numel / n) per chunk, n = _chunks) starts every chunk on an ALIGN
    boundary, so one call is already invariant."""
    chunks = 1 if threads == 1 else _chunks(numel, threads, rule)
    return chunks == 1 or -(-numel // chunks) % ALIGN == 0


def _flat(x: Tensor) -> Tensor | None:
    """A 1-D view of `x` in memory order (contiguous or channels_last), else None."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return None


def _pieces(numel: int, threads: int, rule: str = "grain") -> list[tuple[int, int]]:
    """Consecutive ranges covering [0, numel), each starting on an ALIGN boundary and split by torch (`rule`, see
    _chunks) into chunks that all start on ALIGN boundaries."""
    edges = [0]
    while edges[-1] < numel:
        edges.append(edges[-1] + _piece(numel - edges[-1], threads, rule))
    return list(zip(edges, edges[1:]))


def _piece(rest: int, threads: int, rule: str) -> int:
    """The length of the next piece of `rest` elements: all of them when torch splits them on the boundaries, else
    whole GRAIN chunks (`threads` of them, or as many as there are), or for GELU a multiple of threads * ALIGN
    (numel // threads chunks, each a multiple of ALIGN), or a part small enough for one chunk."""
    if _chunk_aligned(rest, threads, rule):
        return rest
    if rule == "gelu":
        split = rest - rest % (threads * ALIGN)
        return split if split else GELU_SPLIT  # (rest under threads * ALIGN but over GELU_SPLIT: > 64 threads)
    return min(threads, rest // GRAIN) * GRAIN


def _plain(x: Tensor) -> bool:
    """Whether to run torch's own op: off the CPU, and under autograd (`out=` ops do not record gradients)."""
    return x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad)


def pointwise(op, x: Tensor, out: Tensor | None = None, rule: str = "grain") -> Tensor:
    """`op` (an aten `.out` overload: op(src, out=dst)) applied to a CPU tensor `x` into `out` (a new tensor like
    `x` when None; `x` itself for in-place), the same bytes for any number of threads. A strided view (a chunk of
    a projection) is made dense first, at every thread count: torch runs strided element-wise loops partly in
    scalar code, so a strided and a dense call differ even on one thread."""
    dst = torch.empty_like(x) if out is None else out
    src, flat_dst = _flat(x), _flat(dst)
    if src is None or flat_dst is None or x.stride() != dst.stride():
        dense = x.contiguous()
        pointwise(op, dense, dense, rule)
        return dense if out is None else out.copy_(dense)
    threads = torch.get_num_threads()
    if _chunk_aligned(x.numel(), threads, rule):
        return op(x, out=dst)
    with _kernel_for(x):
        for begin, end in _pieces(src.numel(), threads, rule):
            op(src[begin:end], out=flat_dst[begin:end])
    return dst


@contextmanager
def _kernel_for(x: Tensor):
    """The kernel torch's own call on `x` runs, for x's flat pieces. torch picks some kernels by contiguity: erf
    GELU runs oneDNN's eltwise (another approximation: most fp32 results and a few bf16 ones move by an ulp) on a
    contiguous fp32 tensor, and on a bf16 one where oneDNN has bf16 (AVX-512), and torch's own loop on anything
    else. A channels_last map's pieces are contiguous, so they run with oneDNN off, as the map itself would. (The
    switch is global: torch runs on one thread at a time in sdcli, `serve`'s device thread included.)"""
    if x.is_contiguous() or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


def silu(x: Tensor, inplace: bool = False) -> Tensor:
    if _plain(x):
        return F.silu(x, inplace=inplace)
    return pointwise(torch.ops.aten.silu.out, x, x if inplace else None)


def gelu(x: Tensor, inplace: bool = False, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) or `approximate="tanh"` (SD3's and FLUX's MLPs); `inplace` may write into `x` (a fresh
    activation), or not."""
    if _plain(x):
        return F.gelu(x, approximate=approximate)
    op = torch.ops.aten.gelu.out if approximate == "none" else partial(torch.ops.aten.gelu.out, approximate=approximate)
    return pointwise(op, x, x if inplace else None, rule="gelu")


def sigmoid(x: Tensor, inplace: bool = False) -> Tensor:
    if _plain(x):
        return x.sigmoid_() if inplace else x.sigmoid()
    return pointwise(torch.ops.aten.sigmoid.out, x, x if inplace else None)


def tanh(x: Tensor, inplace: bool = False) -> Tensor:
    if _plain(x):
        return x.tanh_() if inplace else x.tanh()
    return pointwise(torch.ops.aten.tanh.out, x, x if inplace else None)


class SiLU(nn.SiLU):
    """nn.SiLU, thread-count invariant on the CPU."""

    def forward(self, x: Tensor) -> Tensor:
        return silu(x, self.inplace)


class GELU(nn.GELU):
    """nn.GELU (exact or tanh-approximated), thread-count invariant on the CPU; in place on its input, which in
    every use here is the fresh output of the Linear before it."""

    def forward(self, x: Tensor) -> Tensor:
        return gelu(x, inplace=True, approximate=self.approximate)


# --- 1x1 convolutions -------------------------------------------------------------------------------------

class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution (stride 1, no padding; the weight is (out, in, 1, 1) as in the checkpoints). An fp32 map
    on the CPU is multiplied per image as a GEMM (MKL's, as torch's own one-thread path), whatever the thread
    count: contiguous maps as weight @ (C, HW), channels_last ones (the VAE's attention output) as
    (HW, C) @ weight^T, keeping their layout. bf16 maps (always oneDNN there) and other devices: nn.Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type != "cpu" or grad or x.dtype != torch.float32 or x.dim() != 4:
            return super().forward(x)
        b, c, h, w = x.shape
        weight = self.weight.view(self.out_channels, c)
        if _flat(x) is None:
            x = x.contiguous()
        if x.is_contiguous():
            out = x.new_empty(b, self.out_channels, h * w)  # (B, C_out, HW)
            for i in range(b):
                _gemm(weight, x[i].view(c, h * w), None if self.bias is None else self.bias[:, None], out[i])
            return out.view(b, self.out_channels, h, w)
        rows = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # channels_last memory as (B, HW, C)
        out = x.new_empty(b, h * w, self.out_channels)
        for i in range(b):
            _gemm(rows[i], weight.t(), self.bias, out[i])
        return out.view(b, h, w, self.out_channels).permute(0, 3, 1, 2)  # (B, C_out, H, W), channels_last


def _gemm(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor) -> None:
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)


# --- GroupNorm ---------------------------------------------------------------------------------------------

def group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """F.group_norm; on a channels_last CPU map of GROUP_NORM_SPLIT+ pixels, with statistics summed in a fixed
    order (see _channels_last_stats) and applied by batch_norm's inference kernel (one rounding, as torch's)."""
    n, c, h, w = x.shape if x.dim() == 4 else (0, 0, 0, 0)
    cl = is_channels_last(x)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if x.device.type != "cpu" or grad or not cl or h * w < GROUP_NORM_SPLIT:
        return F.group_norm(x, groups, weight, bias, eps)
    mean, var = _channels_last_stats(x, groups)  # (N, C) each, fp32
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    if n == 1:
        return F.batch_norm(x, mean[0], var[0], weight, bias, False, 0.0, eps)
    out = torch.empty_like(x)
    none = x.new_empty(0, dtype=torch.float32)
    for i in range(n):  # batch_norm's statistics are per channel: one call per image, into its slice of `out`
        torch.ops.aten.native_batch_norm.out(x[i : i + 1], weight, bias, mean[i], var[i], False, 0.0, eps,
                                             out=out[i : i + 1], save_mean=none, save_invstd=none)  # fmt: skip
    return out


STATS_ROWS = 32  # pixel rows converted to fp32 at a time: bounds the temporary (8 MB at 512px x 128 channels)


def _channels_last_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-image, per-channel (mean, biased variance) of the group each channel belongs to, in fp32. Sums of x and
    x^2 per row of pixels (each a reduction with many outputs: torch gives every output to one thread, which sums
    it in one order), then over the rows and the group's channels, then var = E[x^2] - mean^2 as torch's kernel."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view of the channels_last memory
    s1 = torch.empty(n, h, c, dtype=torch.float32)
    s2 = torch.empty(n, h, c, dtype=torch.float32)
    for r in range(0, h, STATS_ROWS):
        block = rows[:, r : r + STATS_ROWS].to(torch.float32, copy=True)  # (N, rows, W, C), squared in place below
        torch.sum(block, 2, out=s1[:, r : r + STATS_ROWS])
        torch.sum(block.square_(), 2, out=s2[:, r : r + STATS_ROWS])
    d = c // groups
    count = h * w * d
    mean = s1.sum(1).view(n, groups, d).sum(2) / count  # (N, G)
    var = (s2.sum(1).view(n, groups, d).sum(2) / count - mean * mean).clamp_min(0)
    return mean.repeat_interleave(d, 1), var.repeat_interleave(d, 1)  # (N, C)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, thread-count invariant on channels_last CPU maps."""

    def forward(self, x: Tensor) -> Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
