"""Checkpoint files: header-only inspection, family detection, layout mapping and strict loading.

Every layout is first seen through one lens, the LDM single-file key names (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.*``). A diffusers folder is mapped onto those names by the rename
table below (data: ``UNET_*_RENAMES`` / ``VAE_*_RENAMES`` crossed with ``unet_prefix_pairs`` / ``vae_prefix_pairs``), so detection and
loading never care which layout they came from. Then each part is split off by prefix, renamed to the module's
own names (identity for UNet/VAE, OpenCLIP -> CLIPTextModel for SD2), built on the meta device and loaded
strictly with ``assign=True`` straight from the memory-mapped safetensors, cast once to the run dtype.

How sd.cpp and A1111 tell variants apart: https://github.com/leejet/stable-diffusion.cpp/blob/master/model.cpp
(get_sd_version) and AUTOMATIC1111 modules/sd_models_config.py (guess_model_config_from_state_dict).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sdcli.errors import BadInputError, ModelNotFoundError, NumericalError, UnsupportedModelError
from sdcli.formats.safetensors_header import decode_header
from sdcli.models.text import TextConfig, TextEncoder
from sdcli.models.unet import UNetConfig, UNetModel
from sdcli.models.vae import AutoencoderKL, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SD1_TEXT = "cond_stage_model.transformer."  # OpenAI CLIP in transformers naming
SD2_TEXT = "cond_stage_model.model."  # OpenCLIP naming

# Known extras in real files, skipped on purpose (never loaded, never an error):
IGNORED_KEYS = [
    re.compile(r"^model_ema\."),  # EMA copies and their bookkeeping (decay, num_updates)
    re.compile(  # diffusion schedule buffers of LatentDiffusion; our schedule is computed, not loaded
        r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
        r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
        r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
        r"logvar|model_ema_decay|num_updates)$"
    ),
    re.compile(r"position_ids$"),  # a buffer, not a parameter (transformers >= 4.31 does not store it)
    re.compile(r"^cond_stage_model\.model\.(logit_scale|text_projection)$"),  # only for CLIP's pooled output
    re.compile(r"^lora_"),  # LoRA keys merged into some files' headers are not weights of this model
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read only through load_ckpt's restricted unpickler
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_MAX_HEADER = 100 * 1024 * 1024


def is_ignored(key: str) -> bool:
    return any(p.search(key) for p in IGNORED_KEYS)


# ----------------------------------------------------------------------------------------------------------
# Header reading (no tensor data)


def _sniff(head: bytes) -> str | None:
    """What a file that is not safetensors looks like, from its first bytes."""
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


def read_header(path: str | Path) -> dict:
    """The safetensors JSON header of `path` (tensor names -> dtype/shape/offsets, plus ``__metadata__``)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
            sniffed = _sniff(head)
            if sniffed is None and len(head) >= 8:
                (n,) = struct.unpack("<Q", head[:8])
                if n > min(size - 8, _MAX_HEADER):
                    sniffed = "its header length is past the end of the file (truncated or not safetensors)"
                else:
                    f.seek(8)
                    raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from e
    if sniffed is None and len(head) < 8:
        sniffed = "the file is too short to be safetensors (truncated)"
    if sniffed:
        raise BadInputError(f"{path}: not a valid safetensors file: {sniffed}")
    return decode_header(path, raw, size - 8 - n)  # every entry checked as the safetensors library does


# ----------------------------------------------------------------------------------------------------------
# Diffusers folder <-> LDM names: the rename table, as data (pairs of module-path prefixes)

# Inside a UNet ResBlock and a VAE resnet / attention block (diffusers name, LDM name).
UNET_RESNET_RENAMES = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
)  # fmt: skip
VAE_RESNET_RENAMES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                      ("conv_shortcut", "nin_shortcut"))  # fmt: skip
VAE_ATTN_RENAMES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
UNET_TOP_RENAMES = (
    ("conv_in", "input_blocks.0.0"), ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
)  # fmt: skip


