"""Which type each tensor gets when a checkpoint is written as GGUF, and the writer (``sdcli convert --quantize``).

The rules follow stable-diffusion.cpp's ``ModelLoader::tensor_should_be_converted`` (src/model_loader.cpp) and
city96's ``tools/convert.py`` (ComfyUI-GGUF): only matrices and conv kernels are quantized; biases, norms and
other 1-d or small tensors, the embedders and input/output layers sd.cpp keeps (Flux ``img_in``/``final_layer``,
MMDiT ``x_embedder``/``pos_embed``, UNet ``time_embed``/``label_emb``, anything named ``embedding``) and any
tensor whose innermost dimension is not a whole number of blocks (a UNet's 3x3 convs) stay float; the VAE is never
quantized. User rules come first, in sd.cpp's ``--tensor-type-rules`` syntax: ``REGEX=TYPE`` pairs separated by
commas, the first whose regex is found in the name wins (``^first_stage_model\\.=f16,attn=q8_0``); the keep-float
checks still apply after a rule, as in sd.cpp.

Writing uses the gguf package (the optional extra ``sdcli[gguf]``): ``gguf.quants.quantize`` makes the blocks,
``gguf.GGUFWriter`` the file, one tensor in memory at a time. gguf.quants quantizes F32, F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1 and Q8_0; K-quants need llama.cpp's ``llama-quantize`` (or stable-diffusion.cpp's ``convert``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError, OutputError, UsageError
from sdcli.quant.ggml_types import BY_NAME, GGMLType, ggml_type

WRITABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # what gguf.quants.quantize makes
SMALL = 1024  # tensors of at most this many elements stay float (city96's QUANTIZATION_THRESHOLD)
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
            raise UsageError(f"tensor type rule {item!r} is not REGEX=TYPE")
        if name.upper() not in WRITABLE:
            raise UsageError(f"tensor type rule {item!r}: type {name!r} cannot be written (use one of "
                             f"{', '.join(t.lower() for t in WRITABLE)})")  # fmt: skip
        try:
            rules.append(TypeRule(re.compile(pattern), BY_NAME[name.upper()]))
        except re.error as e:
            raise UsageError(f"tensor type rule {item!r}: bad regex ({e})") from None
    return rules


def _float_type(shape: Sequence[int], dtype: torch.dtype) -> GGMLType:
    """What a kept tensor is written as: 1-d and small ones F32 (city96), the rest F16, or BF16 from bf16."""
    if len(shape) < 2 or math.prod(shape) <= SMALL:
        return BY_NAME["F32"]
    return BY_NAME["BF16" if dtype == torch.bfloat16 else "F16"]


def choose_type(name: str, shape: Sequence[int], dtype: torch.dtype, qtype: GGMLType | str,
                rules: Sequence[TypeRule] = ()) -> GGMLType:  # fmt: skip
    """The type tensor `name` (of `shape`, stored as `dtype`) is written as, asked for `qtype` overall."""
    kept = _float_type(shape, dtype)
    if name.startswith(VAE_PREFIXES):
        return kept
    want = next((r.qtype for r in rules if r.pattern.search(name)), ggml_type(qtype))
    if want.is_float:
        return BY_NAME["F32"] if kept.name == "F32" else want
    if len(shape) < 2 or math.prod(shape) <= SMALL or shape[-1] % want.block_size or KEEP_FLOAT.search(name):
        return kept
    return want


def _blocks(t: Tensor, qtype: GGMLType):
    """The numpy array GGUFWriter takes for `t` as `qtype` (float32 or float16 values, or uint8 blocks)."""
    import gguf

    data = t.detach().to("cpu", torch.float32).numpy()
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType(qtype.id))


def _stored_shape(shape: Sequence[int], qtype: GGMLType) -> tuple[int, ...]:
    """The numpy shape _blocks returns: the tensor's, or its rows as bytes for block types (and BF16)."""
    shape = tuple(shape) or (1,)
    if qtype.name in ("F32", "F16"):
        return shape
    return (*shape[:-1], shape[-1] // qtype.block_size * qtype.type_size)


def write_gguf(path: str | Path, tensors: Mapping[str, Tensor], qtype: GGMLType | str, arch: str | None = None,
               rules: Sequence[TypeRule] = ()) -> dict[str, str]:  # fmt: skip
    """Write `tensors` (names kept) as a GGUF file, each as ``choose_type`` says; `arch` becomes
    ``general.architecture`` (city96's convention; None writes none, as stable-diffusion.cpp). The file appears
    whole or not at all (written aside, then renamed). Returns name -> the type name written."""
    import gguf

    qtype = ggml_type(qtype)
    if qtype.name not in WRITABLE:
        raise UsageError(f"cannot write {qtype.name} GGUF files (gguf.quants makes {', '.join(WRITABLE)})")
    path = Path(path)
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise BadInputError(f"{path}: not floating-point weights, cannot be written as GGUF: {', '.join(not_float[:6])}")
    chosen = {k: choose_type(k, tuple(t.shape), t.dtype, qtype, rules) for k, t in tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch or "")
    if arch is None:  # gguf-py skips an empty string; older versions wrote it
        writer.kv_data[0].pop("general.architecture", None)
    writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    try:
        _write(writer, tensors, chosen)
        writer.close()  # flushed before the rename
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return {k: t.name for k, t in chosen.items()}


def _write(writer, tensors: Mapping[str, Tensor], chosen: Mapping[str, GGMLType]) -> None:
    """Header and tensor list first (sizes known from the shapes), then each tensor quantized as it is written."""
    import gguf
    import numpy as np

    for name, t in tensors.items():
        q = chosen[name]
        np_dtype = {"F32": np.float32, "F16": np.float16}.get(q.name, np.uint8)
        writer.add_tensor_info(name, _stored_shape(t.shape, q), np.dtype(np_dtype), q.nbytes(t.numel()),
                               raw_dtype=gguf.GGMLQuantizationType(q.id))  # fmt: skip
    writer.write_header_to_file(writer.path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, t in tensors.items():
        writer.write_tensor_data(_blocks(t.reshape(_stored_shape(t.shape, BY_NAME["F32"])), chosen[name]))
