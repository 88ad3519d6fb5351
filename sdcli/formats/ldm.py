"""The LDM single-file key layout: the one lens through which every file is seen.

A diffusers folder is mapped onto these names (formats/diffusers.py), OpenCLIP text keys are split by
formats/clip_layouts.py; detection (families/) and loading (loading/checkpoint.py) only ever see LDM names.
"""

from __future__ import annotations

from sdcli.runtime.errors import BadInputError, quote

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
OPENAI_TEXT = "cond_stage_model.transformer."  # OpenAI CLIP in transformers naming (SD1 files, diffusers folders)
OPENCLIP_TEXT = "cond_stage_model.model."  # OpenCLIP naming (SD2 files)
CONDITIONER_PREFIX = "conditioner.embedders."  # sgm (SDXL) files: one embedder per text encoder
TEXT_ENCODERS_PREFIX = "text_encoders."  # SD3-style files: text_encoders.clip_l. / clip_g. / t5xxl.

PARTS = (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text", TEXT_PREFIX), ("text", CONDITIONER_PREFIX),
         ("text", TEXT_ENCODERS_PREFIX))
# Blocks of a diffusion transformer saved alone, at the file's root (Black Forest Labs' flux1-*.safetensors,
# diffusion-model-only SD3 files): such a file is the denoiser, seen under UNET_PREFIX like a single file's.
BARE_DENOISER_BLOCKS = ("double_blocks.", "joint_blocks.")


def bare_denoiser(keys) -> bool:
    """Whether `keys` are a diffusion transformer saved alone: no part prefix anywhere, DiT blocks at the root."""
    keys = list(keys)
    return any(k.startswith(BARE_DENOISER_BLOCKS) for k in keys) and \
        not any(k.startswith(prefix) for k in keys for _, prefix in PARTS)  # fmt: skip


def part_of(key: str) -> str:
    """Which network a key belongs to: unet, vae, text, or other."""
    return next((part for part, prefix in PARTS if key.startswith(prefix)), "other")


def shapes_of(header: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors-style header (``__metadata__`` left out); a network's weight with
    a zero-sized dimension is refused (refuse_empty). Tensors outside the networks (``other``) are not checked."""
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    refuse_empty(shapes, [k for k in shapes if part_of(k) != "other"])
    return shapes


def refuse_empty(shapes: dict[str, tuple[int, ...]], names, path=None) -> None:
    """BadInputError (naming `path` when given) when a weight among `names` has a zero-sized dimension. The
    safetensors and GGUF formats allow such tensors, but no network has one, and the sizes read from the header
    (a channel multiplier is one width divided by another) would divide by zero or build a network that cannot
    run."""
    empty = sorted(k for k in names if 0 in shapes[k])
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise BadInputError(f"{f'{path}: ' if path is not None else ''}tensor '{quote(empty[0], 120)}' has a "
                            f"zero-sized dimension {list(shapes[empty[0]])}{more}: network weights never do; the "
                            "file is damaged or not model weights")


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
