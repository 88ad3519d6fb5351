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
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", (r"encoder.layers.\1.mlp.fc1.\2",)),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", (r"encoder.layers.\1.mlp.fc2.\2",)),
    (r"ln_final\.(weight|bias)", (r"final_layer_norm.\1",)),
)


def text_plan(keys: list[str], layout: str, layers: int, module_prefix: str = "transformer.") -> tuple[Plan, list[str]]:
    """Plan for the text encoder and the file keys it could not place (reported as unexpected)."""
    plan: Plan = {}
    unplaced = []
    src = OPENCLIP_TEXT if layout == "openclip" else OPENAI_TEXT
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
