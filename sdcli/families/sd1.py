"""Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes, LCM-distilled ones included): OpenAI CLIP ViT-L/14, eps.

Upstream: https://github.com/CompVis/stable-diffusion/blob/main/configs/stable-diffusion/v1-inference.yaml
"""

from __future__ import annotations

from sdcli.formats.ldm import OPENAI_TEXT, UNET_PREFIX

from sdcli.families.base import Family, Shapes, TextEncoderSpec


def _is_sd1(shapes: Shapes) -> bool:
    """An LDM UNet (input_blocks) that shows none of SD2's signs: the registry asks SD2 first."""
    return any(k.startswith(UNET_PREFIX + "input_blocks.") for k in shapes)


SD1 = Family(
    name="sd1", title="SD 1.x", a1111_name="SD1", matches=_is_sd1,
    # pads with <|endoftext|>; a UNet-only file (city96's GGUF) takes it from a CLIP-L file of its own
    text=(TextEncoderSpec(prefix=OPENAI_TEXT, pad_id=49407, hidden_act="quick_gelu", flag="--clip-l"),),
    unet_heads=dict(num_heads=8, head_dim=None),
    prediction="eps",
    native_sizes={"eps": 512, "v": 512},
)  # fmt: skip
