"""Network hyperparameters read from the LDM tensor shapes of a header (no tensor data): UNet, VAE, CLIP text.

What shapes cannot say (attention heads, the text activation) comes from the family declaring the file.
ComfyUI's model_detection.detect_unet_config does the same for its model list.
"""

from __future__ import annotations

import re

from sdcli.errors import BadInputError
from sdcli.formats.diffusers import count
from sdcli.formats.ldm import OPENAI_TEXT, OPENCLIP_TEXT, UNET_PREFIX, VAE_PREFIX
from sdcli.models.text import TextConfig
from sdcli.models.unet import UNetConfig
from sdcli.models.vae import VAEConfig


def _need(shapes: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the {what}: tensor {key!r} is missing")
    return shapes[key]


def infer_unet_config(shapes: dict, heads: dict, family: str) -> UNetConfig:
    """UNet hyperparameters from the tensor shapes under ``model.diffusion_model.``; `heads` is the family's
    attention rule (``num_heads`` fixed, or ``head_dim`` fixed)."""
    p = UNET_PREFIX
    keys = list(shapes)
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", "UNet")
    mc = conv_in[0]
    downs = sorted(int(m.group(1)) for k in keys if (m := re.match(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    n_in = count(keys, re.escape(p) + r"input_blocks\.(\d+)\.")
    res = downs[0] - 1 if downs else n_in - 1
    levels = len(downs) + 1
    first = [1 + i * (res + 1) for i in range(levels)]
    mult = tuple(_need(shapes, f"{p}input_blocks.{n}.0.out_layers.3.weight", "UNet")[0] // mc for n in first)
    attn = tuple(f"{p}input_blocks.{n}.1.proj_in.weight" in shapes for n in first)
    mid = p + "middle_block.1."
    context_dim = _need(shapes, mid + "transformer_blocks.0.attn2.to_k.weight", "UNet")[1]
    depth = count(keys, re.escape(mid) + r"transformer_blocks\.(\d+)\.")
    linear = len(_need(shapes, mid + "proj_in.weight", "UNet")) == 2
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
    levels = count(keys, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    mult = tuple(_need(shapes, f"{prefix}encoder.down.{i}.block.0.conv2.weight", "VAE")[0] // ch for i in range(levels))
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=_need(shapes, prefix + "decoder.conv_out.weight", "VAE")[0],
        ch=ch, ch_mult=mult,
        num_res_blocks=count(keys, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=_need(shapes, prefix + "decoder.conv_in.weight", "VAE")[1],
        embed_dim=_need(shapes, prefix + "post_quant_conv.weight", "VAE")[1],
    )  # fmt: skip


def _hf_text_prefix(shapes: dict) -> str | None:
    for prefix in (OPENAI_TEXT + "text_model.", OPENAI_TEXT):
        if prefix + "embeddings.token_embedding.weight" in shapes:
            return prefix
    return None


def infer_text_config(shapes: dict, family: str, hidden_act: str) -> tuple[TextConfig | None, str | None]:
    """(text config, layout). OpenCLIP files lose their last layer: SD2 conditions on the penultimate."""
    keys = list(shapes)
    if OPENCLIP_TEXT + "token_embedding.weight" in shapes:
        vocab, hidden = shapes[OPENCLIP_TEXT + "token_embedding.weight"]
        layers = count(keys, re.escape(OPENCLIP_TEXT) + r"transformer\.resblocks\.(\d+)\.") - 1
        inter = _need(shapes, OPENCLIP_TEXT + "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        positions = _need(shapes, OPENCLIP_TEXT + "positional_embedding", "text encoder")[0]
        layout = "openclip"
    elif (p := _hf_text_prefix(shapes)) is not None:
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = count(keys, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        inter = _need(shapes, p + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        positions = _need(shapes, p + "embeddings.position_embedding.weight", "text encoder")[0]
        layout = "openai"
    else:
        return None, None
    # Heads are not visible in shapes: both CLIP ViT-L (768/12) and OpenCLIP ViT-H (1024/16) use 64 per head.
    cfg = TextConfig(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                     num_heads=max(1, hidden // 64), intermediate_size=inter, max_positions=positions,
                     hidden_act=hidden_act)  # fmt: skip
    return cfg, layout
