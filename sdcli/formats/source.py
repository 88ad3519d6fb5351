"""Weight sources: LDM key -> where its tensor lives (a single safetensors file, a diffusers folder, an in-memory
.ckpt, a GGUF file), read lazily, one tensor at a time, never through a memory map kept open."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError, ModelNotFoundError, quote
from sdcli.formats.pickle_ckpt import PICKLE_SUFFIXES, is_pickle, load_ckpt
from sdcli.formats.gguf import is_gguf, ldm_names, read_gguf_header
from sdcli.formats.gguf import tensor_ranges as gguf_ranges
from sdcli.formats.safetensors import FLOAT_DTYPES, dtype_name, read_header, tensor_ranges
from sdcli.quant.ggml_types import ggml_type
from sdcli.quant.tensor import QuantizedTensor


@dataclass(frozen=True)
class Entry:
    file: Path
    key: str  # name inside `file`
    dtype: str  # safetensors dtype string ("F16", ...)
    shape: tuple[int, ...]  # shape under its LDM name
    as_conv: bool = False  # stored (C, C) Linear, presented as (C, C, 1, 1) conv (diffusers VAE attention)
    gguf: bool = False  # in a GGUF file: `dtype` is the ggml type's name (F16, Q8_0, ...), `shape` the logical one
    # Set for a tensor stored as several (a diffusers folder's to_q, to_k, to_v of one fused qkv): the rows
    # [start, stop) of each stored entry, concatenated along dim 0 in this order (formats/dit_folders.py)
    pieces: tuple[tuple["Entry", int, int], ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file its bytes come from (a tensor of pieces may span shards)."""
        return tuple(dict.fromkeys(p.file for p, _, _ in self.pieces)) if self.pieces else (self.file,)

    @property
    def quantized(self) -> bool:
        """GGML blocks (Q8_0, Q4_K, ...): kept as such by loaders that can (WeightSource.quantized)."""
        return self.gguf and self.dtype not in FLOAT_DTYPES


