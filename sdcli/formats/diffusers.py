"""Diffusers folders seen as LDM names: the rename table, as data (pairs of module-path prefixes), and the
component folders a diffusers model is made of.

``UNET_*_RENAMES`` / ``VAE_*_RENAMES`` crossed with ``unet_prefix_pairs`` / ``vae_prefix_pairs`` give every
(diffusers prefix, LDM prefix) pair; ``rename`` maps a key by its longest known prefix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from sdcli.runtime.errors import BadInputError
from sdcli.formats.dit_folders import dit_folder_entries, is_dit_folder
from sdcli.formats.folders import component_files, read_json_object
from sdcli.formats.ldm import OPENAI_TEXT, UNET_PREFIX, VAE_PREFIX
from sdcli.formats.safetensors import read_header
from sdcli.formats.source import Entry, WeightSource, entries_from_header, is_diffusers_folder, open_file
from sdcli.formats.strict import is_ignored

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
    ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),  # SDXL's vector y
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


def count(keys: list[str], pattern: str) -> int:
    """1 + the largest integer captured by `pattern` among `keys` (0 when none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def unet_table_from_diffusers(keys: list[str]) -> dict[str, str]:
    levels = count(keys, r"down_blocks\.(\d+)\.")
    res = count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    attn = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    return dict(unet_prefix_pairs(levels, res, attn))


def vae_table_from_diffusers(keys: list[str]) -> dict[str, str]:
    levels = count(keys, r"encoder\.down_blocks\.(\d+)\.")
    return dict(vae_prefix_pairs(levels, count(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")))


def is_vae_attn_matrix(ldm_key: str) -> bool:
    """diffusers stores the VAE mid attention q/k/v/proj_out as Linear (C, C); LDM as 1x1 conv (C, C, 1, 1)."""
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


def _text_rename(key: str) -> str:
    """transformers names, with or without the `text_model.` level (CLIPTextModelWithProjection's
    text_projection sits beside it)."""
    return key if key == "text_projection.weight" else "text_model." + key.removeprefix("text_model.")


REQUIRED = ("unet", "vae")  # what every diffusers model has, with at least one text encoder
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
# SDXL folders: the text encoders go where an sgm single file has them (in transformers names, under
# ``.transformer.``), so the family registry sees one layout: CLIP-L and bigG, or the refiner's bigG alone.
SGM_TEXT = {("text_encoder", "text_encoder_2"): ("conditioner.embedders.0.transformer.",
                                                  "conditioner.embedders.1.transformer."),
            ("text_encoder_2",): ("conditioner.embedders.0.transformer.",)}

# Component folder -> (LDM prefix, rename table builder or None for the text encoder's own names, weight files in
# order of preference: full precision first, then the fp16 variant). A folder is read for every component it has.
COMPONENTS: dict[str, tuple[str, Callable[[list[str]], dict[str, str]] | None, tuple[str, ...]]] = {
    "unet": (UNET_PREFIX, unet_table_from_diffusers,
             ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    "vae": (VAE_PREFIX, vae_table_from_diffusers,
            ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    "text_encoder": (OPENAI_TEXT, None, ("model.safetensors", "model.fp16.safetensors")),
    "text_encoder_2": (OPENAI_TEXT, None, ("model.safetensors", "model.fp16.safetensors")),
}


def component_entries(directory: Path, component: str, prefix: str | None = None) -> dict[str, Entry]:
    """The LDM-named entries of one component folder (``unet/``, ``vae/``, ``text_encoder/`` of a diffusers model,
    or a standalone VAE folder), read as `component` (under `prefix` instead of the component's own)."""
    own, table_fn, names = COMPONENTS[component]
    prefix = prefix or own
    headers = [(f, read_header(f)) for f in component_files(directory, names)]
    keys = [k for _, h in headers for k in h if k != "__metadata__"]
    if table_fn is None:
        rename_fn = _text_rename
    else:
        table = table_fn(keys)
        rename_fn = lambda k: rename(k, table) or f"unmapped.{k}"  # noqa: E731  (reported as unexpected)
    out: dict[str, Entry] = {}
    for f, h in headers:
        out.update(entries_from_header(f, h, prefix, rename_fn, as_conv=is_vae_attn_matrix if prefix == VAE_PREFIX else None))
    return out


def diffusers_source(folder: Path) -> WeightSource:
    """Every known component the folder holds (unet, vae, text_encoder at least), and the scheduler's prediction type as a hint."""
    entries: dict[str, Entry] = {}
    if is_dit_folder(folder):  # SD3 / FLUX.1: transformer/ and text encoders in their single files' names
        entries.update(dit_folder_entries(folder))
        if (folder / "vae").is_dir():
            entries.update(component_entries(folder / "vae", "vae"))
    else:
        texts = tuple(c for c in TEXT_COMPONENTS if (folder / c).is_dir()) or ("text_encoder",)
        text_prefixes = dict(zip(texts, SGM_TEXT.get(texts, (OPENAI_TEXT,))))
        for component in COMPONENTS:
            if component in REQUIRED or component in texts or (folder / component).is_dir():
                entries.update(component_entries(folder / component, component, text_prefixes.get(component)))
    hint = None
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        hint = read_json_object(sched, "scheduler config").get("prediction_type")
        if hint is not None and not isinstance(hint, str):
            raise BadInputError(f"{sched}: 'prediction_type' must be text, got {type(hint).__name__}")
    return WeightSource(folder, entries, {}, hint, layout="diffusers")


def standalone_vae_source(path: Path) -> WeightSource:
    """A standalone VAE under LDM names: LDM keys with or without first_stage_model., or diffusers naming."""
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        entries = component_entries(folder, "vae")
        return WeightSource(path, entries, layout="diffusers")
    base = open_file(path)
    keys = list(base.entries)
    if keys and all(k.startswith("lora_") for k in keys):
        raise BadInputError(f"{path}: a LoRA, not a VAE (lora_* keys): pass it with --lora")
    if any(k.startswith(VAE_PREFIX) for k in keys):
        entries = {k: e for k, e in base.entries.items() if k.startswith(VAE_PREFIX)}
    elif any(k.startswith("encoder.down_blocks.") for k in keys):
        table = vae_table_from_diffusers(keys)
        entries = {VAE_PREFIX + (rename(k, table) or f"unmapped.{k}"): e for k, e in base.entries.items()}
        entries = {k: Entry(e.file, e.key, e.dtype, e.shape + (1, 1), True) if is_vae_attn_matrix(k)
                   and len(e.shape) == 2 else e for k, e in entries.items()}  # fmt: skip
    else:
        # vae-ft-mse style file; training leftovers (LPIPS "loss.*", EMA counters) are not VAE weights
        entries = {VAE_PREFIX + k: e for k, e in base.entries.items() if not (is_ignored(k) or k.startswith("loss."))}
    return WeightSource(path, entries, base.metadata, layout=base.layout, tensors=base._tensors)


def open_source(path: str | Path) -> WeightSource:
    """A WeightSource for a single file (.safetensors or, restricted, .ckpt) or a diffusers folder."""
    path = Path(path)
    if not path.is_dir():
        return open_file(path)
    if not is_diffusers_folder(path):
        raise BadInputError(f"{path}: a folder, but not a diffusers model (no model_index.json, unet/ or "
                            "transformer/)")
    return diffusers_source(path)
