"""safetensors files: sniffing what a file really is, reading and validating the JSON header, tensor byte ranges.

File knowledge only: nothing here knows what a model family is.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError
from sdcli.formats.safetensors_header import decode_header

FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # fp8: up-cast when loaded
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 * 1024 * 1024


def sniff(head: bytes) -> str | None:
    """What a file that failed the safetensors test looks like, from its first bytes. Only an explanation: a file
    whose header length and JSON header are valid is safetensors whatever its first byte (the length's low byte
    can be 0x80, a pickle's first byte, or 0x3C, '<')."""
    if not head:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a git-LFS pointer, not the weights (run `git lfs pull` or download the real file)"
    if head.lstrip()[:1] == b"<":
        return "it is an HTML/XML page (a failed download?)"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip/PyTorch pickle checkpoint (.ckpt); convert it with `sdcli convert` first"
    if head[:1] == b"\x80":
        return "it is a Python pickle (.ckpt/.pt); only the restricted .ckpt loader may read it"
    if head.startswith(b"GGUF"):
        return "it is a GGUF file (stable-diffusion.cpp format), not safetensors"
    return None


def _read_raw(path: Path) -> tuple[bytes, bytes | None, int]:
    """(first bytes, the JSON header's bytes or None when the length cannot be one, size of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 8:
            return head, None, 0
        (n,) = struct.unpack("<Q", head[:8])
        if n > min(size - 8, _MAX_HEADER):
            return head, None, 0
        f.seek(8)
        return head, f.read(n), size - 8 - n


def read_header(path: str | Path) -> dict:
    """The safetensors JSON header of `path` (tensor names -> dtype/shape/offsets, plus ``__metadata__``).

    The header itself decides: a valid length and a JSON header that passes every check make a safetensors file,
    whatever its first bytes. Only a file that fails is sniffed, to say what it is instead."""
    path = Path(path)
    try:
        head, raw, data_size = _read_raw(path)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from e
    failure = None
    if raw is not None:
        try:
            return decode_header(path, raw, data_size)  # every entry checked as the safetensors library does
        except BadInputError as e:
            failure = e
    sniffed = sniff(head)
    if sniffed:
        raise BadInputError(f"{path}: not a valid safetensors file: {sniffed}") from None
    if failure is not None:
        raise failure
    if len(head) < 8:
        raise BadInputError(f"{path}: not a valid safetensors file: the file is too short to be safetensors (truncated)")
    raise BadInputError(f"{path}: not a valid safetensors file: its header length is past the end of the file "
                        "(truncated or not safetensors)")


def is_safetensors(path: str | Path) -> bool:
    """Whether `path` passes read_header's test (no error raised: callers use it to decide, not to explain)."""
    try:
        read_header(path)
    except BadInputError:
        return False
    return True


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor of a safetensors file (``read_header`` validates the offsets)."""
    header = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}  # fmt: skip


def dtype_name(t: Tensor) -> str:
    names = {v: k for k, v in FLOAT_DTYPES.items()}
    return names.get(t.dtype, str(t.dtype).removeprefix("torch.").upper())


def write_streamed(path: str | Path, described: dict[str, tuple[str, tuple[int, ...]]], read,
                   metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write a safetensors file one tensor at a time: `described` maps each name to (dtype name, shape), in the
    order written; ``read(name)`` gives its values (cast to that dtype here). The header comes first (its offsets
    follow from the shapes), padded with spaces to 8 bytes as the safetensors library pads it."""
    import json

    from sdcli.formats.safetensors_header import DTYPE_SIZES

    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in described.items():
        size = DTYPE_SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (dtype, shape) in described.items():
            t = read(name).to(FLOAT_DTYPES[dtype]).contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy())