class WeightSource:
    """LDM-named view of the tensors of one model, read lazily from memory-mapped safetensors."""

    def __init__(self, path: Path, entries: dict[str, Entry], metadata: dict | None = None,
                 prediction_hint: str | None = None, layout: str = "single",
                 tensors: dict[str, Tensor] | None = None):  # fmt: skip
        self.path, self.entries, self.layout = path, entries, layout
        self.metadata = metadata or {}
        self.prediction_hint = prediction_hint
        self._tensors = tensors  # only for .ckpt files, already in memory
        self._handles: dict[Path, Any] = {}
        self._files: dict[Path, tuple[Any, dict[str, tuple[int, int]]]] = {}

    @property
    def header(self) -> dict:
        """A safetensors-style header under LDM names (what `detect` reads)."""
        head: dict[str, Any] = {k: {"dtype": e.dtype, "shape": list(e.shape)} for k, e in self.entries.items()}
        head["__metadata__"] = dict(self.metadata, **({"sdcli.prediction_hint": self.prediction_hint}
                                                       if self.prediction_hint else {}))  # fmt: skip
        return head

    def get(self, key: str) -> Tensor:
        """The tensor as stored (a GGUF's quantized one dequantized to float32, bit-equal to gguf.quants)."""
        e = self.entries[key]
        if e.pieces:
            return torch.cat([self._get(p)[start:stop] for p, start, stop in e.pieces])
        return self._get(e)

    def _get(self, e: Entry) -> Tensor:
        if e.quantized:
            return self._quantized(e).dequantize(torch.float32)
        if self._tensors is not None:
            t = self._tensors[e.key]
        elif e.dtype in FLOAT_DTYPES:
            t = self._read(e)
        else:
            from safetensors import safe_open

            if e.file not in self._handles:
                self._handles[e.file] = safe_open(str(e.file), framework="pt", device="cpu")
            t = self._handles[e.file].get_tensor(e.key)
        return t.reshape(e.shape) if e.as_conv else t

    def quantized(self, key: str) -> QuantizedTensor:
        """A GGUF entry's GGML blocks, read into memory of their own (a uint8 tensor of the stored bytes)."""
        return self._quantized(self.entries[key])

    def _quantized(self, e: Entry) -> QuantizedTensor:
        qtype = ggml_type(e.dtype)
        raw = torch.empty(qtype.nbytes(math.prod(e.shape)), dtype=torch.uint8)
        f, start = self._locate(e)
        f.seek(start)
        self._fill(f, e, raw)
        return QuantizedTensor(raw, qtype, e.shape)

    def _read(self, e: Entry) -> Tensor:
        """One float tensor read with a plain file read into its own buffer, not through a memory map: mapped
        pages count in the process's RSS until the map closes, which would add the whole file (2 GB for SD1.5)
        on top of the cast weights at the peak of a load (measured in scripts/bench.py)."""
        f, start = self._locate(e)
        t = torch.empty(e.shape, dtype=FLOAT_DTYPES[e.dtype])
        f.seek(start)
        self._fill(f, e, t)
        return t

    def stream(self, key: str, out: Tensor, piece: int) -> Iterator[Tensor]:
        """Fill `out` (CPU, the entry's shape, any float dtype, contiguous or channels_last) with the stored tensor,
        a block of whole rows (dim 0) of about `piece` elements at a time, yielding each filled block of `out`
        while it is still in cache. The stored bytes pass through one reused buffer (or go straight into `out`
        when dtype and layout agree), so a load never holds a second copy of a tensor, and a weight is read
        straight into the layout it runs in (models/layout.py): converting it later left the old copies in glibc's
        heap (measured: ~0.35 GB for SD1.5's UNet in bf16)."""
        e = self.entries[key]
        rows = out.reshape(1) if out.dim() == 0 else out
        row = math.prod(rows.shape[1:])
        step = max(1, piece // max(row, 1))  # rows per block
        at = 0
        for part, first, stop in e.pieces or ((e, 0, rows.shape[0]),):  # a stored tensor, or the stored pieces
            yield from self._stream_rows(part, first, rows[at : at + stop - first], step)
            at += stop - first

    def _stream_rows(self, e: Entry, first: int, rows: Tensor, step: int) -> Iterator[Tensor]:
        """Fill `rows` with the stored rows [first, first + len(rows)) of entry `e`, `step` rows at a time."""
        stored = FLOAT_DTYPES[e.dtype]
        if self._tensors is not None:  # a .ckpt: already in memory
            src = self._tensors[e.key].reshape(-1, *rows.shape[1:])[first:]
            for r in range(0, rows.shape[0], step):
                yield rows[r : r + step].copy_(src[r : r + step])
            return
        row = math.prod(rows.shape[1:])
        f, start = self._locate(e)
        f.seek(start + first * row * stored.itemsize)
        direct = stored == rows.dtype and rows.is_contiguous()  # every row block is then contiguous too
        buf = None if direct else torch.empty(min(step * row, rows.numel()), dtype=stored)
        for r in range(0, rows.shape[0], step):
            dst = rows[r : r + step]
            if buf is None:
                self._fill(f, e, dst)
            else:
                self._fill(f, e, buf[: dst.numel()])
                cast_copy_(dst, buf[: dst.numel()].view(dst.shape))
            yield dst

    def _locate(self, e: Entry) -> tuple[Any, int]:
        """(the open file, the entry's first byte), checking the entry's byte length against its shape."""
        if e.file not in self._files:
            ranges = gguf_ranges(e.file) if e.gguf else tensor_ranges(e.file)
            self._files[e.file] = (open(e.file, "rb", buffering=0), ranges)
        f, ranges = self._files[e.file]
        return f, ranges[e.key][0]  # read_header checked that the range holds exactly the shape's bytes

    @staticmethod
    def _fill(f, e: Entry, t: Tensor) -> None:
        """Read exactly t's bytes from `f` into t's memory (no zero-filled bytearray, no second copy)."""
        n = t.numel() * t.element_size()
        if n and f.readinto((ctypes.c_char * n).from_address(t.data_ptr())) != n:
            raise BadInputError(f"{e.file}: truncated: tensor '{quote(e.key, 120)}' ends past the end of the file")

    def close(self) -> None:
        self._handles.clear()
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


def cast_copy_(dst: Tensor, src: Tensor) -> None:
    """dst.copy_(src) for a CPU load's pieces, in steps torch runs faster, with the same bits: a layout change
    (a contiguous stored weight into a channels_last one) is done in the source dtype first, since a copy that
    both transposes and casts is slower, and a cast between two 16-bit float types (fp16 file -> bf16 run) goes
    through float32, since torch's direct fp16 <-> bf16 cast is not vectorized (both widen to float32 and round
    to nearest even). 1M elements, Zen 4: 0.13 vs 0.67 ms contiguous, 0.35-0.45 vs 0.68 ms into channels_last
    (~0.35 s of an SD1.5 bf16 load, whose copies are mostly first-touch page faults)."""
    if dst.device.type != "cpu" or src.dtype == dst.dtype:
        dst.copy_(src)
        return
    if src.stride() != dst.stride():  # tensors here are dense: equal strides mean the same memory order
        src = torch.empty_like(dst, dtype=src.dtype).copy_(src)
    if src.dtype.itemsize == 2 and dst.dtype.itemsize == 2:
        src = torch.empty_like(dst, dtype=torch.float32).copy_(src)
    dst.copy_(src)


def entries_from_header(path: Path, header: dict, prefix: str = "", rename_fn: Callable[[str], str] | None = None,
                        as_conv: Callable[[str], bool] | None = None) -> dict[str, Entry]:
    """Entries under LDM names; `as_conv(ldm_key)` marks (C, C) Linear weights presented as (C, C, 1, 1) convs."""
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        ldm = prefix + (rename_fn(key) if rename_fn else key)
        shape = tuple(e["shape"])
        conv = as_conv is not None and as_conv(ldm) and len(shape) == 2
        out[ldm] = Entry(path, key, e["dtype"], shape + (1, 1) if conv else shape, conv)
    return out


def single_file_source(path: Path) -> WeightSource:
    """A single file under LDM names: as stored, or under ``model.diffusion_model.`` when it holds a diffusion
    transformer alone (ldm.bare_denoiser)."""
    from sdcli.formats.ldm import UNET_PREFIX, bare_denoiser

    header = read_header(path)
    prefix = UNET_PREFIX if bare_denoiser(k for k in header if k != "__metadata__") else ""
    return WeightSource(path, entries_from_header(path, header, prefix), header.get("__metadata__"))


def gguf_source(path: Path) -> WeightSource:
    """A GGUF file under LDM names (formats/gguf.ldm_names), its scalar metadata as strings: float tensors read as
    any file's, quantized ones kept as GGML blocks by the loaders that can (WeightSource.quantized)."""
    info = read_gguf_header(path)
    names = ldm_names(info)
    entries = {names[t.name]: Entry(path, t.name, t.qtype.name, t.shape, gguf=True) for t in info.tensors.values()}
    metadata = {k: str(v) for k, v in info.metadata.items() if not isinstance(v, list)}
    return WeightSource(path, entries, metadata, layout="gguf")


def open_file(path: str | Path) -> WeightSource:
    """A WeightSource for a single file: .safetensors, .gguf or, restricted, .ckpt (diffusers.open_source adds
    folders)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    if is_gguf(path):  # named .gguf or starting with its magic, and not a valid safetensors file
        return gguf_source(path)
    # Only a pickle extension opts in to the restricted unpickler; a pickle under any other name (say
    # .safetensors) is refused by read_header's sniffing, so renaming a file can never make us unpickle it. A valid
    # safetensors file is read as one whatever its name and first bytes (is_pickle asks the header first).
    if path.suffix.lower() in PICKLE_SUFFIXES and is_pickle(path):
        state = load_ckpt(path)
        entries = {k: Entry(path, k, dtype_name(t), tuple(t.shape)) for k, t in state.items()}
        return WeightSource(path, entries, {}, layout="ckpt", tensors=state)
    return single_file_source(path)


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("model_index.json", "unet", "transformer"))
