"""Linear and Conv2d layers whose weights stay GGML blocks in memory and are dequantized in each forward.

A model is built by its usual classes (models/unet.py ...); ``quantize_modules`` then swaps each Linear/Conv2d
whose weight came quantized for a QuantizedLinear/QuantizedConv2d at the same attribute path. The blocks are the
layer's ``weight`` buffer (1-d uint8, so ``.to(device)`` moves them and code that treats the weight as a float
matrix fails loudly instead of computing garbage); the bias stays a float Parameter. The forward dequantizes to the
input's dtype on the input's device: the weight exists at full size only while its layer runs (ComfyUI-GGUF
``ops.py`` GGMLOps, diffusers ``GGUFLinear.forward_native`` do the same).

LoRA cannot be merged into blocks, so it is applied at run time, after dequantization (ComfyUI's way;
stable-diffusion.cpp's ``--lora-apply-mode at_runtime``): ``layer.loras`` holds RuntimeLora updates, added to the
weight in each forward with the float32 steps sdcli.loading.lora takes to merge them into a float weight (the same bits).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.runtime.device import is_channels_last
from sdcli.runtime.errors import BadInputError
from sdcli.quant.dequantize import dequantize
from sdcli.quant.ggml_types import ggml_type
from sdcli.quant.tensor import QuantizedTensor


@dataclass(frozen=True)
class RuntimeLora:
    """One LoRA's update of one layer: W + weight * ratio * (up @ down), ratio = alpha / rank, in float32 in the
    order of sdcli.loading.lora._delta and _merge (so the result has the merged weight's bits). Keep up/down on the run
    device: elsewhere they are copied there in every forward."""

    up: Tensor  # (out, rank[, 1, 1])
    down: Tensor  # (rank, in[, kh, kw])
    ratio: float  # alpha / rank
    weight: float  # the user's LoRA weight
    rows: tuple[tuple[int, int, int], ...] | None = None  # the rows of the weight it updates (add_update)

    def add_to(self, w: Tensor, start: int = 0) -> Tensor:
        """w + this update; w holds the weight's rows [start, start + len(w)) (all of them by default): only
        those rows of the update are made (a layer run in row pieces, linear_rows, makes each once)."""
        up, down = (t.to(w.device, torch.float32).flatten(1) for t in (self.up, self.down))
        stop = start + w.shape[0]
        if self.rows is None:
            return add_update(w, self.ratio * (up[start:stop] @ down), self.weight, None)  # (rows, in[, kh, kw])
        rows = tuple((src + lo - dst, lo - start, hi - lo) for src, dst, n in self.rows
                     if (lo := max(dst, start)) < (hi := min(dst + n, stop)))  # fmt: skip
        if not rows:
            return w
        first = min(src for src, _, _ in rows)
        last = max(src + n for src, _, n in rows)
        update = self.ratio * (up[first:last] @ down)  # the LoRA's rows that land in w
        return add_update(w, update, self.weight, tuple((src - first, dst, n) for src, dst, n in rows))


def add_update(w: Tensor, update: Tensor, weight: float, rows: tuple[tuple[int, int, int], ...] | None) -> Tensor:
    """w + weight * update in float32, the one sum of a LoRA merge (sdcli.loading.lora) and of a run-time LoRA.
    `update` is (out', in * kh * kw); `rows` None: out' = out, all of w; else (row of update, row of w, count)
    blocks: a LoRA written for one of the q, k, v matrices that the file fuses into one weight (diffusers' to_q
    into a Flux ``qkv``) updates only its rows."""
    if rows is None:
        return w + weight * update.reshape(w.shape)
    update = update.reshape(update.shape[0], *w.shape[1:])
    out = w.clone()
    for src, dst, n in rows:
        out[dst : dst + n] = w[dst : dst + n] + weight * update[src : src + n]
    return out


REUSE_MAX_BYTES = 192 << 20  # the largest weight kept (fp32): T5-XXL feed-forward 168 MB, SD3.5 Large adaLN 142


class _Reuse(threading.local):
    depth = 0  # open reused_buffers() contexts in this thread
    buffer: Tensor | None = None


_REUSE = _Reuse()


@contextmanager
def reused_buffers() -> Iterator[None]:
    """While open (the sampling loop, pipeline._sample; the text encoders of SD3/FLUX), this thread's quantized layers dequantize into one buffer
    kept from forward to forward instead of a fresh one each time. A fresh buffer is fresh pages, faulted in at every
    call (above glibc's 32 MB mmap threshold; below it too, as the pinned trim threshold hands freed heap back):
    a 150 MB Q8_0 weight took 2.95 ns per weight that way and 1.14 into a reused buffer (2 Zen 3 threads). The buffer
    grows to the largest weight asked for, up to REUSE_MAX_BYTES, and is freed when the outermost context closes.
    Values never depend on it."""
    _REUSE.depth += 1
    try:
        yield
    finally:
        _REUSE.depth -= 1
        if not _REUSE.depth:
            _REUSE.buffer = None


def _reused_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A contiguous `dtype` tensor of `numel` elements in this thread's reused buffer, or None (no context open, not
    the CPU, or too large: dequantize then allocates)."""
    nbytes = numel * dtype.itemsize
    if not _REUSE.depth or device.type != "cpu" or nbytes > REUSE_MAX_BYTES:
        return None
    if _REUSE.buffer is None or _REUSE.buffer.numel() < nbytes:
        _REUSE.buffer = None  # the old one freed before the larger one is made
        _REUSE.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return _REUSE.buffer[:nbytes].view(dtype)


class _QuantizedWeight:
    """What both layers share: the blocks as the ``weight`` buffer, their type and logical shape, the LoRAs."""

    def _hold(self, q: QuantizedTensor, bias: Tensor | None) -> None:
        self.register_buffer("weight", q.raw)
        self.qtype, self.weight_shape = q.qtype, q.shape
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self.loras: list[RuntimeLora] = []

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.weight, self.qtype, self.weight_shape)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight as `dtype` with the runtime LoRAs added, each in float32 then rounded to `dtype`: the steps
        sdcli.loading.lora takes merging LoRAs one by one into a `dtype` weight, so the bits are those of a dequantized
        model with the LoRAs merged."""
        return self._with_loras(dequantize(self.weight, self.qtype, self.weight_shape, dtype), 0)

    def _with_loras(self, w: Tensor, start: int) -> Tensor:
        """Rows [start, start + len(w)) of the weight, w, with the run-time LoRAs' rows added."""
        for lora in self.loras:
            w = lora.add_to(w.float(), start).to(w.dtype)
        return w

    def _forward_weight(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> Tensor:
        """dequantized_weight(dtype)[start:stop] for one forward, possibly in this thread's reused buffer (valid
        until the next dequantization: use it at once, never keep it). Only the rows' blocks are dequantized,
        unless a row is no whole number of blocks (stored as 256-element rows)."""
        stop = self.weight_shape[0] if stop is None else stop
        if self.weight_shape[-1] % ggml_type(self.qtype).block_size:
            return self.dequantized_weight(dtype)[start:stop]
        row_bytes = self.weight.numel() // self.weight_shape[0]
        shape = (stop - start, *self.weight_shape[1:])
        out = _reused_buffer(math.prod(shape), dtype, self.weight.device)
        w = dequantize(self.weight[start * row_bytes : stop * row_bytes], self.qtype, shape, dtype, out)
        return self._with_loras(w, start)

    def _bias(self, dtype: torch.dtype) -> Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)



def holds_blocks(module: nn.Module) -> bool:
    """Whether `module` is a QuantizedLinear/QuantizedConv2d (its `weight` is GGML blocks, its LoRAs run-time)."""
    return isinstance(module, _QuantizedWeight)


class QuantizedLinear(_QuantizedWeight, nn.Linear):
    """nn.Linear (isinstance holds) computing with the dequantized weight."""

    def __init__(self, weight: QuantizedTensor, bias: Tensor | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self._hold(weight, bias)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return F.linear(x, self._forward_weight(x.dtype), self._bias(x.dtype))


def linear_rows(layer: nn.Linear, x: Tensor, start: int, stop: int) -> Tensor:
    """Output features [start, stop) of `layer(x)` (a Linear or a QuantizedLinear) from those rows of its weight alone:
    a fused projection split into the parts a block uses one after the other never holds its whole output, nor
    (quantized) its whole dequantized weight. The GEMM of a row block gives the bits of the fused GEMM's columns."""
    return F.linear(x, *weight_rows(layer, x.dtype, start, stop))


def weight_rows(layer: nn.Linear, dtype: torch.dtype, start: int, stop: int) -> tuple[Tensor, Tensor | None]:
    """Rows [start, stop) of the weight and bias `layer` computes with in `dtype`: a QuantizedLinear's dequantized
    ones, valid until its next dequantization (used at once, never kept)."""
    weight = layer._forward_weight(dtype, start, stop) if holds_blocks(layer) else layer.weight[start:stop]
    return weight, None if layer.bias is None else layer.bias[start:stop].to(dtype)



PIECE_BYTES = 32 << 20  # the most of a weight linear_pieces dequantizes (or reads) for one GEMM
ROW_ALIGN = 256  # piece rows: a multiple of this, so an element-wise op on a piece's output runs whole SIMD loops


def row_pieces(layer: nn.Linear, x: Tensor, start: int, stop: int) -> list[tuple[int, int]]:
    """[start, stop) cut into consecutive row ranges of `layer`'s weight of at most PIECE_BYTES each in x's dtype,
    every range but the last a multiple of ROW_ALIGN rows (one range when the whole fits)."""
    rows = PIECE_BYTES // (layer.in_features * x.element_size()) // ROW_ALIGN * ROW_ALIGN
    rows = max(rows, ROW_ALIGN)
    return [(a, min(a + rows, stop)) for a in range(start, stop, rows)]


def linear_pieces(layer: nn.Linear, x: Tensor, rows=None) -> Tensor:
    """layer(x), from row pieces of the weight (row_pieces; `rows`, default linear_rows, computes each): a quantized
    weight is never dequantized whole. Dense and quantized layers take the same path, so a GGUF renders the bytes
    of its dequantized weights."""
    rows = rows or linear_rows
    pieces = row_pieces(layer, x, 0, layer.out_features)
    if len(pieces) == 1:
        return rows(layer, x, 0, layer.out_features)
    out = x.new_empty(*x.shape[:-1], layer.out_features)
    for start, stop in pieces:
        out[..., start:stop] = rows(layer, x, start, stop)
    return out


_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
               "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")  # fmt: skip


class QuantizedConv2d(_QuantizedWeight, nn.Conv2d):
    """nn.Conv2d (isinstance holds; padding_mode changes such as seamless tiling apply) with the dequantized
    weight; its geometry is copied from the Conv2d it replaces."""

    def __init__(self, like: nn.Conv2d, weight: QuantizedTensor):
        nn.Module.__init__(self)
        for name in _CONV_ATTRS:
            setattr(self, name, getattr(like, name))
        self._hold(weight, like.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        w = self._forward_weight(x.dtype)
        if is_channels_last(x):
            # the layout a float model's weights have then (models/layout.py): the same kernels, the same bits
            w = w.contiguous(memory_format=torch.channels_last)
        return self._conv_forward(x, w, self._bias(x.dtype))


def _fit(key: str, q: QuantizedTensor, shape: tuple[int, ...]) -> QuantizedTensor:
    """`q` under the model's shape: equal, or equal but for dims of size 1 (ggml drops trailing ones when it
    writes: stable-diffusion.cpp files hold a (C, C, 1, 1) 1x1 conv as (C, C) and SD3's (1, N, C) pos_embed as
    (N, C)); the blocks' element order is the same, so the reshape is exact."""
    if q.shape == shape:
        return q
    if math.prod(q.shape) == math.prod(shape) and [d for d in q.shape if d != 1] == [d for d in shape if d != 1]:
        return QuantizedTensor(q.raw, q.qtype, shape)
    raise BadInputError(f"{key}: quantized weight of shape {list(q.shape)} does not fit the model's {list(shape)}")


def replaceable(module: nn.Module) -> bool:
    """Whether quantize_modules swaps `module` for a QuantizedLinear/QuantizedConv2d: an exact nn.Linear or nn.Conv2d,
    or a Conv2d subclass whose math is nn.Conv2d's (models/packed_conv.py says so with ``plain_conv = True``). Other
    subclasses keep a dequantized weight: models/invariant.PointwiseConv's thread-count-invariant GEMM is not
    QuantizedConv2d's."""
    if type(module) in (nn.Linear, nn.Conv2d):
        return True
    return isinstance(module, nn.Conv2d) and getattr(type(module), "plain_conv", False)


def quantize_modules(model: nn.Module, weights: Mapping[str, QuantizedTensor], dtype: torch.dtype) -> None:
    """Give `model` the quantized `weights` (state-dict keys of `model`, e.g. ``input_blocks.1.0.in_layers.2.weight``):
    the Linear/Conv2d owning each is replaced by its quantized counterpart at the same path (keeping its bias
    Parameter, which a later strict load may still fill); a weight of any other module (an Embedding, a bare
    Parameter) is dequantized to `dtype` and assigned, as it could not be used quantized. Works on meta-built
    models. Keys that are no parameter of `model` are refused (BadInputError) before anything changes."""
    params = dict(model.named_parameters())
    unknown = sorted(k for k in weights if k not in params)
    if unknown:
        raise BadInputError(f"quantized weights the model has no parameter for: {', '.join(unknown[:6])}")
    for key, q in weights.items():
        path, _, leaf = key.rpartition(".")
        owner = model.get_submodule(path)
        q = _fit(key, q, tuple(params[key].shape))
        if leaf == "weight" and path and replaceable(owner):
            layer = QuantizedLinear(q, owner.bias) if type(owner) is nn.Linear else QuantizedConv2d(owner, q)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, layer)
        else:
            setattr(owner, leaf, nn.Parameter(q.dequantize(dtype), requires_grad=False))
