"""The LDM single-file key layout: the one lens through which every file is seen.

A diffusers folder is mapped onto these names (formats/diffusers.py), OpenCLIP text keys are split by
formats/clip_layouts.py; detection (families/) and loading (loading/checkpoint.py) only ever see LDM names.
"""

from __future__ import annotations

from sdcli.runtime.errors import BadInputError

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
    """Tensor name -> shape, from a safetensors-style header (``__metadata__`` left out); a network's weight with
    a zero-sized dimension is refused (refuse_empty). Tensors outside the networks (``other``) are not checked."""
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    refuse_empty(shapes, [k for k in shapes if part_of(k) != "other"])
    return shapes


def refuse_empty(shapes: dict[str, tuple[int, ...]], names) -> None:
    """BadInputError when a weight among `names` has a zero-sized dimension. The safetensors format allows such
    tensors, but no network has one, and the sizes read from the header (a channel multiplier is one width divided
    by another) would divide by zero or build a network that cannot run."""
    empty = sorted(k for k in names if 0 in shapes[k])
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise BadInputError(f"tensor {empty[0]!r} has a zero-sized dimension {list(shapes[empty[0]])}{more}: "
                            "network weights never do; the file is damaged or not model weights")


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
