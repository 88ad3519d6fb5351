"""FLUX.1 DiT module layouts: Black Forest Labs' names (our FluxModel's, models/flux.py) <-> diffusers'
``FluxTransformer2DModel`` names, for the weight-bearing Linear modules, as rules.

Three things are not renames. The fused ``qkv`` of a double block's stream is three diffusers Linears (rows split
in q, k, v order); a single block's ``linear1`` is four (q, k, v, then the MLP input ``proj_mlp``: rows hidden,
hidden, hidden, mlp); the final layer's modulation stores (shift, scale) where diffusers stores (scale, shift), so
its two row halves swap. `pieces` says, for each diffusers module, which rows of ours it is.
Upstream: diffusers ``loaders/single_file_utils.py`` convert_flux_transformer_checkpoint_to_diffusers, and the
reverse in ``loaders/lora_conversion_utils.py`` (_convert_kohya_flux_lora_to_diffusers).
"""

from __future__ import annotations

import re

QKV = "qkv"  # three equal row blocks: q, k, v
QKV_MLP = "qkv_mlp"  # linear1: q, k, v (hidden rows each), then the MLP input (the rest)
SWAP = "swap"  # (shift, scale) <-> (scale, shift)

_D, _S = r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."
_TD, _TS = r"transformer_blocks.\1.", r"single_transformer_blocks.\1."
# (BFL module pattern, diffusers module template(s), op)
RULES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    (r"img_in", ("x_embedder",), None),
    (r"txt_in", ("context_embedder",), None),
    (r"time_in\.in_layer", ("time_text_embed.timestep_embedder.linear_1",), None),
    (r"time_in\.out_layer", ("time_text_embed.timestep_embedder.linear_2",), None),
    (r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",), None),
    (r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",), None),
    (r"guidance_in\.in_layer", ("time_text_embed.guidance_embedder.linear_1",), None),
    (r"guidance_in\.out_layer", ("time_text_embed.guidance_embedder.linear_2",), None),
    (r"final_layer\.linear", ("proj_out",), None),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), SWAP),
    (_D + r"img_mod\.lin", (_TD + "norm1.linear",), None),  # (shift, scale, gate) x 2 in both
    (_D + r"txt_mod\.lin", (_TD + "norm1_context.linear",), None),
    (_D + r"img_attn\.qkv", tuple(_TD + f"attn.to_{x}" for x in "qkv"), QKV),
    (_D + r"txt_attn\.qkv", tuple(_TD + f"attn.add_{x}_proj" for x in "qkv"), QKV),
    (_D + r"img_attn\.proj", (_TD + "attn.to_out.0",), None),
    (_D + r"txt_attn\.proj", (_TD + "attn.to_add_out",), None),
    (_D + r"img_mlp\.0", (_TD + "ff.net.0.proj",), None),
    (_D + r"img_mlp\.2", (_TD + "ff.net.2",), None),
    (_D + r"txt_mlp\.0", (_TD + "ff_context.net.0.proj",), None),
    (_D + r"txt_mlp\.2", (_TD + "ff_context.net.2",), None),
    (_S + r"linear1", tuple(_TS + x for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), QKV_MLP),
    (_S + r"linear2", (_TS + "proj_out",), None),
    (_S + r"modulation\.lin", (_TS + "norm.linear",), None),
)

Pieces = tuple[tuple[int, int, int], ...]  # (row in the diffusers weight, row in ours, count)


def row_splits(op: str | None, out_features: int, in_features: int) -> list[Pieces]:
    """For each diffusers module of an `op` rule (in template order), which rows of our (out, in) weight it is."""
    if op == QKV:
        n = out_features // 3
        return [((0, i * n, n),) for i in range(3)]
    if op == QKV_MLP:  # q, k, v are hidden (= in_features) rows each, the MLP input the rest
        h = in_features
        return [((0, 0, h),), ((0, h, h),), ((0, 2 * h, h),), ((0, 3 * h, out_features - 3 * h),)]
    if op == SWAP:  # their first half (scale) is our second, and the reverse
        half = out_features // 2
        return [((0, half, half), (half, 0, half))]
    return [((0, 0, out_features),)]


def diffusers_modules(name: str, out_features: int, in_features: int) -> list[tuple[str, Pieces]]:
    """(diffusers module name, the rows of ours it holds) for one of our FluxModel module names; [] if it has no
    diffusers counterpart (a norm, an activation)."""
    for pattern, templates, op in RULES:
        if m := re.fullmatch(pattern, name):
            splits = row_splits(op, out_features, in_features)
            return [(m.expand(t), rows) for t, rows in zip(templates, splits)]
    return []
