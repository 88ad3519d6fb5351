"""The ggml tensor types a GGUF file may hold, as data: id, name, elements per block, bytes per block.

Source: ggml ``type_traits`` in ggml/src/ggml.c (the ``enum ggml_type`` ids of ggml/include/ggml.h); gguf-py carries
the same table as ``gguf.GGML_QUANT_SIZES``, which the tests compare with this one. Ids ggml has retired (the
ARM-repacked Q4_0_4_4 .. IQ4_NL_8_8 of 2024) stay listed so files holding them are named, not called corrupt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_size: int  # elements per block; the innermost dimension of a tensor is a multiple of it
    type_size: int  # bytes per block

    def nbytes(self, numel: int) -> int:
        """Bytes that `numel` elements take (a whole number of blocks: callers check divisibility)."""
        return numel // self.block_size * self.type_size

    @property
    def is_float(self) -> bool:
        """Stored as plain IEEE floats, one element per block (no dequantization, only a view)."""
        return self.name in ("F32", "F16", "BF16", "F64")


_TABLE = (
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292), (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98), (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2),
    (31, "Q4_0_4_4", 32, 18), (32, "Q4_0_4_8", 32, 18), (33, "Q4_0_8_8", 32, 18),  # retired by ggml
    (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (36, "IQ4_NL_4_4", 32, 18), (37, "IQ4_NL_4_8", 32, 18), (38, "IQ4_NL_8_8", 32, 18),  # retired by ggml
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
)  # fmt: skip

GGML_TYPES: dict[int, GGMLType] = {i: GGMLType(i, n, b, s) for i, n, b, s in _TABLE}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in GGML_TYPES.values()}


def ggml_type(qtype: GGMLType | int | str) -> GGMLType:
    """The type from itself, its id (an int or gguf's GGMLQuantizationType) or its name ("Q8_0", "q8_0")."""
    if isinstance(qtype, GGMLType):
        return qtype
    if isinstance(qtype, str):
        found = BY_NAME.get(qtype.upper())
    else:
        found = GGML_TYPES.get(int(qtype))
    if found is None:
        raise ValueError(f"unknown ggml type {qtype!r}")
    return found