def _cross(outer: tuple[str, str], inner: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    return [(f"{outer[0]}.{d}", f"{outer[1]}.{l}") for d, l in inner]


def unet_prefix_pairs(levels: int, res: int, attn: tuple[bool, ...]) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for every module of a UNet with `levels` levels of `res` ResBlocks.

    Index arithmetic of LDM: input block 0 is conv_in, then per level `res` blocks and a downsample;
    output blocks come `res + 1` per level, the upsampler sitting after the last block's attention.
    """
    pairs = list(UNET_TOP_RENAMES)
    for i in range(levels):
        for j in range(res):
            n = 1 + i * (res + 1) + j
            pairs += _cross((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0"), UNET_RESNET_RENAMES)
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (res + 1)}.0.op"))
        up_attn = attn[levels - 1 - i]  # up_blocks run from the lowest resolution
        for j in range(res + 1):
            n = i * (res + 1) + j
            pairs += _cross((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0"), UNET_RESNET_RENAMES)
            pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1"))
        n = i * (res + 1) + res
        pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n}.{2 if up_attn else 1}.conv"))
    for j in range(2):
        pairs += _cross((f"mid_block.resnets.{j}", f"middle_block.{2 * j}"), UNET_RESNET_RENAMES)
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    return pairs


def vae_prefix_pairs(levels: int, res: int) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) for the VAE; diffusers counts decoder levels from the lowest resolution."""
    pairs = [("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out")]
    pairs = [(f"{c}.{d}", f"{c}.{l}") for c in ("encoder", "decoder") for d, l in pairs]
    pairs += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for i in range(levels):
        for j in range(res):
            pairs += _cross((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"), VAE_RESNET_RENAMES)
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        for j in range(res + 1):
            pairs += _cross(
                (f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}"), VAE_RESNET_RENAMES
            )
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{levels - 1 - i}.upsample.conv"))
    for c in ("encoder", "decoder"):
        for j in range(2):
            pairs += _cross((f"{c}.mid_block.resnets.{j}", f"{c}.mid.block_{j + 1}"), VAE_RESNET_RENAMES)
        pairs += _cross((f"{c}.mid_block.attentions.0", f"{c}.mid.attn_1"), VAE_ATTN_RENAMES)
    return pairs


def rename(key: str, table: dict[str, str]) -> str | None:
    """Rename `key` by the longest prefix (at a '.' boundary) found in `table`; None when nothing matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return None


def _count(keys: list[str], pattern: str) -> int:
    """1 + the largest integer captured by `pattern` among `keys` (0 when none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def unet_table_from_diffusers(keys: list[str]) -> dict[str, str]:
    levels = _count(keys, r"down_blocks\.(\d+)\.")
    res = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    attn = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    return dict(unet_prefix_pairs(levels, res, attn))


def vae_table_from_diffusers(keys: list[str]) -> dict[str, str]:
    levels = _count(keys, r"encoder\.down_blocks\.(\d+)\.")
    return dict(vae_prefix_pairs(levels, _count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")))


def _is_vae_attn_matrix(ldm_key: str) -> bool:
    """diffusers stores the VAE mid attention q/k/v/proj_out as Linear (C, C); LDM as 1x1 conv (C, C, 1, 1)."""
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


# ----------------------------------------------------------------------------------------------------------
# Weight sources: LDM key -> where its tensor lives (single file, diffusers folder, or an in-memory .ckpt)


@dataclass(frozen=True)
class Entry:
    file: Path
    key: str  # name inside `file`
    dtype: str  # safetensors dtype string ("F16", ...)
    shape: tuple[int, ...]  # shape under its LDM name
    as_conv: bool = False  # stored (C, C) Linear, presented as (C, C, 1, 1) conv (diffusers VAE attention)


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
        e = self.entries[key]
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

    def _read(self, e: Entry) -> Tensor:
        """One float tensor read with a plain file read into its own buffer, not through a memory map: mapped
        pages count in the process's RSS until the map closes, which would add the whole file (2 GB for SD1.5)
        on top of the cast weights at the peak of a load (measured in scripts/bench.py)."""
        if e.file not in self._files:
            self._files[e.file] = (open(e.file, "rb", buffering=0), _tensor_ranges(e.file))
        f, ranges = self._files[e.file]
        start, end = ranges[e.key]
        dtype = FLOAT_DTYPES[e.dtype]
        if end == start:
            return torch.empty(e.shape, dtype=dtype)
        t = torch.empty((end - start) // dtype.itemsize, dtype=dtype)
        f.seek(start)  # read straight into the tensor's memory: no zero-filled bytearray, no second copy
        if f.readinto((ctypes.c_char * (end - start)).from_address(t.data_ptr())) != end - start:
            raise BadInputError(f"{e.file}: truncated: tensor {e.key!r} ends past the end of the file")
        return t.reshape(e.shape)

    def close(self) -> None:
        self._handles.clear()
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


def _tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor of a safetensors file (``read_header`` validates the offsets)."""
    header = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__"}  # fmt: skip


def _entries_from_header(path: Path, header: dict, prefix: str = "",
                         rename_fn: Callable[[str], str] | None = None) -> dict[str, Entry]:  # fmt: skip
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        ldm = prefix + (rename_fn(key) if rename_fn else key)
        shape = tuple(e["shape"])
        as_conv = prefix == VAE_PREFIX and rename_fn is not None and _is_vae_attn_matrix(ldm) and len(shape) == 2
        out[ldm] = Entry(path, key, e["dtype"], shape + (1, 1) if as_conv else shape, as_conv)
    return out


def _single_file_source(path: Path) -> WeightSource:
    header = read_header(path)
    return WeightSource(path, _entries_from_header(path, header), header.get("__metadata__"))


# Weight files of a diffusers folder, in order of preference (full precision first, then the fp16 variant).
DIFFUSERS_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"),
    "text_encoder": ("model.safetensors", "model.fp16.safetensors"),
}


def _component_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The safetensors file(s) of one diffusers component folder (a sharded index is followed)."""
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise BadInputError(f"{index}: unreadable shard index ({e})") from e
            return [folder / s for s in shards]
    raise BadInputError(f"{folder}: no weights found (expected {' or '.join(names)}; .bin pickles are not read)")


def _component_entries(folder: Path, component: str, prefix: str,
                       table_fn: Callable[[list[str]], dict[str, str]] | None) -> dict[str, Entry]:  # fmt: skip
    headers = [(f, read_header(f)) for f in _component_files(folder / component, DIFFUSERS_WEIGHTS[component])]
    keys = [k for _, h in headers for k in h if k != "__metadata__"]
    if table_fn is None:  # text encoder: transformers names, with or without the `text_model.` level
        rename_fn = lambda k: "text_model." + k.removeprefix("text_model.")  # noqa: E731
    else:
        table = table_fn(keys)
        rename_fn = lambda k: rename(k, table) or f"unmapped.{k}"  # noqa: E731  (reported as unexpected)
    out: dict[str, Entry] = {}
    for f, h in headers:
        out.update(_entries_from_header(f, h, prefix, rename_fn))
    return out


def _diffusers_source(folder: Path) -> WeightSource:
    entries = _component_entries(folder, "unet", UNET_PREFIX, unet_table_from_diffusers)
    entries.update(_component_entries(folder, "vae", VAE_PREFIX, vae_table_from_diffusers))
    entries.update(_component_entries(folder, "text_encoder", SD1_TEXT, None))
    hint = None
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        try:
            hint = json.loads(sched.read_text()).get("prediction_type")
        except (OSError, ValueError) as e:
            raise BadInputError(f"{sched}: unreadable scheduler config ({e})") from e
    return WeightSource(folder, entries, {}, hint, layout="diffusers")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def open_source(path: str | Path) -> WeightSource:
    """A WeightSource for a single file (.safetensors or, restricted, .ckpt) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise BadInputError(f"{path}: a folder, but not a diffusers model (no model_index.json or unet/)")
        return _diffusers_source(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror or e})") from e
    # Only a pickle extension opts in to the restricted unpickler; a pickle under any other name (say
    # .safetensors) is refused by read_header's sniffing, so renaming a file can never make us unpickle it.
    if path.suffix.lower() in PICKLE_SUFFIXES and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        state = load_ckpt(path)
        entries = {k: Entry(path, k, _dtype_name(t), tuple(t.shape)) for k, t in state.items()}
        return WeightSource(path, entries, {}, layout="ckpt", tensors=state)
    return _single_file_source(path)


def _dtype_name(t: Tensor) -> str:
    names = {v: k for k, v in FLOAT_DTYPES.items()}
    return names.get(t.dtype, str(t.dtype).removeprefix("torch.").upper())


# ----------------------------------------------------------------------------------------------------------
# Restricted .ckpt loading (pickle): weights_only, plus the one Lightning class old SD files carry


class _LightningCheckpointStub:
    """Stands in for pytorch_lightning's ModelCheckpoint callback pickled inside old SD .ckpt files.

    Unpickling it only records its state; no code of the file runs (weights_only allows nothing else).
    """

    def __setstate__(self, state: Any) -> None:
        self.state = state


_CKPT_ALLOWED = [(_LightningCheckpointStub, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def load_ckpt(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a pickled .ckpt, read with torch's weights_only unpickler (no arbitrary code)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_CKPT_ALLOWED):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=None)
    except Exception as e:  # the unpickler raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{path}: refused or unreadable pickle checkpoint ({first[:200]})") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise BadInputError(f"{path}: pickle checkpoint holds no state_dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def convert_ckpt(src: str | Path, dst: str | Path) -> Path:
    """Write the tensors of a .ckpt to a .safetensors file (restricted load; shared storage is cloned)."""
    from safetensors.torch import save_file

    state = load_ckpt(src)
    seen: set[int] = set()
    out = {}
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.contiguous().clone() if ptr in seen else t.contiguous()  # safetensors refuses shared memory
        seen.add(ptr)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        save_file(out, str(tmp), metadata={"format": "pt", "converted_from": Path(src).name})
        os.replace(tmp, dst)
    except BaseException:  # a full disk or Ctrl-C must not leave a half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    return dst


# ----------------------------------------------------------------------------------------------------------
# Detection from names and shapes only


@dataclass(frozen=True)
class ModelInfo:
    family: str  # "sd1" | "sd2" ("sdxl" is raised as UnsupportedModelError)
    prediction: str  # "eps" | "v"
    inpaint: bool
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig | None
    prediction_source: str = "family"  # override | metadata | scheduler_config | family | guess | probe
    text_layout: str | None = "openai"  # "openai" (transformers names) | "openclip" (SD2 single file)
    dtypes: dict = field(default_factory=dict)  # part -> {dtype: tensor count}
    params: dict = field(default_factory=dict)  # part -> parameter count (as stored)
    ignored_keys: int = 0  # entries skipped by IGNORED_KEYS (EMA, schedule buffers, ...)
    metadata: dict = field(default_factory=dict)  # the file's __metadata__


def _shapes(header: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def _need(shapes: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the {what}: tensor {key!r} is missing")
    return shapes[key]


def infer_unet_config(shapes: dict, family: str) -> UNetConfig:
    """UNet hyperparameters from the tensor shapes under ``model.diffusion_model.``."""
    p = UNET_PREFIX
    keys = list(shapes)
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", "UNet")
    mc = conv_in[0]
    downs = sorted(int(m.group(1)) for k in keys if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    n_in = _count(keys, re.escape(p) + r"input_blocks\.(\d+)\.")
    res = downs[0] - 1 if downs else n_in - 1
    levels = len(downs) + 1
    first = [1 + i * (res + 1) for i in range(levels)]
    mult = tuple(_need(shapes, f"{p}input_blocks.{n}.0.out_layers.3.weight", "UNet")[0] // mc for n in first)
    attn = tuple(f"{p}input_blocks.{n}.1.proj_in.weight" in shapes for n in first)
    mid = p + "middle_block.1."
    context_dim = _need(shapes, mid + "transformer_blocks.0.attn2.to_k.weight", "UNet")[1]
    depth = _count(keys, re.escape(mid) + r"transformer_blocks\.(\d+)\.")
    linear = len(_need(shapes, mid + "proj_in.weight", "UNet")) == 2
    heads = dict(num_heads=None, head_dim=64) if family == "sd2" else dict(num_heads=8, head_dim=None)
    cfg = UNetConfig(
        in_channels=conv_in[1], out_channels=_need(shapes, p + "out.2.weight", "UNet")[0], model_channels=mc,
        channel_mult=mult, num_res_blocks=res, attention_levels=attn, transformer_depth=depth,
        context_dim=context_dim, use_linear_in_transformer=linear, **heads,
    )  # fmt: skip
    for m, a in zip((*mult, mult[-1]), (*attn, True)):
        if a and cfg.heads_for(m * mc)[0] * cfg.heads_for(m * mc)[1] != m * mc:
            raise BadInputError(f"UNet transformer width {m * mc} does not split into {family} attention heads")
    return cfg


def infer_vae_config(shapes: dict, prefix: str = VAE_PREFIX) -> VAEConfig:
    """VAE hyperparameters from the tensor shapes under ``first_stage_model.``."""
    keys = list(shapes)
    conv_in = _need(shapes, prefix + "encoder.conv_in.weight", "VAE")
    ch = conv_in[0]
    levels = _count(keys, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    mult = tuple(_need(shapes, f"{prefix}encoder.down.{i}.block.0.conv2.weight", "VAE")[0] // ch for i in range(levels))
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=_need(shapes, prefix + "decoder.conv_out.weight", "VAE")[0],
        ch=ch, ch_mult=mult,
        num_res_blocks=_count(keys, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=_need(shapes, prefix + "decoder.conv_in.weight", "VAE")[1],
        embed_dim=_need(shapes, prefix + "post_quant_conv.weight", "VAE")[1],
    )  # fmt: skip


def _hf_text_prefix(shapes: dict) -> str | None:
    for prefix in (SD1_TEXT + "text_model.", SD1_TEXT):
        if prefix + "embeddings.token_embedding.weight" in shapes:
            return prefix
    return None


def infer_text_config(shapes: dict, family: str) -> tuple[TextConfig | None, str | None]:
    """(text config, layout). OpenCLIP files lose their last layer: SD2 conditions on the penultimate."""
    keys = list(shapes)
    act = "gelu" if family == "sd2" else "quick_gelu"
    if SD2_TEXT + "token_embedding.weight" in shapes:
        vocab, hidden = shapes[SD2_TEXT + "token_embedding.weight"]
        layers = _count(keys, re.escape(SD2_TEXT) + r"transformer\.resblocks\.(\d+)\.") - 1
        inter = _need(shapes, SD2_TEXT + "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        positions = _need(shapes, SD2_TEXT + "positional_embedding", "text encoder")[0]
        layout = "openclip"
    elif (p := _hf_text_prefix(shapes)) is not None:
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = _count(keys, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        inter = _need(shapes, p + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        positions = _need(shapes, p + "embeddings.position_embedding.weight", "text encoder")[0]
        layout = "openai"
    else:
        return None, None
    # Heads are not visible in shapes: both CLIP ViT-L (768/12) and OpenCLIP ViT-H (1024/16) use 64 per head.
    cfg = TextConfig(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                     num_heads=max(1, hidden // 64), intermediate_size=inter, max_positions=positions,
                     hidden_act=act)  # fmt: skip
    return cfg, layout


def _family(shapes: dict) -> str:
    keys = shapes.keys()
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in keys):
        raise UnsupportedModelError("SDXL checkpoint detected (conditioner.embedders / label_emb keys): not supported yet")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise BadInputError("no UNet weights (model.diffusion_model.*): a VAE, LoRA or text-encoder-only file?")
    proj = shapes.get(UNET_PREFIX + "middle_block.1.proj_in.weight", ())
    ctx = shapes.get(UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", (0, 0))
    if any(k.startswith(SD2_TEXT) for k in keys) or len(proj) == 2 or ctx[1] == 1024:
        return "sd2"
    return "sd1"


_PREDICTION_NAMES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}


def _prediction(family: str, inpaint: bool, header: dict, override: str | None) -> tuple[str, str]:
    """(prediction, how we know). SD2 768-v and 512-base files share every key and shape, so without a hint
    the default for SD2 is a guess that `load_models` settles with A1111's / sd.cpp's probe forward."""
    if override is not None:
        if override not in _PREDICTION_NAMES:
            raise BadInputError(f"unknown prediction type {override!r} (use eps or v)")
        return _PREDICTION_NAMES[override], "override"
    meta = header.get("__metadata__") or {}
    for key, source in (("sdcli.prediction_hint", "scheduler_config"), ("modelspec.prediction_type", "metadata")):
        if str(meta.get(key, "")).lower() in _PREDICTION_NAMES:
            return _PREDICTION_NAMES[str(meta[key]).lower()], source
    if "v_pred" in header:  # ComfyUI / sd.cpp marker tensor
        return "v", "metadata"
    if family == "sd1" or inpaint:
        return "eps", "family"  # SD1.x and the SD2 inpainting model are eps
    return "v", "guess"


def _part_of(key: str) -> str:
    for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_PREFIX)):
        if key.startswith(prefix):
            return part
    return "other"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def detect(path_or_header: str | Path | dict, prediction: str | None = None) -> ModelInfo:
    """Family, prediction type, inpainting and network shapes, from the header alone (no tensor data read)."""
    if isinstance(path_or_header, dict):
        header = path_or_header
    else:
        path = Path(path_or_header)
        header = open_source(path).header if path.is_dir() or _is_pickle(path) else read_header(path)
    shapes = _shapes(header)
    family = _family(shapes)
    unet = infer_unet_config(shapes, family)
    text, layout = infer_text_config(shapes, family)
    inpaint = unet.in_channels == 9
    pred, source = _prediction(family, inpaint, header, prediction)
    dtypes: dict[str, Counter] = {}
    params: Counter = Counter()
    ignored = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if is_ignored(k):
            ignored += 1
            continue
        part = _part_of(k)
        dtypes.setdefault(part, Counter())[v["dtype"]] += 1
        params[part] += _numel(tuple(v["shape"]))
    return ModelInfo(
        family=family, prediction=pred, inpaint=inpaint, unet=unet, vae=infer_vae_config(shapes), text=text,
        prediction_source=source, text_layout=layout, dtypes={k: dict(c) for k, c in dtypes.items()},
        params=dict(params), ignored_keys=ignored, metadata=dict(header.get("__metadata__") or {}),
    )  # fmt: skip


def _is_pickle(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


# ----------------------------------------------------------------------------------------------------------
# Part plans: module key -> (LDM key, chunk of a fused q/k/v tensor or None)

Plan = dict[str, tuple[str, int | None]]

# OpenCLIP text transformer -> transformers CLIPTextModel (names after cond_stage_model.model.).
# Upstream: diffusers single_file_utils.convert_open_clip_checkpoint; OpenCLIP open_clip/transformer.py.
OPENCLIP_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"token_embedding\.weight", ("embeddings.token_embedding.weight",)),
    (r"positional_embedding", ("embeddings.position_embedding.weight",)),
    (r"transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", (r"encoder.layers.\1.layer_norm1.\2",)),
    (r"transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", (r"encoder.layers.\1.layer_norm2.\2",)),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)",
     tuple(rf"encoder.layers.\1.self_attn.{x}_proj.\2" for x in "qkv")),  # fused q, k, v along dim 0
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", (r"encoder.layers.\1.self_attn.out_proj.\2",)),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", (r"encoder.layers.\1.mlp.fc1.\2",)),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", (r"encoder.layers.\1.mlp.fc2.\2",)),
    (r"ln_final\.(weight|bias)", (r"final_layer_norm.\1",)),
)


def _identity_plan(keys: list[str], prefix: str) -> tuple[Plan, list[str]]:
    return {k[len(prefix):]: (k, None) for k in keys if k.startswith(prefix) and not is_ignored(k)}, []


def _text_plan(keys: list[str], layout: str, layers: int, module_prefix: str) -> tuple[Plan, list[str]]:
    """Plan for the text encoder and the file keys it could not place (reported as unexpected)."""
    plan: Plan = {}
    unplaced = []
    src = SD2_TEXT if layout == "openclip" else SD1_TEXT
    for k in keys:
        if not k.startswith(TEXT_PREFIX) or is_ignored(k):
            continue
        name = k[len(src):] if k.startswith(src) else None
        if name is not None and layout == "openai":
            plan[module_prefix + name.removeprefix("text_model.")] = (k, None)
            continue
        for pattern, targets in OPENCLIP_RULES if name is not None else ():
            if m := re.fullmatch(pattern, name):
                if m.groups() and m.group(1).isdigit() and int(m.group(1)) >= layers:
                    break  # the layer SD2 drops (it conditions on the penultimate one)
                for i, t in enumerate(targets):
                    plan[module_prefix + m.expand(t)] = (k, i if len(targets) > 1 else None)
                break
        else:
            unplaced.append(k)
    return plan, unplaced


def _text_module_prefix(module: nn.Module) -> str:
    """transformers < 5.6 nests CLIPTextModel's weights under `text_model.`; newer versions do not."""
    nested = any(k.startswith("transformer.text_model.") for k in module.state_dict())
    return "transformer.text_model." if nested else "transformer."


# ----------------------------------------------------------------------------------------------------------
# Strict loading


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _planned_shape(source: WeightSource, ldm_key: str, chunk: int | None) -> tuple[int, ...]:
    shape = source.entries[ldm_key].shape
    return shape if chunk is None else (shape[0] // 3, *shape[1:])


def check_strict(part: str, source: WeightSource, plan: Plan, expected: dict[str, tuple[int, ...]],
                 unplaced: list[str]) -> None:  # fmt: skip
    """Raise BadInputError listing missing, unexpected and mis-shaped keys (file names where we have them)."""
    missing = sorted(k for k in expected if k not in plan)
    unexpected = sorted([plan[k][0] for k in plan if k not in expected] + unplaced)
    wrong = sorted(
        f"{plan[k][0]} {list(_planned_shape(source, *plan[k]))} != {list(shape)}"
        for k, shape in expected.items()
        if k in plan and _planned_shape(source, *plan[k]) != shape
    )
    problems = [f"{name}: {_listing(items)}" for name, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]  # fmt: skip
    if problems:
        raise BadInputError(f"{source.path}: {part} weights do not match the model: " + "; ".join(problems))


CAST_CHUNK = 1 << 20  # elements per cast-and-sum piece: 4 MB in fp32, still in cache when it is summed


def _cast_and_sum(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(t cast to `dtype` contiguously, its float32 sum), the sum taken piece by piece right after each piece is
    cast, while it is in cache: NaN/Inf anywhere makes the sum non-finite, without a second pass over RAM."""
    if t.device.type != "cpu" or t.numel() <= CAST_CHUNK:
        out = t.to(dtype).contiguous()
        return out, out.sum(dtype=torch.float32)
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    total = torch.zeros((), dtype=torch.float32)
    for i in range(0, dst.numel(), CAST_CHUNK):
        piece = dst[i : i + CAST_CHUNK]
        piece.copy_(src[i : i + CAST_CHUNK])
        total += piece.sum(dtype=torch.float32)
    return out, total


def _read_cast(source: WeightSource, plan: Plan, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Read every planned tensor once, move it, cast it once; check stored dtypes and finiteness."""
    state, sums = {}, []
    for name, (key, chunk) in plan.items():
        entry = source.entries[key]
        if entry.dtype not in FLOAT_DTYPES:
            raise BadInputError(f"{source.path}: tensor {key} has dtype {entry.dtype}, expected a float type")
        t = source.get(key).to(device)
        if chunk is not None:
            t = t.chunk(3, dim=0)[chunk]
        state[name], total = _cast_and_sum(t, dtype)
        sums.append(total)
    if sums:
        bad = ~torch.isfinite(torch.stack(sums))
        if bool(bad.any()):
            names = [plan[n][0] for n, b in zip(plan, bad.tolist()) if b]
            if all(bool(torch.isfinite(state[n].float()).all()) for n, b in zip(plan, bad.tolist()) if b):
                return state  # only the float32 sum overflowed; every element is finite
            raise NumericalError(f"{source.path}: NaN or Inf in the weights of {_listing(names)}")
    return state


def _check_dtypes(part: str, source: WeightSource, plan: Plan) -> None:
    """List every non-float tensor at once (load_state_dict would silently cast integers to floats)."""
    bad = sorted(f"{key} has dtype {source.entries[key].dtype}" for key, _ in plan.values()
                 if source.entries[key].dtype not in FLOAT_DTYPES)
    if bad:
        raise BadInputError(f"{source.path}: {part} tensors must be floating point (F32/F16/BF16): "
                            f"{_listing(sorted(set(bad)))}")


def load_part(part: str, module: nn.Module, source: WeightSource, plan: Plan, unplaced: list[str],
              dtype: torch.dtype, device: torch.device) -> nn.Module:  # fmt: skip
    """Strictly fill a meta-built `module` from `source` by `plan` (assign: no copy, no random init)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_strict(part, source, plan, expected, unplaced)
    _check_dtypes(part, source, plan)
    module.load_state_dict(_read_cast(source, plan, dtype, device), strict=True, assign=True)
    return module.requires_grad_(False).eval()


@dataclass
class Models:
    unet: UNetModel
    vae: AutoencoderKL
    text_encoder: TextEncoder
    info: ModelInfo
    source: Path  # the checkpoint file or diffusers folder
    name: str  # for metadata: file stem or folder name
    vae_source: Path | None = None  # the --vae override, if any


def build_unet(source: WeightSource, cfg: UNetConfig, dtype: torch.dtype, device: torch.device) -> UNetModel:
    with torch.device("meta"):
        module = UNetModel(cfg)
    plan, unplaced = _identity_plan(list(source.entries), UNET_PREFIX)
    return load_part("UNet", module, source, plan, unplaced, dtype, device)


def build_vae(source: WeightSource, cfg: VAEConfig, dtype: torch.dtype, device: torch.device) -> AutoencoderKL:
    with torch.device("meta"):
        module = AutoencoderKL(cfg)
    plan, unplaced = _identity_plan(list(source.entries), VAE_PREFIX)
    return load_part("VAE", module, source, plan, unplaced, dtype, device)


def build_text(source: WeightSource, info: ModelInfo, dtype: torch.dtype, device: torch.device) -> TextEncoder:
    if info.text is None:
        raise BadInputError(f"{source.path}: no text encoder weights (cond_stage_model.*) in this checkpoint")
    with torch.device("meta"):
        module = TextEncoder(info.text)
    plan, unplaced = _text_plan(list(source.entries), info.text_layout or "openai", info.text.num_layers,
                                _text_module_prefix(module))  # fmt: skip
    module = load_part("text encoder", module, source, plan, unplaced, dtype, device)
    module.reset_buffers()
    return module


def _check_leftovers(source: WeightSource) -> None:
    other = sorted(k for k in source.entries if _part_of(k) == "other" and not is_ignored(k))
    if other:
        raise BadInputError(f"{source.path}: unexpected tensors outside UNet/VAE/text encoder: {_listing(other)}")


@torch.no_grad()
def probe_v_prediction(unet: UNetModel) -> bool:
    """A1111's and stable-diffusion.cpp's test for SD2 768-v vs 512-base (same keys and shapes): at t=999 on
    a constant input, an eps model returns roughly the input, a v model roughly its negation."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, dtype=p.dtype, device=p.device)
    t = torch.tensor([999.0], device=p.device)
    out = (unet(x, t, context).float() - x.float()).mean().item()
    return out < -1.0


def load_models(model: str | Path, vae: str | Path | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", prediction: str | None = None) -> Models:  # fmt: skip
    """Resolve, detect and strictly load UNet, VAE and text encoder of one checkpoint."""
    path = resolve_model(str(model))
    device = torch.device(device)
    source = open_source(path)
    try:
        try:
            info = detect(source.header, prediction)
        except (BadInputError, UnsupportedModelError) as e:  # detection sees only a header: name the file
            raise type(e)(f"{path}: {e}") from None
        _check_leftovers(source)
        unet = build_unet(source, info.unet, dtype, device)
        text = build_text(source, info, dtype, device)
        vae_model = load_vae(vae, dtype, device) if vae is not None else build_vae(source, info.vae, dtype, device)
    finally:
        source.close()
    if info.prediction_source == "guess":
        pred = "v" if probe_v_prediction(unet) else "eps"
        info = ModelInfo(**{**info.__dict__, "prediction": pred, "prediction_source": "probe"})
    name = path.name if path.is_dir() else path.stem
    vae_path = Path(vae) if vae is not None else None
    return Models(unet, vae_model, text, info, path, name, vae_path)


def _vae_source(path: Path) -> WeightSource:
    """A standalone VAE under LDM names: LDM keys with or without first_stage_model., or diffusers naming."""
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        entries = _component_entries(folder.parent, folder.name, VAE_PREFIX, vae_table_from_diffusers)
        return WeightSource(path, entries, layout="diffusers")
    base = open_source(path)
    keys = list(base.entries)
    if keys and all(k.startswith("lora_") for k in keys):
        raise BadInputError(f"{path}: a LoRA, not a VAE (lora_* keys): pass it with --lora")
    if any(k.startswith(VAE_PREFIX) for k in keys):
        entries = {k: e for k, e in base.entries.items() if k.startswith(VAE_PREFIX)}
    elif any(k.startswith("encoder.down_blocks.") for k in keys):
        table = vae_table_from_diffusers(keys)
        entries = {VAE_PREFIX + (rename(k, table) or f"unmapped.{k}"): e for k, e in base.entries.items()}
        entries = {k: Entry(e.file, e.key, e.dtype, e.shape + (1, 1), True) if _is_vae_attn_matrix(k)
                   and len(e.shape) == 2 else e for k, e in entries.items()}  # fmt: skip
    else:
        # vae-ft-mse style file; training leftovers (LPIPS "loss.*", EMA counters) are not VAE weights
        entries = {VAE_PREFIX + k: e for k, e in base.entries.items() if not (is_ignored(k) or k.startswith("loss."))}
    return WeightSource(path, entries, base.metadata, layout=base.layout, tensors=base._tensors)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A standalone VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers vae folder."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such VAE file or folder")
    source = _vae_source(path)
    try:
        cfg = infer_vae_config(_shapes(source.header))
        return build_vae(source, cfg, dtype, torch.device(device))
    except BadInputError as e:  # shape inference sees only names: say which file they came from
        raise e if str(path) in str(e) else BadInputError(f"{path}: {e}") from None
    finally:
        source.close()


# ----------------------------------------------------------------------------------------------------------
# Model ids and hashes

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a diffusers repo must give us (safetensors only; fp32 files, which all SD1/SD2 repos carry).
HUB_PATTERNS = [
    "model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
]  # fmt: skip


def resolve_model(model: str | Path) -> Path:
    """A local file/folder, or a hub id (``owner/name``) fetched into / found in the HF cache."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if not _HUB_ID.match(text) or text.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        raise ModelNotFoundError(f"{text}: no such file or folder (pass a .safetensors file, a diffusers folder "
                                 "or a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5)")  # fmt: skip
    return _hub_snapshot(text)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # comes with transformers, but be explicit if it is gone
        raise ModelNotFoundError(f"{repo_id}: huggingface_hub is not installed; pass a local path instead") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as e:  # offline/cold cache, network, gated or missing repo: one clear message
        why = "offline (HF_HUB_OFFLINE=1) and not in the HF cache" if offline else _first_sentence(e)
        raise ModelNotFoundError(
            f"{repo_id}: could not get the model ({why}); download it when online, or pass a local "
            ".safetensors file or diffusers folder with --model PATH"
        ) from e
    if not (folder / "unet").is_dir():
        raise ModelNotFoundError(f"{repo_id}: the hub snapshot at {folder} has no unet/ safetensors weights")
    return folder


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _first_sentence(e: Exception, limit: int = 160) -> str:
    """`Type: first line of the message`, cut at a word boundary: hub errors are long and multi-line."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a whole file, read in 8 MiB chunks. Cached per (path, size, mtime) in memory and in
    $XDG_CACHE_HOME/sdcli/sha256.json, so a shell loop of renders hashes a 2 GB checkpoint once, not per run."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        disk = _read_hash_cache()
        known = disk.get(_cache_key(key))
        if known is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            known = h.hexdigest()
            _write_hash_cache({**disk, _cache_key(key): known})
        _SHA_CACHE[key] = known
    return _SHA_CACHE[key]


def _hash_cache_path() -> Path | None:
    from .config import xdg_path

    return xdg_path("XDG_CACHE_HOME", ".cache", "sdcli", "sha256.json")  # None: no home, so no cache


def _cache_key(key: tuple[str, int, int]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CACHE_KEY = re.compile(r".+\|[0-9]+\|-?[0-9]+")
_MAX_HASH_CACHE = 16 << 20  # bytes; ~100k entries


def _read_hash_cache() -> dict[str, str]:
    """The well-formed entries of the disk cache: anything else (not a regular file, too big, not JSON, a value
    that is not 64 lowercase hex digits) is dropped, so a damaged cache is rebuilt, never believed."""
    path = _hash_cache_path()
    try:
        if path is None or not path.is_file() or path.stat().st_size > _MAX_HASH_CACHE:  # a FIFO would block the read
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}  # no cache yet, or a damaged one: hashing again is always correct
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and _SHA256_HEX.fullmatch(v)
            and _CACHE_KEY.fullmatch(k)}  # fmt: skip


def _write_hash_cache(data: dict[str, str]) -> None:
    """Best effort, atomic: a read-only home or a full disk only costs the next run a re-hash."""
    path = _hash_cache_path()
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
