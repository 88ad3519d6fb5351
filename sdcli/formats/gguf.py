"""GGUF files (ggml's format; city96's ComfyUI-GGUF and stable-diffusion.cpp write image models in it): the header
read and validated entry by entry before any tensor byte is used, then the tensors memory-mapped, quantized ones
kept as GGML blocks (sdcli.quant.tensor.QuantizedTensor).

Layout (ggml docs/gguf.md): magic ``GGUF``, version u32 (2 or 3), tensor count u64, metadata count u64; metadata
entries (key string, value type u32, value; a string is a u64 length + UTF-8 bytes, an array an item type u32 +
u64 count + items); tensor infos (name string, n_dims u32, dims u64 innermost first, ggml type u32, offset u64
from the data section); padding to ``general.alignment`` (u32, default 32); the data section. Little-endian.

The rules are those of ggml's own reader (``gguf_init_from_file_impl`` in ggml/src/gguf.cpp): versions 2-3, no
duplicate keys or tensor names, no nested arrays, ``general.alignment`` a u32 power of two, at most 4 dims, each
below 2**63 and their product too, a known type id, the innermost dim a multiple of the type's block size, byte
size = blocks x type size. Beyond ggml (which checks neither): each tensor's byte range lies inside the file, on
the alignment, and overlaps no other. Errors: BadInputError (exit 3) naming the file and the entry;
UnsupportedModelError (exit 8) for what is valid but unread (GGUF v1, byte-swapped files; a quant type with no
dequantizer is refused by ``load_gguf_state``, not here, so ``inspect`` can still list the file).

Why not ``gguf.GGUFReader``: it trusts the counts (a 40-byte file declaring an array of 2**62 items keeps it busy
forever), truncated tensors surface as numpy reshape errors, and it decodes metadata arrays one item at a time.
The gguf package stays the writer (sdcli.quant.quantize) and the tests' oracle.

A file is GGUF when this validation passes, not when it starts with the magic (see ``GGUF_MAGIC``).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError, UnsupportedModelError
from sdcli.formats.ldm import OPENCLIP_TEXT, refuse_empty
from sdcli.quant.dequantize import check_supported
from sdcli.quant.ggml_types import GGML_TYPES, GGMLType
from sdcli.quant.tensor import QuantizedTensor

GGUF_MAGIC = b"GGUF"  # only a hint: a file is GGUF when read_gguf_header accepts it
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_I64_LIMIT = 2**63
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # city96's SD1/SDXL files: a tensor stored as (n/256, 256), its shape


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # as stored in the file
    shape: tuple[int, ...]  # logical, torch order (outermost first): the file's dims reversed, or orig_shape
    qtype: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    version: int
    architecture: str | None  # general.architecture: city96 writes flux/sd3/sdxl/sd1/t5encoder, sd.cpp nothing
    metadata: dict[str, Any] = field(repr=False)  # key -> scalar, str or list (arrays in full)
    tensors: dict[str, GGUFTensor] = field(repr=False)  # in file order
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # where the data section starts


def _refuse(path: Path, what: str) -> BadInputError:
    return BadInputError(f"{path}: not a valid GGUF file: {what}")


def _short(name: str) -> str:
    return repr(name if len(name) <= 120 else name[:117] + "...")


class _Cursor:
    """Reads the header from the mapped file; every read is bounds-checked first (a bad count ends at the file's
    end, quickly, with the entry named)."""

    def __init__(self, path: Path, buf: Any):
        self.path, self.buf, self.pos, self.size = path, buf, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise BadInputError(f"{self.path}: truncated GGUF file: {what} ends past the end of the file")

    def take(self, n: int, what: str) -> int:
        self.need(n, what)
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, code: str, what: str) -> Any:
        return struct.unpack_from("<" + code, self.buf, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str, lossy: bool = False) -> str:
        """A length-prefixed UTF-8 string. Keys and tensor names must decode (a bad one refuses the file);
        metadata values are `lossy`: llama.cpp writers store tokenizer byte-pieces that are not UTF-8, and sdcli
        reads values only to show them or to match known names (general.architecture), so U+FFFD stands in."""
        n = self.scalar("Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace" if lossy else "strict")
        except UnicodeDecodeError:
            raise _refuse(self.path, f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what, lossy=True)
        if vtype == _ARRAY:
            return self.array(what)
        raise _refuse(self.path, f"{what} has an unknown value type {vtype}")

    def array(self, what: str) -> list:
        itype, count = self.scalar("I", what), self.scalar("Q", what)
        if itype == _STRING:
            self.need(8 * count, what)  # each string takes at least its length: a huge count stops here
            return [self.string(what, lossy=True) for _ in range(count)]
        if itype not in _SCALARS:
            raise _refuse(self.path, f"{what} is an array of value type {itype} (nested or unknown)")
        itemsize = struct.calcsize(_SCALARS[itype])
        start = self.take(itemsize * count, what)
        return np.frombuffer(self.buf, "<" + _SCALARS[itype], count, start).tolist()


def _header_counts(cur: _Cursor) -> tuple[int, int, int]:
    """(version, tensor count, metadata count), after the magic."""
    if cur.size < 4 or bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise _refuse(cur.path, "it does not start with the magic 'GGUF'")
    cur.pos = 4
    version = cur.scalar("I", "the version")
    if version & 0xFFFF == 0 and version:
        raise UnsupportedModelError(f"{cur.path}: a byte-swapped (big-endian) GGUF file: only little-endian "
                                    "files are read")  # fmt: skip
    if version == 1:
        raise UnsupportedModelError(f"{cur.path}: GGUF version 1 (2023) is not read; convert it again")
    if version not in (2, 3):
        raise (UnsupportedModelError if version > 3 else BadInputError)(f"{cur.path}: GGUF version {version} "
                                                                         "is not read (2 and 3 are)")  # fmt: skip
    n_tensors, n_kv = cur.scalar("Q", "the tensor count"), cur.scalar("Q", "the metadata count")
    cur.need(n_kv * 12 + n_tensors * 24, "the metadata and tensor list")  # the least each entry takes
    return version, n_tensors, n_kv


def _metadata(cur: _Cursor, count: int) -> tuple[dict[str, Any], dict[str, int]]:
    """(key -> value, key -> value type id) of the metadata entries."""
    meta: dict[str, Any] = {}
    types: dict[str, int] = {}
    for i in range(count):
        key = cur.string(f"metadata key {i}")
        if key in meta:
            raise _refuse(cur.path, f"metadata key {_short(key)} appears twice")
        types[key] = cur.scalar("I", f"metadata {_short(key)}")
        meta[key] = cur.value(types[key], f"metadata {_short(key)}")
    return meta, types


def _alignment(path: Path, meta: dict, types: dict) -> int:
    if "general.alignment" not in meta:
        return DEFAULT_ALIGNMENT
    value = meta["general.alignment"]
    if types.get("general.alignment") != 4 or value == 0 or value & (value - 1):
        raise _refuse(path, f"general.alignment {value!r} is not a u32 power of two")
    return value


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GGMLType, int]:
    """(name, dims innermost first, type, offset) of tensor info `i`, each field checked as ggml does."""
    name = cur.string(f"the name of tensor {i}")
    where = f"tensor {_short(name)}"
    n_dims = cur.scalar("I", where)
    if n_dims > MAX_DIMS:
        raise _refuse(cur.path, f"{where} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = tuple(cur.scalar("Q", where) for _ in range(n_dims))
    if any(d >= _I64_LIMIT for d in dims) or math.prod(dims) >= _I64_LIMIT:
        raise _refuse(cur.path, f"{where}: dimensions {list(dims)} are too large")
    type_id, offset = cur.scalar("I", where), cur.scalar("Q", where)
    qtype = GGML_TYPES.get(type_id)
    if qtype is None:
        raise _refuse(cur.path, f"{where} has an unknown ggml type id {type_id}")
    if (dims[0] if dims else 1) % qtype.block_size:
        raise _refuse(cur.path, f"{where}: rows of {dims[0] if dims else 1} elements are not a whole number of "
                                f"{qtype.name} blocks of {qtype.block_size}")  # fmt: skip
    return name, dims, qtype, offset


def _logical_shape(path: Path, name: str, dims: tuple[int, ...], meta: dict) -> tuple[int, ...]:
    """Torch order: the stored dims reversed, or city96's comfy.gguf.orig_shape.<name> when it holds as many
    elements (his SD1/SDXL files store a (..., 3, 3) conv as (n/256, 256) so it can be quantized)."""
    shape = tuple(reversed(dims))
    orig = meta.get(ORIG_SHAPE_KEY + name)
    if orig is None:
        return shape
    if not (isinstance(orig, list) and all(type(d) is int and d >= 0 for d in orig)) or \
            math.prod(orig) != math.prod(shape):  # fmt: skip
        raise _refuse(path, f"{ORIG_SHAPE_KEY}{name[:120]} = {str(orig)[:60]} does not fit the stored shape "
                            f"{list(shape)}")  # fmt: skip
    return tuple(orig)


def _check_ranges(path: Path, tensors: list[GGUFTensor], size: int, alignment: int, data_offset: int) -> None:
    """Each tensor inside the file, on the alignment, overlapping no other."""
    for t in tensors:
        if (t.offset - data_offset) % alignment:
            raise _refuse(path, f"tensor {_short(t.name)}: offset {t.offset - data_offset} is not a multiple of "
                                f"the alignment {alignment}")  # fmt: skip
        if t.offset + t.nbytes > size:
            raise BadInputError(f"{path}: truncated GGUF file: tensor {_short(t.name)} ends past the end of the file "
                                f"(byte {t.offset + t.nbytes} of {size})")  # fmt: skip
    ordered = sorted(tensors, key=lambda t: t.offset)
    for before, t in zip(ordered, ordered[1:]):
        if t.offset < before.offset + before.nbytes:
            raise _refuse(path, f"tensor {_short(t.name)} overlaps tensor {_short(before.name)}")


def _map(path: Path) -> mmap.mmap:
    """The file mapped copy-on-write: pages shared with the page cache, tensors writable for torch (no copy)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) == 0:
                raise _refuse(path, "the file is empty")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from e


