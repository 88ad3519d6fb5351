"""Stable Diffusion 2.x (2.0/2.1 512-base eps, 768-v, and the eps inpainting model): OpenCLIP ViT-H/14 on its
penultimate layer, attention heads of 64 channels.

512-base and 768-v share every key and shape, so without a hint from the file the prediction type is settled by
A1111's / stable-diffusion.cpp's probe forward (`probe_v_prediction`).
Upstream: https://github.com/Stability-AI/stablediffusion/blob/main/configs/stable-diffusion/v2-inference-v.yaml
"""

from __future__ import annotations

import torch

from sdcli.formats.ldm import OPENCLIP_TEXT, UNET_PREFIX

from sdcli.families.base import Family, Shapes, TextEncoderSpec


def _is_sd2(shapes: Shapes) -> bool:
    """OpenCLIP text keys, linear proj_in of the transformers (SD2's use_linear_in_transformer) or a 1024-wide
    cross-attention context: any one is enough (diffusers folders carry transformers text names)."""
    proj = shapes.get(UNET_PREFIX + "middle_block.1.proj_in.weight", ())
    ctx = shapes.get(UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", (0, 0))
    return any(k.startswith(OPENCLIP_TEXT) for k in shapes) or len(proj) == 2 or ctx[1] == 1024


@torch.no_grad()
def probe_v_prediction(unet) -> bool:
    """A1111's and stable-diffusion.cpp's test for SD2 768-v vs 512-base (same keys and shapes): at t=999 on
    a constant input, an eps model returns roughly the input, a v model roughly its negation."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, dtype=p.dtype, device=p.device)
    t = torch.tensor([999.0], device=p.device)
    out = (unet(x, t, context).float() - x.float()).mean().item()
    return out < -1.0


def _settle(unet) -> str:
    return "v" if probe_v_prediction(unet) else "eps"


SD2 = Family(
    name="sd2", title="SD 2.x", a1111_name="SD2", matches=_is_sd2,
    # OpenCLIP's tokenizer pads with 0 ("!"); the file's last layer is dropped (penultimate conditioning)
    text=(TextEncoderSpec(prefix=OPENCLIP_TEXT, pad_id=0, hidden_act="gelu", hidden_layer="penultimate",
                          embedding_key="clip_h"),),
    unet_heads=dict(num_heads=None, head_dim=64),
    prediction="v", settle_prediction=_settle, inpaint_prediction="eps",
    native_sizes={"eps": 512, "v": 768},
)  # fmt: skip
