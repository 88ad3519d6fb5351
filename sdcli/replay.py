"""Replay: the settings an image was made with, read from its metadata and turned into config values.

Works for images written by sdcli (the full resolved config is in its JSON chunk), A1111 and stable-diffusion.cpp
(the `parameters` infotext) and ComfyUI (the KSampler and text nodes of its prompt graph). Only the settings
that describe the render are taken; the model, device, dtype and output stay the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import check_mapping
from .errors import BadInputError

RENDER_KEYS = ("negative", "steps", "sampler", "schedule", "sigmas", "cfg", "guidance_rescale", "seed", "width",
               "height", "clip_skip", "strength", "seamless", "hires_scale", "hires_strength", "hires_steps",
               "original_size", "target_size", "crop_coords", "aesthetic_score", "negative_aesthetic_score",
               "refiner_switch")
# parse_infotext / summarize_comfyui key -> config key
INFOTEXT_KEYS = {"negative_prompt": "negative", "steps": "steps", "sampler": "sampler", "schedule": "schedule",
                 "cfg_scale": "cfg", "seed": "seed", "width": "width", "height": "height", "clip_skip": "clip_skip",
                 "denoising_strength": "strength"}


@dataclass(frozen=True)
class Replay:
    prompt: str
    values: dict[str, Any]  # config keys -> values, checked like a config file
    source: str  # "sdcli", "a1111", "sd.cpp" or "comfyui"
    mode: str = "txt2img"
    recorded: dict[str, Any] = field(default_factory=dict)  # sdcli's whole JSON metadata, when there is one
    refiner: str | None = None  # the SDXL refiner it was made with (a file of the user's, like the model)


def from_image(path: str | Path) -> Replay:
    """The replayable settings of an image; BadInputError when it carries no generation metadata."""
    from .metadata import read_image_metadata

    meta = read_image_metadata(path)
    if meta["source"] is None:
        raise BadInputError(f"{path}: no generation metadata found (sdcli, A1111, ComfyUI or stable-diffusion.cpp)")
    if meta["source"] == "sdcli":
        ours = meta["sdcli"]
        values = {k: v for k, v in ours.get("config", {}).items() if k in RENDER_KEYS}
        prompt, mode = ours.get("prompt", ""), ours.get("mode", "txt2img")
        refiner = (ours.get("refiner") or {}).get("name")
    else:
        params = meta["parameters"]
        values = {INFOTEXT_KEYS[k]: v for k, v in params.items() if k in INFOTEXT_KEYS and v is not None}
        refiner = (params.get("extra") or {}).get("Refiner")
        switch = (params.get("extra") or {}).get("Refiner switch at")
        if switch is not None:
            values["refiner_switch"] = _number(switch)
        prompt, mode = params.get("prompt", ""), "img2img" if "strength" in values else "txt2img"
        ours = {}
    if values.get("refiner_switch") is None:
        values.pop("refiner_switch", None)
    if values.get("schedule") is None:
        values.pop("schedule", None)
    return Replay(prompt, check_mapping(values, f"{path} (metadata)"), meta["source"], mode, ours, refiner)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # refused by check_mapping, naming the image and the key



def check_refiner_given(replay: Replay, image, refiner: str | None) -> None:
    """An image made with a refiner replays only with one given again (--refiner), as its model is."""
    from .errors import UsageError

    if replay.refiner and not refiner:
        raise UsageError(f"{image} was made with the refiner {replay.refiner}: give it again with --refiner FILE")
