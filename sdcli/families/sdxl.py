"""SDXL base and refiner: recognised and declared, refused for now (exit 8). The SDXL issue fills in what is
marked below and sets `supported`.

Upstream: https://github.com/Stability-AI/generative-models/blob/main/configs/inference/sd_xl_base.yaml
(conditioner.embedders.0 = CLIP ViT-L, embedders.1 = OpenCLIP ViT-bigG with its pooled output; label_emb takes
the 2816-wide vector y = pooled text + size/crop embeddings; the refiner has only bigG and a 2560-wide y).
"""

from __future__ import annotations

from sdcli.formats.ldm import CONDITIONER_PREFIX, UNET_PREFIX

from .base import Family, LatentSpec, Shapes, TextEncoderSpec

ADM = UNET_PREFIX + "label_emb.0.0.weight"  # (model channels * 4, adm width)
# The SDXL VAE has SD's shapes but another latent scale (never visible in a header: declared here). Preview
# factors: ComfyUI comfy/latent_formats.py SDXL.latent_rgb_factors.
SDXL_LATENT = LatentSpec(scale_factor=0.13025, taesd="taesdxl", rgb_factors=(
    (0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076),
))  # fmt: skip


def _is_refiner(shapes: Shapes) -> bool:
    if ADM in shapes:
        return shapes[ADM][1] == 2560
    embedders = {k[len(CONDITIONER_PREFIX):].split(".")[0] for k in shapes if k.startswith(CONDITIONER_PREFIX)}
    return embedders == {"0"} and any(k.startswith(CONDITIONER_PREFIX + "0.model.") for k in shapes)


def _is_sdxl(shapes: Shapes) -> bool:
    return ADM in shapes or any(k.startswith(CONDITIONER_PREFIX) for k in shapes)


SDXL_REFINER = Family(
    name="sdxl-refiner", title="SDXL refiner", a1111_name="SDXL", matches=_is_refiner,
    text=(TextEncoderSpec(prefix=CONDITIONER_PREFIX + "0.model.", pad_id=0, hidden_act="gelu",
                          hidden_layer="penultimate", pooled=True, embedding_key="clip_g"),),
    unet_heads=dict(num_heads=None, head_dim=64), latent=SDXL_LATENT,
    native_sizes={"eps": 1024, "v": 1024},
    diffusers_components=("unet", "vae", "text_encoder_2"), supported=False,
)  # fmt: skip

SDXL = Family(
    name="sdxl", title="SDXL", a1111_name="SDXL", matches=_is_sdxl,
    text=(TextEncoderSpec(prefix=CONDITIONER_PREFIX + "0.transformer.", pad_id=49407, hidden_act="quick_gelu",
                          hidden_layer="penultimate"),
          TextEncoderSpec(prefix=CONDITIONER_PREFIX + "1.model.", pad_id=0, hidden_act="gelu",
                          hidden_layer="penultimate", pooled=True, embedding_key="clip_g")),
    unet_heads=dict(num_heads=None, head_dim=64), latent=SDXL_LATENT,
    native_sizes={"eps": 1024, "v": 1024},
    diffusers_components=("unet", "vae", "text_encoder", "text_encoder_2"), supported=False,
)  # fmt: skip
