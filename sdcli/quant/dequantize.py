"""GGML blocks -> float tensors, in torch, vectorized over all blocks at once, on whatever device the bytes are.

Each block type is unpacked exactly as ggml's ``dequantize_row_*`` (ggml/src/ggml-quants.c) and gguf-py's numpy
``gguf.quants.<TYPE>.dequantize_blocks`` do it, with the same float32 operations in the same order (a scale times
an integer, then minus a minimum), so the result is bit for bit the numpy reference's (tests/test_gguf.py checks
every type on random blocks). The result is float32 and cast once to the dtype asked for: dequantizing straight
into bf16 would round twice. Peers read for the layouts: ComfyUI-GGUF ``dequant.py``, diffusers
``quantizers/gguf/utils.py``.

Block layouts (bytes, in order; d/dmin/m are float16 scales, QK_K = 256):
  Q4_0 d, qs[16]        Q4_1 d, m, qs[16]        Q5_0 d, qh[4], qs[16]    Q5_1 d, m, qh[4], qs[16]
  Q8_0 d, qs[32] int8   Q2_K scales[16], qs[64], d, dmin                 Q3_K hmask[32], qs[64], scales[12], d
  Q4_K d, dmin, scales[12], qs[128]   Q5_K d, dmin, scales[12], qh[32], qs[128]
  Q6_K ql[128], qh[64], scales[16] int8, d    IQ4_NL d, qs[16]    IQ4_XS d, scales_h[2], scales_l[4], qs[128]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sdcli.runtime.errors import UnsupportedModelError
from sdcli.quant.ggml_types import GGMLType, ggml_type

QK_K = 256
# On a CPU, weights are dequantized this many elements at a time: the float32 temporaries of a piece (~1 MB each)
# stay in cache, where whole-tensor passes went to memory and back several times (3072x3072 Q8_0: ~3x faster).
CPU_CHUNK = 1 << 18
# IQ4_NL / IQ4_XS: the 16 non-linear levels a 4-bit index picks (ggml-common.h kvalues_iq4nl)
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _wide(b: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, k) bytes (a field of the blocks) read as little-endian `dtype` words, (n, k / size): a view in place
    when the field is aligned for it (every field sdcli reads is, as the block sizes are even), else a copy.
    Copying a 2-byte column out of every block first took half of a Q8_0 dequantization."""
    size = dtype.itemsize
    if b.stride(-1) != 1 or b.storage_offset() % size or any(st % size for st in b.stride()[:-1]):
        b = b.contiguous()
    return b.view(dtype)


def _f16(b: Tensor) -> Tensor:
    """(n, 2k) bytes -> (n, k) float32: little-endian float16 scales."""
    return _wide(b, torch.float16).float()


@functools.lru_cache(maxsize=64)
def _shifts(device: torch.device, *values: int) -> Tensor:
    """Shift counts as a uint8 tensor on `device`, made once per device (no host-to-device copy per call)."""
    return torch.tensor(values, dtype=torch.uint8).to(device)


def _split(blocks: Tensor, *sizes: int) -> tuple[Tensor, ...]:
    """Columns of a (n, type_size) byte matrix: the named fields of every block, in order."""
    return torch.split(blocks, [*sizes, blocks.shape[1] - sum(sizes)], dim=1)


