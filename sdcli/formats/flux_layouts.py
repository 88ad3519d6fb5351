"""FLUX.1 DiT key layouts: Black Forest Labs' file names (our FluxModel's, after ``model.diffusion_model.``) <->
diffusers' ``FluxTransformer2DModel`` names (the ``transformer/`` folder of a diffusers repository, and the
module names of diffusers/PEFT LoRA files), as rules in the form of sd3_layouts.RULES.

Not renames: each fused ``qkv`` is three diffusers matrices, a single block's ``linear1`` four (q, k, v, then the
MLP input ``proj_mlp``), concatenated along dim 0 in that order; the final layer stores (shift, scale) where
diffusers stores (scale, shift). The q/k RMS norms are ``...norm.scale`` in BFL files, ``...norm_q.weight`` in
diffusers. `row_splits` says, for each diffusers module, which rows of ours it is (what a LoRA of that module
updates).
Upstream: diffusers ``loaders/single_file_utils.py`` convert_flux_transformer_checkpoint_to_diffusers (it assumes
width 3072; these rules read every size from the tensors), and the reverse in ``loaders/lora_conversion_utils.py``.
"""

from __future__ import annotations

import re

from torch import Tensor

from sdcli.formats.sd3_layouts import QKV, SWAP, swap_halves

_D, _S = r"double_blocks\.(\d+)\.", r"single_blocks\.(\d+)\."
_TD, _TS = r"transformer_blocks.\1.", r"single_transformer_blocks.\1."
# (BFL name pattern, diffusers name template(s), op); the final (weight|bias) group is appended to each.
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
    (_D + r"img_mod\.lin", (_TD + "norm1.linear",), None),  # (shift, scale, gate) x 2: the same order in both
    (_D + r"txt_mod\.lin", (_TD + "norm1_context.linear",), None),
    (_D + r"img_attn\.qkv", tuple(_TD + f"attn.to_{x}" for x in "qkv"), QKV),
    (_D + r"txt_attn\.qkv", tuple(_TD + f"attn.add_{x}_proj" for x in "qkv"), QKV),
    (_D + r"img_attn\.proj", (_TD + "attn.to_out.0",), None),
    (_D + r"txt_attn\.proj", (_TD + "attn.to_add_out",), None),
    (_D + r"img_mlp\.0", (_TD + "ff.net.0.proj",), None),
    (_D + r"img_mlp\.2", (_TD + "ff.net.2",), None),
    (_D + r"txt_mlp\.0", (_TD + "ff_context.net.0.proj",), None),
    (_D + r"txt_mlp\.2", (_TD + "ff_context.net.2",), None),
    (_S + r"modulation\.lin", (_TS + "norm.linear",), None),
    (_S + r"linear1", tuple(_TS + x for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")), QKV),
    (_S + r"linear2", (_TS + "proj_out",), None),
)
# RMS norm scales: (BFL name without ".scale", diffusers name without ".weight")
NORMS: tuple[tuple[str, str], ...] = (
    (_D + r"img_attn\.norm\.query_norm", _TD + "attn.norm_q"),
    (_D + r"img_attn\.norm\.key_norm", _TD + "attn.norm_k"),
    (_D + r"txt_attn\.norm\.query_norm", _TD + "attn.norm_added_q"),
    (_D + r"txt_attn\.norm\.key_norm", _TD + "attn.norm_added_k"),
    (_S + r"norm\.query_norm", _TS + "attn.norm_q"),
    (_S + r"norm\.key_norm", _TS + "attn.norm_k"),
)


def diffusers_names(key: str, depth: int = 0) -> tuple[tuple[str, ...], str | None]:
    """(diffusers name(s), op) of one BFL Flux key (without ``model.diffusion_model.``); KeyError if none.
    `depth` is unused (sd3_layouts.diffusers_names' signature: formats/dit_folders.py calls either)."""
    for pattern, template in NORMS:
        if m := re.fullmatch(pattern + r"\.scale", key):
            return (m.expand(template) + ".weight",), None
    for pattern, templates, op in RULES:
        if m := re.fullmatch(pattern + r"\.(weight|bias)", key):
            return tuple(m.expand(t) + "." + m.groups()[-1] for t in templates), op
    raise KeyError(f"no diffusers name for the FLUX key {key!r}")


def to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL-layout Flux weights -> diffusers FluxTransformer2DModel weights. A fused qkv is split in three equal
    parts; a single block's linear1 in q, k, v of the hidden width (linear2's output rows), then the MLP input."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        names, op = diffusers_names(key)
        if op == QKV and len(names) == 4:
            hidden = state[re.sub(r"linear1\.(weight|bias)$", "linear2.weight", key)].shape[0]
            parts = tensor.split([hidden] * 3 + [tensor.shape[0] - 3 * hidden])
        elif op == QKV:
            parts = tensor.chunk(3, dim=0)
        else:
            parts = (swap_halves(tensor) if op == SWAP else tensor,)
        out.update(zip(names, (p.contiguous() for p in parts)))
    return out


QKV_MLP = "qkv_mlp"  # a single block's linear1: q, k, v (hidden rows each), then the MLP input (the rest)
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
            op = QKV_MLP if op == QKV and len(templates) == 4 else op
            splits = row_splits(op, out_features, in_features)
            return [(m.expand(t), rows) for t, rows in zip(templates, splits)]
    return []
