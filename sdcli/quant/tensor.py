"""A weight kept as GGML blocks: the raw bytes, their type and the logical shape they hold."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from sdcli.quant.dequantize import dequantize
from sdcli.quant.ggml_types import GGMLType, ggml_type


# Byte offsets of the float16 scales in each block (ggml-common.h block layouts; quant/dequantize.py lists them):
# every value of a block is such a scale times a small integer (minus a scaled minimum), so the blocks hold NaN or
# Inf exactly when one of these does. Checked at load instead of dequantizing the whole model once.
SCALE_OFFSETS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}  # fmt: skip


class QuantizedTensor:
    """GGML blocks in memory: `raw` (uint8, 1-d, the blocks in file order: a view of the memory-mapped file as
    read), `qtype`, and `shape`, the logical shape in torch order (outermost first; GGUF lists dims innermost
    first). Not a torch.Tensor subclass on purpose: nothing can use it as a weight without dequantizing."""

    __slots__ = ("raw", "qtype", "shape")

    def __init__(self, raw: Tensor, qtype: GGMLType | int | str, shape: Sequence[int]):
        qtype = ggml_type(qtype)
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if raw.dtype != torch.uint8 or raw.dim() != 1 or numel % qtype.block_size or \
                raw.numel() != qtype.nbytes(numel):  # fmt: skip
            raise ValueError(f"{qtype.name} {shape}: needs {qtype.nbytes(numel)} bytes as a 1-d uint8 tensor, got "
                             f"{raw.dtype} {tuple(raw.shape)}")  # fmt: skip
        self.raw, self.qtype, self.shape = raw, qtype, shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as `dtype` on raw's device (float32 is bit-equal to gguf.quants.dequantize)."""
        return dequantize(self.raw, self.qtype, self.shape, dtype)

    def scales_finite(self) -> bool:
        """Whether every block's scales are finite (SCALE_OFFSETS); types without an entry are dequantized."""
        offsets = SCALE_OFFSETS.get(self.qtype.name)
        if offsets is None:
            return bool(torch.isfinite(self.dequantize()).all())
        blocks = self.raw.view(-1, self.qtype.type_size)
        return all(bool(torch.isfinite(blocks[:, o:o + 2].contiguous().view(torch.float16)).all()) for o in offsets)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        return QuantizedTensor(self.raw.to(device), self.qtype, self.shape)

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.qtype.name}, shape={list(self.shape)}, {self.nbytes} bytes, {self.device})"
