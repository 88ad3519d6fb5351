"""SDXL base (and what shares its layout: fine-tunes, Turbo, Lightning-style distills, the 9-channel inpainting
model) and the SDXL refiner.

Upstream: https://github.com/Stability-AI/generative-models/blob/main/configs/inference/sd_xl_base.yaml
(conditioner.embedders.0 = CLIP ViT-L, embedders.1 = OpenCLIP ViT-bigG with its pooled output; label_emb takes
the 2816-wide vector y = pooled text + size/crop embeddings; the refiner has only bigG and a 2560-wide y with the
aesthetic score in place of the target size: sd_xl_refiner.yaml).
"""

from __future__ import annotations

from sdcli.formats.ldm import CONDITIONER_PREFIX, UNET_PREFIX

from sdcli.families.base import Family, LatentSpec, Shapes, SizeCond, TextEncoderSpec

ADM = UNET_PREFIX + "label_emb.0.0.weight"  # (model channels * 4, adm width): only SDXL-style UNets take a y
# The SDXL VAE has SD's shapes but another latent scale (never visible in a header: declared here). Preview
# factors: ComfyUI comfy/latent_formats.py SDXL.latent_rgb_factors (the set without a bias, before Nov 2024).
SDXL_LATENT = LatentSpec(scale_factor=0.13025, taesd="taesdxl", rgb_factors=(
    (0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755), (-0.3112, -0.2359, -0.2076),
))  # fmt: skip


def _embedders(shapes: Shapes) -> set[str]:
    return {k[len(CONDITIONER_PREFIX):].split(".")[0] for k in shapes if k.startswith(CONDITIONER_PREFIX)}


def _is_refiner(shapes: Shapes) -> bool:
    """A UNet with label_emb and a single text encoder (bigG); a file without text weights: the 2560-wide y."""
    if ADM not in shapes:
        return False
    embedders = _embedders(shapes)
    return embedders == {"0"} if embedders else shapes[ADM][1] == 2560


def _is_sdxl(shapes: Shapes) -> bool:
    """label_emb (the vector y): SD-Turbo also ships under conditioner.embedders.0 but has no y (an SD2)."""
    return ADM in shapes


def base_values(size: SizeCond, negative: bool) -> tuple[float, ...]:
    """(original h, w, crop top, left, target h, w): sgm's order; the negative gets the same (diffusers' and
    A1111's defaults)."""
    return (*map(float, size.original), *map(float, size.crop), *map(float, size.target or size.original))


def refiner_values(size: SizeCond, negative: bool) -> tuple[float, ...]:
    """(original h, w, crop top, left, aesthetic score): the negative prompt gets the low score (A1111's
    sdxl_refiner_low_aesthetic_score, diffusers' negative_aesthetic_score)."""
    score = size.negative_aesthetic if negative else size.aesthetic
    return (*map(float, size.original), *map(float, size.crop), float(score))


# flags: a UNet-only file (city96's GGUF) takes its encoders from files of their own (ComfyUI's clip_l / clip_g)
CLIP_L = TextEncoderSpec(prefix=CONDITIONER_PREFIX + "0.transformer.", pad_id=49407, hidden_act="quick_gelu",
                         hidden_layer="penultimate-raw", flag="--clip-l")  # fmt: skip
# OpenCLIP's tokenizer pads with 0 ("!") after the first end token: one vocabulary, two pad rules
BIG_G = TextEncoderSpec(prefix=CONDITIONER_PREFIX + "1.model.", pad_id=0, hidden_act="gelu",
                        hidden_layer="penultimate-raw", pooled=True, embedding_key="clip_g", flag="--clip-g")  # fmt: skip

SDXL_REFINER = Family(
    name="sdxl-refiner", title="SDXL refiner", a1111_name="SDXL", matches=_is_refiner,
    text=(TextEncoderSpec(prefix=CONDITIONER_PREFIX + "0.model.", pad_id=0, hidden_act="gelu",
                          hidden_layer="penultimate-raw", pooled=True, embedding_key="clip_g", flag="--clip-g"),),
    unet_heads=dict(num_heads=None, head_dim=64), latent=SDXL_LATENT,
    native_sizes={"eps": 1024, "v": 1024},
    diffusers_components=("unet", "vae", "text_encoder_2"),
    size_values=refiner_values, zero_empty_negative=True, vae_fp16_fallback="fp32",
)  # fmt: skip

SDXL = Family(
    name="sdxl", title="SDXL", a1111_name="SDXL", matches=_is_sdxl,
    text=(CLIP_L, BIG_G),
    unet_heads=dict(num_heads=None, head_dim=64), latent=SDXL_LATENT,
    native_sizes={"eps": 1024, "v": 1024},
    diffusers_components=("unet", "vae", "text_encoder", "text_encoder_2"),
    size_values=base_values, zero_empty_negative=True, vae_fp16_fallback="fp32",
)  # fmt: skip
