"""Where each module named in a LoRA file lands among sdcli's modules, for the diffusion transformers (SD3/SD3.5's
MMDiT, the FLUX.1 DiT) and their text encoders, in every key format people have:

- kohya sd-scripts (networks/lora_flux.py, lora_sd3.py): ``lora_unet_`` + our module path with '.' -> '_'
  (``lora_unet_double_blocks_0_img_attn_qkv``), ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, ``lora_te3_`` T5;
  ComfyUI's own files spell the same modules ``diffusion_model.double_blocks.0.img_attn.qkv``.
- diffusers / PEFT and AI-toolkit: diffusers module names under ``transformer.`` (``transformer.transformer_blocks.
  0.attn.to_q``), ``text_encoder.`` (CLIP-L) and ``text_encoder_2.`` (SD3's CLIP-G), with ``lora_A`` / ``lora_B``;
  the "mixture" files spell them ``lora_transformer_transformer_blocks_0_attn_to_q``. diffusers splits what BFL and
  Stability fuse: its to_q / to_k / to_v are row blocks of our ``qkv``, a Flux single block's to_q / to_k / to_v /
  proj_mlp row blocks of ``linear1``, and the final modulations keep their halves swapped. Such a key is a `Slot`
  with `rows`: the LoRA's update goes into those rows of our weight, exactly.
- XLabs (Flux double blocks): ``double_blocks.0.processor.qkv_lora1`` (image qkv), ``qkv_lora2`` (text),
  ``proj_lora1`` / ``proj_lora2``; a single block's ``qkv_lora`` adds to the q, k, v rows of ``linear1``. (Its
  single-block ``proj_lora`` adapts only the attention columns of ``linear2``: not mapped, it counts as unmatched.)
Layout rules: formats/flux_layouts.py and formats/sd3_layouts.py. Upstream: diffusers loaders/lora_conversion_utils.py
(_convert_kohya_flux_lora_to_diffusers, _convert_xlabs_flux_lora_to_diffusers), ComfyUI comfy/lora.py
(model_lora_keys_unet: the same names for the same modules).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from torch import nn

from sdcli.formats import sd3_layouts
from sdcli.formats.flux_layouts import QKV, SWAP, Pieces, diffusers_modules, row_splits
from sdcli.models.flux import FluxModel
from sdcli.models.t5 import T5Encoder

# file suffix -> the kohya part name the rest of loading/lora.py reads
SUFFIXES = (("lora_down.weight", "lora_down.weight"), ("lora_up.weight", "lora_up.weight"), ("alpha", "alpha"),
            ("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight"))  # fmt: skip
XLABS_SUFFIXES = (("down.weight", "lora_down.weight"), ("up.weight", "lora_up.weight"))
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' save_lora_weights: the LoraConfig of each part, as JSON


@dataclass(frozen=True)
class Slot:
    """One adapted weight: the module, and the rows of its weight a LoRA key updates (None: all of them)."""

    module: nn.Module
    rows: Pieces | None = None  # (row of the LoRA's update, row of the weight, count) per block


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, kohya part) of a LoRA file key, or None when its suffix is no LoRA part we read."""
    for suffix, part in SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    if ".processor." in key:  # XLabs: double_blocks.0.processor.qkv_lora1.down.weight
        for suffix, part in XLABS_SUFFIXES:
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], part
    return None


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    return tuple(getattr(module, "weight_shape", None) or module.weight.shape)


def _slot(module: nn.Module, rows: Pieces) -> Slot:
    whole = rows == ((0, 0, _weight_shape(module)[0]),)
    return Slot(module, None if whole else rows)


def _diffusers_names(net: nn.Module, name: str, module: nn.Module) -> list[tuple[str, Pieces]]:
    """(diffusers module name, rows) of one of our DiT modules."""
    out_f, in_f = _weight_shape(module)[:2]
    if isinstance(net, FluxModel):
        return diffusers_modules(name, out_f, in_f)
    names, op = sd3_layouts.diffusers_names(name + ".weight", len(net.joint_blocks))
    ours = {sd3_layouts.QKV: QKV, sd3_layouts.SWAP: SWAP}.get(op)
    return [(n.removesuffix(".weight"), rows) for n, rows in zip(names, row_splits(ours, out_f, in_f))]


