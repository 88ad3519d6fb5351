"""SD3 / SD3.5 MMDiT key layouts: Stability's single-file names (our MMDiT's, after ``model.diffusion_model.``)
<-> diffusers' ``SD3Transformer2DModel`` names (the ``transformer/`` folder of a diffusers repository), as rules.

Two things are not renames: the fused ``qkv`` of Stability is three matrices in diffusers (split / concatenated
along dim 0, in q, k, v order), and the pre-only modulations (the last context block's and the final layer's)
store (shift, scale) where diffusers stores (scale, shift): the two halves swap, in both directions alike.
Upstream: diffusers ``loaders/single_file_utils.py`` convert_sd3_transformer_checkpoint_to_diffusers.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

QKV = "qkv"  # one Stability tensor = cat(q, k, v) of three diffusers tensors
SWAP = "swap"  # (shift, scale) <-> (scale, shift)
SWAP_IF_LAST = "swap_if_last"  # SWAP in the last joint block only (its context block is pre-only)

_X, _C = r"joint_blocks\.(\d+)\.x_block\.", r"joint_blocks\.(\d+)\.context_block\."
_T = r"transformer_blocks.\1."
# (Stability name pattern, diffusers name template(s), op); the final (weight|bias) group is appended to each.
RULES: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    (r"x_embedder\.proj", ("pos_embed.proj",), None),
    (r"t_embedder\.mlp\.0", ("time_text_embed.timestep_embedder.linear_1",), None),
    (r"t_embedder\.mlp\.2", ("time_text_embed.timestep_embedder.linear_2",), None),
    (r"y_embedder\.mlp\.0", ("time_text_embed.text_embedder.linear_1",), None),
    (r"y_embedder\.mlp\.2", ("time_text_embed.text_embedder.linear_2",), None),
    (r"context_embedder", ("context_embedder",), None),
    (r"final_layer\.linear", ("proj_out",), None),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",), SWAP),
    (_X + r"attn\.qkv", tuple(_T + f"attn.to_{x}" for x in "qkv"), QKV),
    (_C + r"attn\.qkv", tuple(_T + f"attn.add_{x}_proj" for x in "qkv"), QKV),
    (_X + r"attn2\.qkv", tuple(_T + f"attn2.to_{x}" for x in "qkv"), QKV),
    (_X + r"attn\.ln_q", (_T + "attn.norm_q",), None),
    (_X + r"attn\.ln_k", (_T + "attn.norm_k",), None),
    (_C + r"attn\.ln_q", (_T + "attn.norm_added_q",), None),
    (_C + r"attn\.ln_k", (_T + "attn.norm_added_k",), None),
    (_X + r"attn2\.ln_q", (_T + "attn2.norm_q",), None),
    (_X + r"attn2\.ln_k", (_T + "attn2.norm_k",), None),
    (_X + r"attn\.proj", (_T + "attn.to_out.0",), None),
    (_C + r"attn\.proj", (_T + "attn.to_add_out",), None),
    (_X + r"attn2\.proj", (_T + "attn2.to_out.0",), None),
    (_X + r"adaLN_modulation\.1", (_T + "norm1.linear",), None),
    (_C + r"adaLN_modulation\.1", (_T + "norm1_context.linear",), SWAP_IF_LAST),
    (_X + r"mlp\.fc1", (_T + "ff.net.0.proj",), None),
    (_X + r"mlp\.fc2", (_T + "ff.net.2",), None),
    (_C + r"mlp\.fc1", (_T + "ff_context.net.0.proj",), None),
    (_C + r"mlp\.fc2", (_T + "ff_context.net.2",), None),
)
WHOLE = {"pos_embed": "pos_embed.pos_embed"}  # the stored position table (a buffer, no weight/bias suffix)


def diffusers_names(key: str, depth: int) -> tuple[tuple[str, ...], str | None]:
    """(diffusers name(s), op) of one Stability MMDiT key (without ``model.diffusion_model.``); KeyError if none.
    `depth` (the number of joint blocks) says which context block is pre-only."""
    if key in WHOLE:
        return (WHOLE[key],), None
    for pattern, templates, op in RULES:
        if m := re.fullmatch(pattern + r"\.(weight|bias)", key):
            if op == SWAP_IF_LAST:
                op = SWAP if int(m.group(1)) == depth - 1 else None
            return tuple(m.expand(t) + "." + m.groups()[-1] for t in templates), op
    raise KeyError(f"no diffusers name for the SD3 MMDiT key {key!r}")


def swap_halves(t: Tensor) -> Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_diffusers(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Stability-layout MMDiT weights -> diffusers SD3Transformer2DModel weights."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        names, op = diffusers_names(key, depth)
        parts = tensor.chunk(3, dim=0) if op == QKV else (swap_halves(tensor) if op == SWAP else tensor,)
        out.update(zip(names, (p.contiguous() for p in parts)))
    return out


def from_diffusers(state: dict[str, Tensor], keys: list[str], depth: int) -> dict[str, Tensor]:
    """The Stability-layout tensors named `keys` (e.g. our MMDiT's state_dict keys), gathered from diffusers
    weights; KeyError names the first diffusers tensor missing."""
    out: dict[str, Tensor] = {}
    for key in keys:
        names, op = diffusers_names(key, depth)
        parts = [state[n] for n in names]
        out[key] = torch.cat(parts, dim=0) if op == QKV else swap_halves(parts[0]) if op == SWAP else parts[0]
    return out
