"""Which type each tensor gets when a checkpoint is written as GGUF, and the writer (``sdcli convert --quantize``).

The rules follow stable-diffusion.cpp's ``ModelLoader::tensor_should_be_converted`` (src/model_loader.cpp) and
city96's ``tools/convert.py`` (ComfyUI-GGUF): only matrices and conv kernels are quantized; biases, norms and
other 1-d or small tensors, the embedders and input/output layers sd.cpp keeps (Flux ``img_in``/``final_layer``,
MMDiT ``x_embedder``/``pos_embed``, UNet ``time_embed``/``label_emb``, anything named ``embedding``) and any
tensor whose innermost dimension is not a whole number of blocks (a UNet's 3x3 convs) stay float; the VAE is never
quantized. User rules come first, in sd.cpp's ``--tensor-type-rules`` syntax: ``REGEX=TYPE`` pairs separated by
commas, the first whose regex is found in the name wins (``^first_stage_model\\.=f16,attn=q8_0``); the keep-float
checks still apply after a rule, as in sd.cpp.

With ``convs=True`` (``convert --quantize-convs``) a conv kernel whose rows are no whole number of blocks is
quantized too, stored as rows of 256 elements with its shape in ``comfy.gguf.orig_shape.<name>``: city96's layout
for SD1/SDXL UNets (ComfyUI-GGUF convert.py ``shape_fix``), read by ComfyUI-GGUF and sdcli (formats/gguf.py), not
by stable-diffusion.cpp, which keeps such convolutions float (most of a UNet's weights: the reason sd.cpp's q4_0
SD1 file is 2.0 GB against 2.3 GB in f16).

Writing uses the gguf package (the optional extra ``sdcli[gguf]``): ``gguf.quants.quantize`` makes the blocks of
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, sdcli's own quant/kquants.py those of Q2_K..Q6_K (the gguf package
cannot write K-quants; ours are ggml's reference quantizers, byte for byte), ``gguf.GGUFWriter`` the file, one
tensor in memory at a time. i-quants need an importance matrix: llama.cpp's ``llama-quantize`` makes them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError, OutputError, UsageError, quote
from sdcli.quant.ggml_types import BY_NAME, GGMLType, ggml_type

GGUF_WRITES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # what gguf.quants.quantize makes
WRITABLE = (*GGUF_WRITES, "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # the K-quants: quant/kquants.py
MAX_DIMS = 4  # GGML_MAX_DIMS
SMALL = 1024  # tensors of at most this many elements stay float (city96's QUANTIZATION_THRESHOLD)
ROW = 256  # --quantize-convs: a kernel's elements as rows of this many (city96's shape_fix; a K-quant block too)
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # where such a tensor's shape is kept (formats/gguf.py reads it)
VAE_PREFIXES = ("first_stage_model.", "vae.")
KEEP_FLOAT = re.compile(  # stable-diffusion.cpp tensor_should_be_converted: embedders and input/output layers
    r"\.(bias|scale)$|img_in\.|txt_in\.|time_in\.|vector_in\.|guidance_in\.|final_layer\.|x_embedder\.|"
    r"t_embedder\.|y_embedder\.|pos_embed|context_embedder\.|time_embed\.|label_emb\.|embedding"
)


@dataclass(frozen=True)
class TypeRule:
    pattern: re.Pattern
    qtype: GGMLType


def parse_type_rules(text: str) -> list[TypeRule]:
    """``REGEX=TYPE[,REGEX=TYPE...]`` (types by ggml name, any case: q8_0, f16, ...) -> rules in order."""
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, name = item.rpartition("=")
        if not sep or not pattern:
            raise UsageError(f"tensor type rule {quote(repr(item))} is not REGEX=TYPE")
        if name.upper() not in WRITABLE:
            raise UsageError(f"tensor type rule {quote(repr(item))}: type {quote(repr(name), 60)} cannot be written "
                             f"(use one of {', '.join(t.lower() for t in WRITABLE)})")  # fmt: skip
        try:
            rules.append(TypeRule(re.compile(pattern), BY_NAME[name.upper()]))
        except re.error as e:
            raise UsageError(f"tensor type rule {quote(repr(item))}: bad regex ({e})") from None
    return rules


def _float_type(shape: Sequence[int], dtype: torch.dtype) -> GGMLType:
    """What a kept tensor is written as: 1-d and small ones F32 (city96), the rest in the precision they came in
    (F32, BF16, else F16): a tensor that is not quantized is not rounded either."""
    if len(shape) < 2 or math.prod(shape) <= SMALL or dtype in (torch.float32, torch.float64):
        return BY_NAME["F32"]
    return BY_NAME["BF16" if dtype == torch.bfloat16 else "F16"]


def choose_type(name: str, shape: Sequence[int], dtype: torch.dtype, qtype: GGMLType | str,
                rules: Sequence[TypeRule] = (), convs: bool = False) -> GGMLType:  # fmt: skip
    """The type tensor `name` (of `shape`, stored as `dtype`) is written as, asked for `qtype` overall; `convs`:
    kernels whose rows are no whole number of blocks are quantized as rows of ROW elements (module docstring)."""
    kept = _float_type(shape, dtype)
    if name.startswith(VAE_PREFIXES):
        return kept
    want = next((r.qtype for r in rules if r.pattern.search(name)), ggml_type(qtype))
    if want.is_float:
        return BY_NAME["F32"] if kept.name == "F32" else want
    if len(shape) < 2 or math.prod(shape) <= SMALL or KEEP_FLOAT.search(name):
        return kept
    if shape[-1] % want.block_size and not (convs and math.prod(shape) % ROW == 0):
        return kept
    return want


def rows(shape: Sequence[int], qtype: GGMLType) -> tuple[int, ...]:
    """The shape a tensor is stored in: its own, or ROW-element rows when its own rows are no whole blocks."""
    shape = tuple(shape) or (1,)
    if shape[-1] % qtype.block_size:
        return (math.prod(shape) // ROW, ROW)
    return shape


def _blocks(t: Tensor, qtype: GGMLType):
    """The numpy array GGUFWriter takes for `t` as `qtype` (float32 or float16 values, or uint8 blocks)."""
    import gguf

    data = t.detach().to("cpu", torch.float32).numpy()
    if qtype.name not in GGUF_WRITES:
        from sdcli.quant import kquants

        return kquants.quantize(data, qtype.name)
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType(qtype.id))


def _stored_shape(shape: Sequence[int], qtype: GGMLType) -> tuple[int, ...]:
    """The numpy shape _blocks returns: the tensor's, or its rows as bytes for block types (and BF16)."""
    shape = tuple(shape) or (1,)
    if qtype.name in ("F32", "F16"):
        return shape
    return (*shape[:-1], shape[-1] // qtype.block_size * qtype.type_size)


def import_gguf():
    """The gguf package (the optional extra), or a one-line UsageError saying how to install it."""
    try:
        import gguf
    except ImportError:
        from sdcli.runtime.extras import install_hint

        raise UsageError(f"writing GGUF files needs the gguf package, an optional extra: {install_hint('gguf')}") \
            from None  # fmt: skip
    return gguf


def check_writable(qtype: GGMLType | str) -> GGMLType:
    """The type, or a UsageError saying why not and what can be written instead."""
    name = str(getattr(qtype, "name", qtype)).upper()
    if name in WRITABLE:
        return BY_NAME[name]
    if name in BY_NAME and name.startswith("IQ"):
        why = "i-quants need an importance matrix: llama.cpp's llama-quantize makes them (sdcli reads their files)"
    elif name in BY_NAME:
        why = "the gguf package does not quantize to it"
    else:
        why = "no such ggml type"
    raise UsageError(f"cannot write {name} GGUF files: {why}; use one of "
                     f"{', '.join(t.lower() for t in WRITABLE)}")


def write_gguf(path: str | Path, tensors: Mapping[str, Tensor], qtype: GGMLType | str, arch: str | None = None,
               rules: Sequence[TypeRule] = (), read: Callable[[str], Tensor] | None = None,
               metadata: Mapping[str, str] | None = None, convs: bool = False) -> dict[str, str]:  # fmt: skip
    """Write `tensors` (names kept) as a GGUF file, each as ``choose_type`` says; `arch` becomes
    ``general.architecture`` (city96's convention; None writes none, as stable-diffusion.cpp). With `read`, the
    values of `tensors` only describe (meta tensors: shape and dtype) and ``read(name)`` gives each one's values
    when it is written, so one tensor is in memory at a time. `metadata`: string entries to keep (a checkpoint's
    ``modelspec.*``...); `convs`: choose_type's. The file appears whole or not at all (written aside, then
    renamed). Returns name -> the type name written."""
    gguf = import_gguf()
    qtype = check_writable(qtype)
    path = Path(path)
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise BadInputError(f"{path}: not floating-point weights, cannot be written as GGUF: {', '.join(not_float[:6])}")
    too_deep = [k for k, t in tensors.items() if t.dim() > MAX_DIMS]
    if too_deep:
        raise BadInputError(f"{path}: GGUF tensors have at most {MAX_DIMS} dimensions: {', '.join(too_deep[:6])}")
    chosen = {k: choose_type(k, tuple(t.shape), t.dtype, qtype, rules, convs) for k, t in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch or "")
    if arch is None:  # gguf-py skips an empty string; older versions wrote it
        writer.kv_data[0].pop("general.architecture", None)
    writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        if not key.startswith(("general.", ORIG_SHAPE_KEY)) and key not in writer.kv_data[0]:
            writer.add_string(key, str(value))
    for name, t in tensors.items():
        if rows(t.shape, chosen[name]) != (tuple(t.shape) or (1,)):
            writer.add_array(ORIG_SHAPE_KEY + name, list(t.shape))
    try:
        _write(writer, tensors, chosen, read)
        writer.close()  # flushed before the rename
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {k: t.name for k, t in chosen.items()}


def _write(writer, tensors: Mapping[str, Tensor], chosen: Mapping[str, GGMLType],
           read: Callable[[str], Tensor] | None) -> None:  # fmt: skip
    """Header and tensor list first (sizes known from the shapes), then each tensor quantized as it is written."""
    import gguf
    import numpy as np

    for name, t in tensors.items():
        q = chosen[name]
        np_dtype = {"F32": np.float32, "F16": np.float16}.get(q.name, np.uint8)
        writer.add_tensor_info(name, _stored_shape(rows(t.shape, q), q), np.dtype(np_dtype), q.nbytes(t.numel()),
                               raw_dtype=gguf.GGMLQuantizationType(q.id))  # fmt: skip
    writer.write_header_to_file(writer.path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, t in tensors.items():
        data = read(name) if read is not None else t
        writer.write_tensor_data(_blocks(data.reshape(rows(t.shape, chosen[name])), chosen[name]))