def _nibbles(qs: Tensor) -> Tensor:
    """(n, ..., k) bytes -> (n, ..., 2k): the k low nibbles, then the k high ones (ggml's order in a 32-run)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: Tensor, count: int) -> Tensor:
    """(n, k) bytes -> (n, count): bit j of the little-endian integer they form, j < count."""
    bits = (b.unsqueeze(-1) >> _shifts(b.device, *range(8))) & 1  # (n, k, 8)
    return bits.reshape(b.shape[0], -1)[:, :count]


def _float(blocks: Tensor, dtype: torch.dtype) -> Tensor:
    return blocks.contiguous().view(dtype).float()


def _affine(scale: Tensor, q: Tensor, out: Tensor | None, minus: Tensor | None = None,
            plus: Tensor | None = None) -> Tensor:  # fmt: skip
    """scale * q (an integer tensor), then - minus or + plus: the float32 steps of the references, written into
    `out` (float32, q's shape) when given: q converted into it, then scaled there, so no float copy of q nor of the
    result is made (a multiplication of mixed dtypes takes torch's slower casting loop)."""
    r = out.copy_(q).mul_(scale) if out is not None else scale * q.float()
    if minus is not None:
        r.sub_(minus)
    if plus is not None:
        r.add_(plus)
    return r


# Each integer-coded type is two passes: its per-block factors (float16 scales, 6-bit sub-block scales and minimums:
# small tensors, cheap but many ops) and the values from them. A CPU dequantization makes the factors once for all
# blocks and then runs the values piece by piece (dequantize): per piece only the few large ops remain. Made per
# piece, the factors' op dispatch was ~40% of a Q4_K dequantization (1.9 -> 1.1 ns per weight, 2 Zen 3 threads,
# into a reused buffer). Factors are (n, 1) per block or (n, sub-blocks, 1); the ops are the same element by element
# either way, so the bits are too.


def _d_factors(blocks: Tensor) -> tuple[Tensor, ...]:
    return (_f16(blocks[:, :2]),)


def _q4_0(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    return _affine(factors[0], _nibbles(blocks[:, 2:]).to(torch.int8) - 8, out)


def _d_m_factors(blocks: Tensor) -> tuple[Tensor, ...]:
    return _f16(blocks[:, :2]), _f16(blocks[:, 2:4])


def _q4_1(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    return _affine(factors[0], _nibbles(blocks[:, 4:]), out, plus=factors[1])


def _q5(qh: Tensor, qs: Tensor) -> Tensor:
    """5-bit values 0..31: low nibble from qs, fifth bit j from the 32-bit qh."""
    return _nibbles(qs) | (_bits(qh, 32) << 4)


def _q5_0(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    return _affine(factors[0], _q5(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16, out)


def _q5_1(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    return _affine(factors[0], _q5(blocks[:, 4:8], blocks[:, 8:]), out, plus=factors[1])


def _q8_0(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    return _affine(factors[0], blocks[:, 2:].contiguous().view(torch.int8), out)


def _view(out: Tensor | None, *shape: int) -> Tensor | None:
    return None if out is None else out.view(*shape)


def _crumbs(qs: Tensor, width: int) -> Tensor:
    """2-bit fields, (n, r * width) bytes -> (n, r, 4, width): each run of `width` bytes gives 4 runs of `width`
    values (bits 0-1 of every byte, then bits 2-3, 4-5, 6-7)."""
    n = qs.shape[0]
    return (qs.reshape(n, -1, 1, width) >> _shifts(qs.device, 0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3


# Q2_K: ggml-quants.c dequantize_row_q2_K; gguf-py Q2_K.dequantize_blocks
def _q2_k_factors(blocks: Tensor) -> tuple[Tensor, ...]:
    n = blocks.shape[0]
    scales, _, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2)
    dl = (_f16(d) * (scales & 0x0F).float()).reshape(n, 16, 1)  # 16 sub-blocks of 16
    return dl, (_f16(dmin) * (scales >> 4).float()).reshape(n, 16, 1)


def _q2_k(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    q = _crumbs(blocks[:, QK_K // 16 : QK_K // 16 + QK_K // 4], 32).reshape(n, 16, 16)
    return _affine(factors[0], q, _view(out, n, 16, 16), minus=factors[1]).reshape(n, QK_K)


def _q3_k_scales(scales: Tensor) -> Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from bytes 0-7 (low nibbles, then high), high 2 bits from
    bytes 8-11 (bits 0-1 of each, then 2-3, 4-5, 6-7)."""
    n = scales.shape[0]
    low = _nibbles(scales[:, :8])  # (n, 16)
    high = _crumbs(scales[:, 8:], 4).reshape(n, 16)
    return ((low | (high << 4)).to(torch.int8) - 32).float()


# Q3_K: ggml-quants.c dequantize_row_q3_K; gguf-py Q3_K.dequantize_blocks
def _q3_k_factors(blocks: Tensor) -> tuple[Tensor, ...]:
    _, _, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12)
    return ((_f16(d) * _q3_k_scales(scales)).reshape(blocks.shape[0], 16, 1),)


def _q3_k(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    hmask, qs, _ = _split(blocks, QK_K // 8, QK_K // 4)
    low = _crumbs(qs, 32).reshape(n, 16, 16)
    high = (hmask.reshape(n, 1, 1, 32) >> _shifts(blocks.device, *range(8)).reshape(1, 1, 8, 1)) & 1
    high = high.reshape(n, 16, 16) ^ 1  # a clear mask bit subtracts 4
    q = low.to(torch.int8) - (high << 2).to(torch.int8)
    return _affine(factors[0], q, _view(out, n, 16, 16)).reshape(n, QK_K)


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit minimums (ggml get_scale_min_k4). The bytes d[4],
    m[4], md[4] are taken as three 32-bit words and masked four bytes at a time (a shift's bits that cross into
    the next byte are masked off); byte by byte on (n, 4) slices this was 40% of a Q4_K dequantization."""
    d, m, md = _wide(scales, torch.int32).unbind(1)  # (n,) each
    low, six, high2 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030
    sc = torch.stack([d & low, (md & six) | ((d >> 2) & high2)], dim=1)  # (n, 2) words = (n, 8) bytes
    mn = torch.stack([m & low, ((md >> 4) & six) | ((m >> 2) & high2)], dim=1)
    return sc.view(torch.uint8).float(), mn.view(torch.uint8).float()


def _k_factors(blocks: Tensor) -> tuple[Tensor, ...]:
    """Q4_K/Q5_K: (n, 8, 1) scales and minimums, d * scale and dmin * min."""
    n = blocks.shape[0]
    d, dmin, scales, _ = _split(blocks, 2, 2, 12)
    sc, mn = _k_scale_min(scales)
    return (_f16(d) * sc).reshape(n, 8, 1), (_f16(dmin) * mn).reshape(n, 8, 1)


def _k_nibbles(qs: Tensor) -> Tensor:
    """128 bytes -> (8, 32): each run of 32 bytes gives 32 low nibbles, then 32 high ones."""
    n = qs.shape[0]
    return _nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32)


# Q4_K: ggml-quants.c dequantize_row_q4_K; gguf-py Q4_K.dequantize_blocks
def _q4_k(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    q = _k_nibbles(blocks[:, 16:])
    return _affine(factors[0], q, _view(out, n, 8, 32), minus=factors[1]).reshape(n, QK_K)


# Q5_K: ggml-quants.c dequantize_row_q5_K; gguf-py Q5_K.dequantize_blocks
def _q5_k(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    _, qh, qs = _split(blocks, 16, QK_K // 8)
    high = (qh.reshape(n, 1, 32) >> _shifts(blocks.device, *range(8)).reshape(1, 8, 1)) & 1  # (n, 8, 32)
    q = _k_nibbles(qs) | (high << 4)
    return _affine(factors[0], q, _view(out, n, 8, 32), minus=factors[1]).reshape(n, QK_K)


# Q6_K: ggml-quants.c dequantize_row_q6_K; gguf-py Q6_K.dequantize_blocks
def _q6_k_factors(blocks: Tensor) -> tuple[Tensor, ...]:
    _, scales, d = _split(blocks, QK_K // 2 + QK_K // 4, QK_K // 16)
    return ((_f16(d) * scales.contiguous().view(torch.int8).float()).reshape(blocks.shape[0], 16, 1),)


def _q6_k(blocks: Tensor, factors: tuple[Tensor, ...], out: Tensor | None) -> Tensor:
    n = blocks.shape[0]
    ql, qh, _ = _split(blocks, QK_K // 2, QK_K // 4)
    low = _nibbles(ql.reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _crumbs(qh, 32).reshape(n, 8, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return _affine(factors[0], q.reshape(n, 16, 16), _view(out, n, 16, 16)).reshape(n, QK_K)


@functools.lru_cache(maxsize=8)
def _iq4_levels(device: torch.device) -> Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32).to(device)


# IQ4_NL: ggml-quants.c dequantize_row_iq4_nl; gguf-py IQ4_NL.dequantize_blocks
def _iq4_nl(blocks: Tensor) -> Tensor:
    d, qs = _split(blocks, 2)
    return _f16(d) * _iq4_levels(blocks.device)[_nibbles(qs).long()]


# IQ4_XS: ggml-quants.c dequantize_row_iq4_xs; gguf-py IQ4_XS.dequantize_blocks
def _iq4_xs(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    d, scales_h, scales_l, qs = _split(blocks, 2, 2, QK_K // 64)
    low = torch.stack([scales_l & 0x0F, scales_l >> 4], dim=-1).reshape(n, 8)  # byte i: sub-blocks 2i, 2i+1
    high = _bits(scales_h, 16).reshape(n, 8, 2)
    high = high[..., 0] | (high[..., 1] << 1)  # 2 bits per sub-block from the 16-bit scales_h
    dl = (_f16(d) * ((low | (high << 4)).to(torch.int8) - 32).float()).reshape(n, 8, 1)
    q = _nibbles(qs.reshape(n, 8, 16))  # (n, 8, 32)
    return (dl * _iq4_levels(blocks.device)[q.long()]).reshape(n, QK_K)


# the integer-coded types made in two passes, (per-block factors, values): they can also write their float32 result
# straight into a given (n, block_size) tensor
TWO_PASS: dict[str, tuple[Callable, Callable]] = {
    "Q4_0": (_d_factors, _q4_0), "Q4_1": (_d_m_factors, _q4_1), "Q5_0": (_d_factors, _q5_0),
    "Q5_1": (_d_m_factors, _q5_1), "Q8_0": (_d_factors, _q8_0), "Q2_K": (_q2_k_factors, _q2_k),
    "Q3_K": (_q3_k_factors, _q3_k), "Q4_K": (_k_factors, _q4_k), "Q5_K": (_k_factors, _q5_k),
    "Q6_K": (_q6_k_factors, _q6_k),
}  # fmt: skip


def _both_passes(factors: Callable, values: Callable, blocks: Tensor, out: Tensor | None = None) -> Tensor:
    return values(blocks, factors(blocks), out)


# (n, type_size) blocks [, out] -> (n, block_size) float32 (float types: their own dtype)
DEQUANTIZERS: dict[str, Callable[..., Tensor]] = {
    "F32": lambda b: _float(b, torch.float32),
    "F16": lambda b: _float(b, torch.float16),
    "BF16": lambda b: _float(b, torch.bfloat16),
    "F64": lambda b: _float(b, torch.float64),  # float64 -> float32 rounds, as numpy's astype does
    **{name: functools.partial(_both_passes, *passes) for name, passes in TWO_PASS.items()},
    "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs,
}  # fmt: skip


def is_supported(qtype: GGMLType | int | str) -> bool:
    return ggml_type(qtype).name in DEQUANTIZERS


def check_supported(qtype: GGMLType | int | str, what: str = "") -> GGMLType:
    """The type, or UnsupportedModelError naming it (and `what` holds it) when sdcli has no dequantizer for it."""
    t = ggml_type(qtype)
    if t.name not in DEQUANTIZERS:
        where = f"{what}: " if what else ""
        raise UnsupportedModelError(f"{where}GGUF tensor type {t.name} is not supported (sdcli reads "
                                    f"{', '.join(DEQUANTIZERS)})")  # fmt: skip
    return t


def dequantize(raw: Tensor, qtype: GGMLType | int | str, shape: Sequence[int],
               dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:  # fmt: skip
    """The `shape` tensor (torch order) that the GGML blocks in `raw` (uint8, in file order) hold, as `dtype`, on
    raw's device. F16/BF16/F32 asked as their own dtype come back as a view of `raw` (no copy). `out`: a contiguous
    CPU `dtype` tensor of as many elements to write a CPU result of more than CPU_CHUNK elements into (a buffer
    reused from call to call, quant.layers.reused_buffers), else unused; the values do not depend on it."""
    t = check_supported(qtype)
    numel = math.prod(shape)
    if raw.dtype != torch.uint8 or numel % t.block_size or raw.numel() != t.nbytes(numel):
        raise ValueError(f"{t.name} blocks for shape {tuple(shape)} are {t.nbytes(numel)} bytes, "
                         f"got a {raw.dtype} tensor of {raw.numel()}")  # fmt: skip
    blocks = raw.reshape(-1, t.type_size)
    if t.is_float and _float_dtype(t) == dtype:
        return blocks.contiguous().view(dtype).reshape(tuple(shape))
    if raw.device.type != "cpu" or numel <= CPU_CHUNK:
        return DEQUANTIZERS[t.name](blocks).reshape(tuple(shape)).to(dtype)
    if out is None:
        out = torch.empty(numel // t.block_size, t.block_size, dtype=dtype)
    elif out.dtype != dtype or out.numel() != numel or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"dequantize: out must be a contiguous CPU {dtype} tensor of {numel} elements")
    else:
        out = out.view(numel // t.block_size, t.block_size)
    _in_pieces(t.name, blocks, out)
    return out.reshape(tuple(shape))


def _in_pieces(name: str, blocks: Tensor, out: Tensor) -> None:
    """blocks -> out, CPU_CHUNK elements at a time (each piece's temporaries stay in cache); a two-pass type's
    factors made once for all blocks first, its values straight into out when out is float32 (else float32 first,
    then rounded once)."""
    factors, values = TWO_PASS.get(name, (None, None))
    every = None if factors is None else factors(blocks)
    step = CPU_CHUNK // (out.shape[1])
    for start in range(0, blocks.shape[0], step):
        piece, dest = blocks[start:start + step], out[start:start + step]
        if every is None:
            dest.copy_(DEQUANTIZERS[name](piece).reshape(dest.shape))
            continue
        mine = tuple(f[start:start + step] for f in every)
        if out.dtype == torch.float32:
            values(piece, mine, dest)
        else:
            dest.copy_(values(piece, mine, None).reshape(dest.shape))


def _float_dtype(t: GGMLType) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[t.name]