def _parse(path: Path, buf: Any) -> GGUFInfo:
    cur = _Cursor(path, buf)
    version, n_tensors, n_kv = _header_counts(cur)
    meta, types = _metadata(cur, n_kv)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    alignment = _alignment(path, meta, types)
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, qtype, offset in infos:
        if name in tensors:
            raise _refuse(path, f"tensor {_short(name)} appears twice")
        shape = _logical_shape(path, name, dims, meta)
        refuse_empty({name: shape}, [name], path)  # valid GGUF, but no network's weight: sizes read would be 0
        tensors[name] = GGUFTensor(name, shape, qtype, data_offset + offset, qtype.nbytes(math.prod(dims)))
    _check_ranges(path, list(tensors.values()), cur.size, alignment, data_offset)
    arch = meta.get("general.architecture")
    if arch is not None and types["general.architecture"] != _STRING:
        raise _refuse(path, f"general.architecture is not a string ({str(arch)[:40]})")
    return GGUFInfo(path, version, arch, meta, tensors, alignment, data_offset)


def read_gguf_header(path: str | Path) -> GGUFInfo:
    """The validated header of a GGUF file (module docstring); reads no tensor data."""
    path = Path(path)
    buf = _map(path)
    try:
        return _parse(path, buf)
    finally:
        buf.close()


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is to be read as GGUF: a file named ``.gguf`` or starting with the magic that is not a valid
    safetensors file. That only picks the reader: read_gguf_header's checks then decide (and say what is wrong),
    and a valid safetensors header wins over a name or a magic number."""
    from sdcli.formats.safetensors import is_safetensors

    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() != ".gguf":
        try:
            with open(path, "rb") as f:
                if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                    return False
        except OSError:
            return False
    return not is_safetensors(path)


def tensor_ranges(path: str | Path) -> dict[str, tuple[int, int]]:
    """Stored name -> absolute byte range of each tensor (read_gguf_header checked that each lies in the file)."""
    return {t.name: (t.offset, t.offset + t.nbytes) for t in read_gguf_header(path).tensors.values()}


# city96's convert.py (ComfyUI-GGUF tools/) writes an architecture (flux, sdxl, ...) for a denoiser alone, with the checkpoint's prefix
# ("model.diffusion_model.") removed; his T5 files use llama.cpp's names; stable-diffusion.cpp writes no
# architecture and keeps the checkpoint's own names.
T5_ARCHS = frozenset({"t5", "t5encoder"})
LLM_ROOTS = ("blk.", "token_embd.", "output_norm.")
UNET_PREFIX = "model.diffusion_model."
PART_PREFIXES = (UNET_PREFIX, "first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.")
DENOISER_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "double_blocks.", "single_blocks.",
                  "joint_blocks.")  # fmt: skip

# llama.cpp's T5 encoder names -> transformers' T5EncoderModel names (the t5xxl safetensors files' own), as
# ComfyUI-GGUF's loader.py T5_SD_MAP maps them
T5_LAYERS = {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o", "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm", "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1", "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm",
}  # fmt: skip
T5_NAMES = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_T5_BLOCK = re.compile(r"enc\.blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


# stable-diffusion.cpp's own names for SDXL's two text encoders (name_conversion.cpp: conditioner.embedders.0. ->
# cond_stage_model., .1. -> cond_stage_model.1., OpenCLIP turned into transformers names with q/k/v split), put back
# where an sgm file has them. Its bigG projection is OpenCLIP's (width, proj) matrix under the bare name
# ``text_projection`` (formats/clip_layouts reads a bare one transposed). Only for files with ``cond_stage_model.1.``:
# an SD1 file of its has SD1's own names.
SDCPP_SDXL_TEXT = (
    ("cond_stage_model.1.transformer.text_model.text_projection", "conditioner.embedders.1.transformer.text_projection"),
    ("cond_stage_model.1.transformer.", "conditioner.embedders.1.transformer."),
    ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
)  # fmt: skip
SDCPP_SDXL_MARK = "cond_stage_model.1."


# stable-diffusion.cpp's names for SD2's OpenCLIP ViT-H text tower (name_conversion.cpp
# convert_open_clip_to_hf_clip_name: transformers names under cond_stage_model.transformer.text_model., the fused
# in_proj kept as self_attn.in_proj, OpenCLIP's (width, proj) projection under the bare text_projection, and EVERY
# layer: sd.cpp skips the last one at run time), put back under the OpenCLIP names of an SD2 file, so the load is an
# SD2 safetensors file's: the last layer dropped (SD2 conditions on the penultimate), q/k/v split from in_proj. Older
# sd.cpp versions split in_proj into q_proj/k_proj/v_proj before writing: those names are kept beside OpenCLIP's
# (formats/clip_layouts.OPENCLIP_RULES places them). Only for files whose CLIP holds that bare text_projection:
# SD1's OpenAI CLIP has none, and a diffusers SD2 text encoder (already cut to 23 layers) neither.
SDCPP_OPENCLIP_MARK = "cond_stage_model.transformer.text_model.text_projection"
SDCPP_OPENCLIP_FROM = "cond_stage_model.transformer.text_model."
SDCPP_OPENCLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight", "text_projection": "text_projection",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
}  # fmt: skip
SDCPP_OPENCLIP_LAYER = (
    ("self_attn.in_proj.weight", "attn.in_proj_weight"), ("self_attn.in_proj.bias", "attn.in_proj_bias"),
    ("self_attn.", "attn."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)  # fmt: skip
_SDCPP_OPENCLIP_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def _sdcpp_openclip_name(name: str) -> str:
    if not name.startswith(SDCPP_OPENCLIP_FROM):
        return name
    rest = name[len(SDCPP_OPENCLIP_FROM):]
    if rest in SDCPP_OPENCLIP_TOP:
        return OPENCLIP_TEXT + SDCPP_OPENCLIP_TOP[rest]
    if m := _SDCPP_OPENCLIP_BLOCK.fullmatch(rest):
        for old, new in SDCPP_OPENCLIP_LAYER:
            if m.group(2).startswith(old):
                return f"{OPENCLIP_TEXT}transformer.resblocks.{m.group(1)}.{new}{m.group(2)[len(old):]}"
    return name  # anything else stays as stored: a strict load lists it


def _sdcpp_sdxl_name(name: str) -> str:
    for old, new in SDCPP_SDXL_TEXT:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _t5_name(name: str) -> str:
    m = _T5_BLOCK.fullmatch(name)
    if m and m.group(2) in T5_LAYERS:
        return f"encoder.block.{m.group(1)}.{T5_LAYERS[m.group(2)]}.{m.group(3)}"
    return T5_NAMES.get(name, name)  # anything else stays as stored: a strict load lists it


def ldm_names(info: GGUFInfo) -> dict[str, str]:
    """Stored name -> the name a safetensors file of the same model gives the tensor, seen through sdcli's LDM lens
    (formats/ldm.py): city96's bare denoiser names get ``model.diffusion_model.`` back, so detection and
    ``strict.identity_plan`` (which strips the prefix per part, as for any checkpoint) work unchanged; T5 names
    become transformers'; stable-diffusion.cpp's names stay (a bare denoiser of its is prefixed as city96's), but
    for its SDXL text encoders, put back where an sgm file has them (SDCPP_SDXL_TEXT), and its SD2 OpenCLIP tower
    under an SD2 file's OpenCLIP names (SDCPP_OPENCLIP_*)."""
    arch, names = info.architecture, list(info.tensors)
    if arch in T5_ARCHS:
        out = {n: _t5_name(n) for n in names}
    elif arch is not None and any(n.startswith(LLM_ROOTS) for n in names):  # llama.cpp's language models
        raise UnsupportedModelError(f"{info.path}: a language model (GGUF architecture {str(arch)[:40]!r}), not an "
                                    "image model or T5 encoder sdcli reads")  # fmt: skip
    # any other architecture is taken as a denoiser: which family (or none) detection says from the names, as for
    # a safetensors file, so no architecture name is listed here
    elif arch is None and (any(n.startswith(PART_PREFIXES) for n in names) or
                           not any(n.startswith(DENOISER_ROOTS) for n in names)):  # fmt: skip
        sdxl = any(n.startswith(SDCPP_SDXL_MARK) for n in names)
        openclip = not sdxl and SDCPP_OPENCLIP_MARK in info.tensors
        rename = _sdcpp_sdxl_name if sdxl else _sdcpp_openclip_name if openclip else (lambda n: n)
        out = {n: rename(n) for n in names}
    else:
        out = {n: n if n.startswith(UNET_PREFIX) else UNET_PREFIX + n for n in names}
    if len(set(out.values())) != len(out):
        raise BadInputError(f"{info.path}: two GGUF tensors map to one checkpoint name (with and without "
                            f"{UNET_PREFIX!r}?)")  # fmt: skip
    return out


def header_view(info: GGUFInfo) -> dict[str, Any]:
    """A safetensors-style header under the LDM names (name -> {"dtype": the ggml type's name, "shape"}, plus a
    str -> str ``__metadata__`` of the scalar metadata), for header-only code such as checkpoint.detect."""
    names = ldm_names(info)
    out: dict[str, Any] = {names[t.name]: {"dtype": t.qtype.name, "shape": list(t.shape)} for t in info.tensors.values()}
    out["__metadata__"] = {k: str(v) for k, v in info.metadata.items() if not isinstance(v, list)}
    return out


def _tensor(raw: Tensor, t: GGUFTensor) -> QuantizedTensor | Tensor:
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    if raw.storage_offset() % 8:
        raw = raw.clone()  # an alignment below 8 (legal, never seen): views as wider dtypes need it aligned
    if t.qtype.name in dtypes:
        return raw.view(dtypes[t.qtype.name]).reshape(t.shape)
    return QuantizedTensor(raw, t.qtype, t.shape)


def load_gguf_state(path: str | Path) -> dict[str, QuantizedTensor | Tensor]:
    """Every tensor of a GGUF file under its LDM name (``ldm_names``), memory-mapped (no copy): F32/F16/BF16/F64
    as plain tensors of that dtype, quantized ones as QuantizedTensor. A type sdcli cannot dequantize (IQ2_XXS,
    ...) is refused here, at load, with UnsupportedModelError naming it and a tensor that has it."""
    path = Path(path)
    info = read_gguf_header(path)
    names = ldm_names(info)
    for t in info.tensors.values():
        check_supported(t.qtype, f"{path}: tensor {_short(t.name)}")
    data = torch.frombuffer(_map(path), dtype=torch.uint8)  # the tensors keep the mapping alive
    return {names[t.name]: _tensor(data[t.offset:t.offset + t.nbytes], t) for t in info.tensors.values()}
