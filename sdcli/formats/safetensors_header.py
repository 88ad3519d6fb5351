"""Validation of a safetensors header, entry by entry, before any tensor byte is read.

The rules are those of the safetensors library itself (``Metadata::validate`` and ``read_metadata`` in
huggingface/safetensors ``safetensors/src/tensor.rs``), so a file we accept is one the library accepts:

- the header is a JSON object; ``__metadata__``, if present and not null, maps strings to strings;
- every other entry has a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets``
  ``[begin, end]`` of non-negative integers with ``end - begin == numel * dtype size`` exactly;
- sorted by offsets, the tensors tile the data section: the first begins at 0, each begins where the one
  before ended (no gap, no overlap), the last ends at the end of the file (no trailing bytes).

Beyond the library: sub-byte dtypes (F4, F6_*) and F8_E8M0, which torch cannot hold, are refused, as are
shapes of more than ``MAX_RANK`` dimensions. Zero-sized dimensions are allowed (ComfyUI's latent marker is an
empty tensor); each consumer checks the shapes it needs.

Why it matters: sdcli reads float tensors with a plain ``readinto`` sized from the offsets, so an entry whose
byte range is longer than its shape would write past the tensor's buffer. Errors are ``BadInputError``
(exit 3) naming the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdcli.runtime.errors import BadInputError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE
MAX_RANK = 32
METADATA_KEY = "__metadata__"
_USIZE_LIMIT = 2**64  # offsets and dimensions are usize in the library

# Bytes per element of each dtype sdcli (through torch) can hold.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8,
}  # fmt: skip


def _refuse(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path}: not a valid safetensors file: {what}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; the format does not


def decode_header(path: str | Path, raw: bytes, data_size: int) -> dict:
    """The validated header from its raw JSON bytes; `data_size` is the byte length of the data section."""
    path = Path(path)
    if len(raw) > MAX_HEADER_BYTES:
        raise _refuse(path, f"header of {len(raw)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise _refuse(path, f"header is not JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    except RecursionError:
        raise _refuse(path, "header JSON is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers of thousands of digits
        raise _refuse(path, f"header is not JSON ({' '.join(str(e).split())[:120]})") from None
    validate_header(path, header, data_size)
    return header


def validate_header(path: str | Path, header: Any, data_size: int) -> None:
    """Check a decoded header against the format (see the module docstring). A null ``__metadata__`` (which
    the library allows) is removed, so callers see a str->str dict or nothing."""
    path = Path(path)
    if not isinstance(header, dict):
        raise _refuse(path, "header is not a JSON object")
    if METADATA_KEY in header:
        _check_metadata(path, header)
    ranges = []
    for name, entry in header.items():
        if name != METADATA_KEY:
            ranges.append((*_check_entry(path, name, entry), name))
    _check_tiling(path, ranges, data_size)


def _check_metadata(path: Path, header: dict) -> None:
    meta = header[METADATA_KEY]
    if meta is None:
        del header[METADATA_KEY]
        return
    if not isinstance(meta, dict):
        raise _refuse(path, f"{METADATA_KEY} is a {type(meta).__name__}, not a map of strings to strings")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise _refuse(path, f"{METADATA_KEY}[{key[:60]!r}] is a {type(value).__name__}, not a string")


def _is_usize(value: Any) -> bool:
    return type(value) is int and 0 <= value < _USIZE_LIMIT  # bool is an int subclass: refused here


def _check_entry(path: Path, name: str, entry: Any) -> tuple[int, int]:
    """(begin, end) of one tensor entry after checking its dtype, shape and exact byte length."""
    where = f"tensor {name[:120]!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _refuse(path, f"{where}: entry is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise _refuse(path, f"{where}: unknown or unsupported dtype {str(dtype)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_usize(d) for d in shape):
        raise _refuse(path, f"{where}: shape {_short(shape)} is not a list of at most {MAX_RANK} "
                            "non-negative integers")  # fmt: skip
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_usize(o) for o in offsets):
        raise _refuse(path, f"{where}: data_offsets {_short(offsets)} are not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _refuse(path, f"{where}: data_offsets [{begin}, {end}] end before they begin")
    numel = 1
    for dim in shape:
        numel *= dim
    need = numel * DTYPE_SIZES[dtype]
    if end - begin != need:
        raise _refuse(path, f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                            f"{shape} of {dtype} needs {need}")  # fmt: skip
    return begin, end


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float, bool)) or value is None else "?"
    return text if len(text) <= 60 else text[:57] + "..."


def _check_tiling(path: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """Sorted by offsets, the tensors cover the data section exactly, as the library requires."""
    for begin, end, name in ranges:
        if end > data_size:
            raise BadInputError(f"{path}: truncated: tensor {name[:120]!r} ends past the end of the file "
                                f"(byte {end} of a {data_size}-byte data section)")  # fmt: skip
    ranges = sorted(ranges)
    for (_, end_before, before), (begin, end, name) in zip(ranges, ranges[1:]):  # overlaps first: the worse
        if begin < end_before:
            raise _refuse(path, f"tensor {name[:120]!r}: data_offsets [{begin}, {end}] overlap tensor "
                                f"{before[:120]!r}")  # fmt: skip
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            raise _refuse(path, f"tensor {name[:120]!r}: data_offsets [{begin}, {end}] leave a gap at byte {position}")
        position = end
    if position != data_size:
        raise _refuse(path, f"{data_size - position} bytes after the last tensor (trailing data)")
