"""Stable Diffusion 3 and 3.5 (SD3 Medium, SD3.5 Medium with dual attention and q/k norm, SD3.5 Large and Large
Turbo): one family, the variants read from the MMDiT's shapes (models/mmdit.config_from_shapes).

Rectified flow, shift 3.0, CFG 7 (diffusers' StableDiffusion3Pipeline defaults). Text: CLIP-L and OpenCLIP bigG on
their penultimate hidden state without the final norm, concatenated on the channels and zero-padded to T5's 4096,
then T5-XXL's 256 tokens appended on the sequence axis; the vector y is CLIP-L's pooled output (not projected:
diffusers loads it with an identity projection) next to bigG's projected one. Without a T5 file the T5 part is
zeros, as diffusers does when text_encoder_3 is None.
Upstream: Stability-AI/sd3.5 sd3_impls.py / sd3_infer.py; ComfyUI comfy/supported_models.py SD3,
comfy/latent_formats.py SD3 (scale, shift and preview factors); diffusers pipeline_stable_diffusion_3.py.
"""

from __future__ import annotations

from sdcli.formats.ldm import UNET_PREFIX

from sdcli.families.base import Family, FlowSpec, LatentSpec, Shapes, TextEncoderSpec

TEXT = "text_encoders."
SD3_LATENT = LatentSpec(
    channels=16, scale_factor=1.5305, shift_factor=0.0609, taesd="taesd3",
    rgb_factors=(
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
    ),
    rgb_bias=(0.2394, 0.2135, 0.1925),
)  # fmt: skip

# CLIP-L (OpenAI, pads with its end token) and bigG (OpenCLIP, pads with 0), both in transformers names in the
# Stability files and in ComfyUI's clip_l/clip_g files
CLIP_L = TextEncoderSpec(prefix=TEXT + "clip_l.transformer.", pad_id=49407, hidden_act="quick_gelu",
                         hidden_layer="penultimate-raw", pooled=True, projected=False, flag="--clip-l")
CLIP_G = TextEncoderSpec(prefix=TEXT + "clip_g.transformer.", pad_id=0, hidden_act="gelu",
                         hidden_layer="penultimate-raw", pooled=True, embedding_key="clip_g", flag="--clip-g")
T5_PREFIX = TEXT + "t5xxl.transformer."


def t5_spec(length: int, optional: bool = False) -> TextEncoderSpec:
    """T5-XXL padded to `length` tokens (the model card's)."""
    return TextEncoderSpec(prefix=T5_PREFIX, pad_id=0, hidden_act="", kind="t5", length=length, optional=optional,
                           embedding_key="t5", flag="--t5")


def _is_sd3(shapes: Shapes) -> bool:
    """An MMDiT: joint blocks of a text and an image stream."""
    return any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in shapes)


SD3 = Family(
    name="sd3", title="SD3 / SD3.5", a1111_name="SD3", matches=_is_sd3,
    text=(CLIP_L, CLIP_G, t5_spec(256, optional=True)),
    unet_heads=dict(num_heads=None, head_dim=64), latent=SD3_LATENT,
    prediction="flow", native_sizes={"flow": 1024},
    diffusers_components=("vae", "text_encoder", "text_encoder_2"), diffusers_sharded=("transformer", "text_encoder_3"),
    denoiser="mmdit", flow=FlowSpec(spacing="table", shift=3.0, timestep_scale=1000.0),
    guidance="cfg", default_cfg=7.0, size_multiple=16, skip_layer_guidance=True,
)  # fmt: skip
