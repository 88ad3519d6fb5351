"""CLIP text encoder key layouts onto our TextEncoder (transformers ``CLIPTextModel`` names): the OpenAI /
transformers layout is taken by name, the OpenCLIP one is renamed by rules (fused q/k/v split, and the layers past
the ones built dropped: SD2 conditions on the penultimate layer)."""

from __future__ import annotations

import re

from sdcli.formats.ldm import OPENAI_TEXT, OPENCLIP_TEXT, TEXT_PREFIX
from sdcli.formats.strict import Plan, is_ignored

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
    # stable-diffusion.cpp's older SD2 GGUFs: in_proj already split (formats/gguf.py maps the rest of their names)
    (r"transformer\.resblocks\.(\d+)\.attn\.([qkv])_proj\.(weight|bias)", (r"encoder.layers.\1.self_attn.\2_proj.\3",)),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", (r"encoder.layers.\1.mlp.fc1.\2",)),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", (r"encoder.layers.\1.mlp.fc2.\2",)),
    (r"ln_final\.(weight|bias)", (r"final_layer_norm.\1",)),
)
# stable-diffusion.cpp's OpenCLIP towers (SD2's ViT-H, SDXL's bigG) in transformers names keep OpenCLIP's fused
# in_proj (its name_conversion.cpp: attn.in_proj_weight -> self_attn.in_proj.weight)
FUSED_IN_PROJ = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.in_proj\.(weight|bias)")
TRANSPOSED = "T"  # plan marker: the stored tensor is the transpose of the module's (OpenCLIP text_projection)


def _projection(name: str, layout: str):
    """The pooled output's projection, at the module's root: OpenCLIP stores P (width, proj) used as x @ P, so the
    Linear weight is its transpose (square in the real bigG: a missed transpose gives no shape error)."""
    if name == "text_projection":  # OpenCLIP's bare P; stable-diffusion.cpp keeps it so beside transformers names
        return "text_projection.weight", TRANSPOSED
    if layout == "openai" and name == "text_projection.weight":
        return name, None
    return None


def text_plan(keys: list[str], layout: str, layers: int, module_prefix: str = "transformer.",
              src: str | None = None) -> tuple[Plan, list[str]]:  # fmt: skip
    """Plan for the text encoder whose weights sit under `src` (default: SD1/SD2's place) and the keys under the
    same embedder (``cond_stage_model.``, ``conditioner.embedders.N.``) it could not place (unexpected)."""
    plan: Plan = {}
    unplaced = []
    src = src or (OPENCLIP_TEXT if layout == "openclip" else OPENAI_TEXT)
    root = src.rsplit(".", 2)[0] + "." if src.count(".") >= 2 else TEXT_PREFIX
    for k in keys:
        if not k.startswith(root) or is_ignored(k):
            continue
        name = k[len(src):] if k.startswith(src) else None
        if name is not None and (projection := _projection(name, layout)) is not None:
            plan[projection[0]] = (k, projection[1])
            continue
        if name is not None and layout == "openai":
            target = name.removeprefix("text_model.")
            if m := FUSED_IN_PROJ.fullmatch(target):  # fused q, k, v along dim 0, as OpenCLIP's in_proj
                for i, x in enumerate("qkv"):
                    plan[f"{module_prefix}encoder.layers.{m.group(1)}.self_attn.{x}_proj.{m.group(2)}"] = (k, i)
                continue
            plan[module_prefix + target] = (k, None)
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
