"""Which family a file made FOR a model was made for (a LoRA, an embedding, a VAE, a text encoder on its own), from
the widths in its header or the training metadata it carries. `sdcli inspect` and `inspect --list` say it; nothing
is refused on it (loading checks the shapes against the model itself).

The widths are the released models': a width no release has (a test model's) names no family, and the caller says
the width instead. Upstream for the metadata: kohya-ss sd-scripts (ss_base_model_version, ss_v2; the modelspec
keys of library/sai_model_spec.py) and A1111 extensions-builtin/Lora/network.py (NetworkOnDisk.detect_version).
"""

from __future__ import annotations

from sdcli.families.base import Family
from sdcli.families.flux import FLUX_DEV
from sdcli.families.sd1 import SD1
from sdcli.families.sd2 import SD2
from sdcli.families.sd3 import SD3
from sdcli.families.sdxl import SDXL, SDXL_REFINER

# The UNet's cross-attention context width (attn2.to_k input): ControlNets and LoRAs of the UNet
CONTEXT_WIDTHS: dict[int, Family] = {768: SD1, 1024: SD2, 2048: SDXL, 1280: SDXL_REFINER}
# The width of a one-encoder model's text encoder: a single-tensor embedding fits the model of its width
TEXT_WIDTHS: dict[int, Family] = {768: SD1, 1024: SD2}
# A separate text encoder file by its width: what it is, and the families that take such a file
TEXT_FILES: dict[int, tuple[str, tuple[Family, ...]]] = {
    768: ("CLIP ViT-L/14 (clip_l)", (SD1, SDXL, SD3, FLUX_DEV)),
    1024: ("OpenCLIP ViT-H/14", (SD2,)),
    1280: ("OpenCLIP ViT-bigG/14 (clip_g)", (SDXL, SDXL_REFINER, SD3)),
    4096: ("T5-XXL (t5xxl)", (SD3, FLUX_DEV)),
}
# kohya's ss_base_model_version / the modelspec architecture, by prefix (longest first where they share one)
KOHYA_VERSIONS = (("sdxl", SDXL), ("sd_v2", SD2), ("sd_v1", SD1), ("sd3", SD3), ("flux", FLUX_DEV))
MODELSPEC_ARCHS = (("stable-diffusion-xl-v1-refiner", SDXL_REFINER), ("stable-diffusion-xl", SDXL),
                   ("stable-diffusion-v2", SD2), ("stable-diffusion-v1", SD1), ("stable-diffusion-v3", SD3),
                   ("flux-1", FLUX_DEV))  # fmt: skip
# Key stems of the diffusion transformers' LoRAs (kohya's lora_unet_double_blocks_..., diffusers' transformer. ...)
DIT_LORA_STEMS = (("double_blocks", FLUX_DEV), ("single_blocks", FLUX_DEV), ("single_transformer_blocks", FLUX_DEV),
                  ("joint_blocks", SD3))  # fmt: skip


def by_context(width: int) -> Family | None:
    return CONTEXT_WIDTHS.get(width)


def by_embedding(widths: dict[str, int]) -> Family | None:
    """An embedding's encoder keys -> widths: clip_l and clip_g together are SDXL's; one tensor, by its width."""
    if set(widths) == {"clip_l", "clip_g"}:
        return SDXL
    if len(widths) == 1:
        return TEXT_WIDTHS.get(next(iter(widths.values())))
    return None


def by_metadata(meta: dict[str, str]) -> Family | None:
    """The family a kohya-trained file names in its metadata (A1111's order: the base model version, then ss_v2)."""
    version = str(meta.get("ss_base_model_version", ""))
    for prefix, family in KOHYA_VERSIONS:
        if version.startswith(prefix):
            return family
    arch = str(meta.get("modelspec.architecture", ""))
    for prefix, family in MODELSPEC_ARCHS:
        if arch.startswith(prefix):
            return family
    return SD2 if str(meta.get("ss_v2", "")) == "True" else None


def by_dit_stems(keys) -> Family | None:
    """A LoRA of a diffusion transformer, by the block names its keys spell."""
    for stem, family in DIT_LORA_STEMS:
        if any(stem in k for k in keys):
            return family
    return None