def denoiser_slots(net: nn.Module) -> dict[str, Slot]:
    """Every spelling of every adapted module of an MMDiT or a Flux DiT (meta-device skeletons do: names and
    shapes are all that is read)."""
    out: dict[str, Slot] = {}
    for name, module in net.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        out["lora_unet_" + name.replace(".", "_")] = out["diffusion_model." + name] = Slot(module)
        for dname, rows in _diffusers_names(net, name, module):
            slot = _slot(module, rows)
            for spelled in ("transformer." + dname, dname, "lora_transformer_" + dname.replace(".", "_")):
                out[spelled] = slot
    if isinstance(net, FluxModel):
        out.update(_xlabs_slots(net))
    return out


def _xlabs_slots(net: FluxModel) -> dict[str, Slot]:
    out: dict[str, Slot] = {}
    for i, block in enumerate(net.double_blocks):
        for n, attn in (("1", block.img_attn), ("2", block.txt_attn)):
            out[f"double_blocks.{i}.processor.qkv_lora{n}"] = Slot(attn.qkv)
            out[f"double_blocks.{i}.processor.proj_lora{n}"] = Slot(attn.proj)
    for i, block in enumerate(net.single_blocks):
        hidden = _weight_shape(block.linear1)[1]
        out[f"single_blocks.{i}.processor.qkv_lora"] = Slot(block.linear1, ((0, 0, 3 * hidden),))
    return out | {"diffusion_model." + k: v for k, v in out.items()}


def text_slots(encoders: tuple, transformer_family: bool) -> dict[str, Slot]:
    """The text encoders' spellings: kohya ``lora_te_`` (one encoder) or ``lora_te{n}_`` (several: CLIP-L 1,
    CLIP-G 2; T5 is always ``lora_te3_``, as sd-scripts numbers it for FLUX and SD3 alike), and for the transformer
    families diffusers' ``text_encoder.`` / ``text_encoder_2.`` (with or without transformers' ``text_model.``).
    A CLIP-L alone beside T5 (FLUX) answers to ``lora_te_`` too, as diffusers reads FLUX files."""
    out: dict[str, Slot] = {}
    clips = [e for e in encoders if e is not None and not isinstance(e, T5Encoder)]
    for n, encoder in enumerate(encoders):
        if encoder is None:
            continue
        if isinstance(encoder, T5Encoder):
            for name, module in encoder.named_modules():
                if isinstance(module, nn.Linear):
                    out["lora_te3_" + name.replace(".", "_")] = Slot(module)
            continue
        kohya = ["lora_te_"] if len(encoders) == 1 else [f"lora_te{n + 1}_"] + (["lora_te_"] if len(clips) == 1 else [])
        peft = ("text_encoder" if n == 0 else f"text_encoder_{n + 1}") + "."
        for name, module in encoder.transformer.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                for prefix in kohya:
                    out[prefix + "text_model_" + name.replace(".", "_")] = Slot(module)
                if transformer_family:
                    out[peft + "text_model." + name] = out[peft + name] = Slot(module)
    return out


def is_text_key(base: str) -> bool:
    return base.startswith(("lora_te", "text_encoder"))


def peft_alphas(metadata: dict | None, bases) -> dict[str, float]:
    """{module name: alpha} from diffusers' ``lora_adapter_metadata`` (each part's LoraConfig under its prefix:
    ``transformer.lora_alpha``, ``transformer.alpha_pattern``, ``transformer.use_rslora``), for the modules it
    covers. PEFT scales by lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA); we scale by alpha / rank, so an
    rsLoRA alpha is given as lora_alpha * sqrt(r). r itself is each module's rank, read from its shape."""
    raw = (metadata or {}).get(PEFT_METADATA)
    if not raw:
        return {}
    config = json.loads(raw)
    out: dict[str, float] = {}
    for base, rank in bases:
        prefix, _, name = base.partition(".")
        alpha = config.get(f"{prefix}.lora_alpha")
        if alpha is None:
            continue
        for pattern, value in (config.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", name):  # PEFT's match: the pattern ends the module name
                alpha = value
                break
        out[base] = float(alpha) * (math.sqrt(rank) if config.get(f"{prefix}.use_rslora") else 1.0)
    return out
