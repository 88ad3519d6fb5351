"""The LDM single-file key layout: the one lens through which every file is seen.

A diffusers folder is mapped onto these names (formats/diffusers.py), OpenCLIP text keys are split by
formats/clip_layouts.py; detection (families/) and loading (loading/checkpoint.py) only ever see LDM names.
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
OPENAI_TEXT = "cond_stage_model.transformer."  # OpenAI CLIP in transformers naming (SD1 files, diffusers folders)
OPENCLIP_TEXT = "cond_stage_model.model."  # OpenCLIP naming (SD2 files)
CONDITIONER_PREFIX = "conditioner.embedders."  # sgm (SDXL) files: one embedder per text encoder

PARTS = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_PREFIX), ("text", CONDITIONER_PREFIX))


def part_of(key: str) -> str:
    """Which network a key belongs to: unet, vae, text, or other."""
    return next((part for part, prefix in PARTS if key.startswith(prefix)), "other")


def shapes_of(header: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors-style header (``__metadata__`` left out)."""
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
