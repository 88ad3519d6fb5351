"""The family registry: every model family sdcli knows, in the order detection asks them.

Add a family: declare a `Family` in its own file here and put it in FAMILIES before any family whose `matches` would
also accept it. Nothing outside families/ branches on a family's name; callers read its data (`info.family_spec`).
"""

from __future__ import annotations

from sdcli.runtime.errors import BadInputError, UnsupportedModelError
from sdcli.formats.ldm import UNET_PREFIX, part_of

from sdcli.families.base import Family, FlowSpec, LatentSpec, Shapes, TextEncoderSpec, TrainingSchedule
from sdcli.families.flux import FLUX_DEV, FLUX_OTHER, FLUX_SCHNELL
from sdcli.families.sd1 import SD1
from sdcli.families.sd2 import SD2
from sdcli.families.sd3 import SD3
from sdcli.families.sdxl import SDXL, SDXL_REFINER

# most specific first
FAMILIES: tuple[Family, ...] = (SD3, FLUX_OTHER, FLUX_DEV, FLUX_SCHNELL, SDXL_REFINER, SDXL, SD2, SD1)
DEFAULT = SD1  # what a prompt is shown for, and the schedule planned on, before any model is loaded

__all__ = ["DEFAULT", "FAMILIES", "Family", "FlowSpec", "LatentSpec", "TextEncoderSpec", "TrainingSchedule", "by_name",
           "detect_family", "hub_patterns"]


def by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def detect_family(shapes: Shapes) -> Family:
    """The first family whose predicate accepts these header shapes (LDM names). A recognised family that sdcli
    does not run yet, or a layout no family accepts, is refused with exit 8 naming what was seen."""
    family = next((f for f in FAMILIES if f.matches(shapes)), None)
    if family is not None and not family.supported:
        raise UnsupportedModelError(f"{family.title} checkpoint detected (family {family.name}): not supported yet")
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        raise BadInputError("no UNet weights (model.diffusion_model.*): a VAE, LoRA or text-encoder-only file?")
    if family is None:
        raise UnsupportedModelError(f"unknown model layout: no family ({', '.join(f.name for f in FAMILIES)}) "
                                    f"matches; saw {_summary(shapes)}")
    return family


def _summary(shapes: Shapes) -> str:
    """Tensor counts per part and a few UNet key stems: enough to tell SD3, Flux or a new layout apart."""
    parts: dict[str, int] = {}
    for key in shapes:
        parts[part_of(key)] = parts.get(part_of(key), 0) + 1
    stems = sorted({".".join(k[len(UNET_PREFIX):].split(".")[:1]) for k in shapes if k.startswith(UNET_PREFIX)})
    return (", ".join(f"{n} {part} tensors" for part, n in parts.items())
            + f"; UNet blocks: {', '.join(stems[:8])}{' ...' if len(stems) > 8 else ''}")


def hub_patterns() -> list[str]:
    """The files fetched for a hub id (the family is only known once they are here): every supported family's."""
    patterns = ["model_index.json", "scheduler/*.json", "tokenizer/*", "*/config.json"]
    for family in FAMILIES:
        if family.supported:
            patterns += [p for p in family.hub_patterns() if p not in patterns]
    return patterns
