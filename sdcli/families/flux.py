"""FLUX.1 dev (guidance-distilled: the guidance strength is an input of the network) and FLUX.1 schnell (timestep-
distilled, no guidance), told apart by the header: dev has ``guidance_in.*``.

Rectified flow over a packed 16-channel latent (models/flux.py). dev: the resolution-dependent shift (mu from the
image's token count), distilled guidance 3.5, no negative pass unless --cfg asks for true CFG; schnell: shift 1.0,
no guidance. Text: T5-XXL gives the token sequence (512 tokens dev, 256 schnell: the model cards), CLIP-L only its
pooled vector (not projected). BFL ships the DiT alone (no key prefix); the VAE (ae.safetensors), CLIP-L and T5
come as separate files (--vae, --clip-l, --t5).
Upstream: black-forest-labs/flux src/flux/sampling.py and util.py; ComfyUI comfy/supported_models.py Flux /
FluxSchnell, comfy/latent_formats.py Flux; diffusers pipeline_flux.py.
"""

from __future__ import annotations

from sdcli.formats.ldm import UNET_PREFIX

from sdcli.families.base import Family, FlowSpec, LatentSpec, Shapes, TextEncoderSpec
from sdcli.families.sd3 import TEXT, t5_spec

FLUX_LATENT = LatentSpec(
    channels=16, scale_factor=0.3611, shift_factor=0.1159, taesd="taef1",
    rgb_factors=(
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
    ),
    rgb_bias=(-0.0329, -0.0718, -0.0851),
)  # fmt: skip
PACKED_CHANNELS = 64  # 16 latent channels x one 2x2 patch: the text-to-image models' img_in width

# CLIP-L gives only the pooled vector y; its hidden states are not used
CLIP_L = TextEncoderSpec(prefix=TEXT + "clip_l.transformer.", pad_id=49407, hidden_act="quick_gelu",
                         hidden_layer="penultimate-raw", pooled=True, projected=False, context=False,
                         flag="--clip-l")


def _is_flux(shapes: Shapes) -> bool:
    return any(k.startswith(UNET_PREFIX + "double_blocks.") for k in shapes) and \
        any(k.startswith(UNET_PREFIX + "single_blocks.") for k in shapes)  # fmt: skip


def _img_in(shapes: Shapes) -> int:
    return shapes.get(UNET_PREFIX + "img_in.weight", (0, PACKED_CHANNELS))[1]


def _is_other(shapes: Shapes) -> bool:
    """Fill (384 = latent + masked image + 8x8 mask), Depth/Canny (128) and other conditioned variants."""
    return _is_flux(shapes) and _img_in(shapes) != PACKED_CHANNELS


def _is_dev(shapes: Shapes) -> bool:
    return _is_flux(shapes) and UNET_PREFIX + "guidance_in.in_layer.weight" in shapes


def _common(**kw) -> dict:
    return dict(unet_heads={}, latent=FLUX_LATENT, prediction="flow", native_sizes={"flow": 1024},
                diffusers_components=("vae", "text_encoder"), diffusers_sharded=("transformer", "text_encoder_2"),
                denoiser="flux_dit", default_cfg=1.0, size_multiple=16, **kw)


FLUX_OTHER = Family(
    name="flux-conditioned", title="FLUX.1 Fill/Depth/Canny", a1111_name="Flux", matches=_is_other,
    text=(CLIP_L, t5_spec(512)), supported=False, **_common(),
)  # fmt: skip

FLUX_DEV = Family(
    name="flux", title="FLUX.1 dev", a1111_name="Flux", matches=_is_dev,
    text=(CLIP_L, t5_spec(512)),
    flow=FlowSpec(spacing="linspace", dynamic=True, timestep_scale=1.0),
    guidance="distilled", default_guidance=3.5, **_common(),
)  # fmt: skip

FLUX_SCHNELL = Family(
    name="flux-schnell", title="FLUX.1 schnell", a1111_name="Flux", matches=_is_flux,
    text=(CLIP_L, t5_spec(256)),
    flow=FlowSpec(spacing="linspace", shift=1.0, timestep_scale=1.0),
    guidance="none", **_common(),
)  # fmt: skip
