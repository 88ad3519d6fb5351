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
from .errors import BadInputError, ModelNotFoundError

RENDER_KEYS = ("negative", "steps", "sampler", "schedule", "sigmas", "cfg", "guidance_rescale", "seed", "width",
               "height", "clip_skip", "strength", "seamless", "hires_scale", "hires_strength", "hires_steps")
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
    embeddings: dict[str, str] = field(default_factory=dict)  # textual-inversion name -> recorded hash


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
    else:
        params = meta["parameters"]
        values = {INFOTEXT_KEYS[k]: v for k, v in params.items() if k in INFOTEXT_KEYS and v is not None}
        prompt, mode = params.get("prompt", ""), "img2img" if "strength" in values else "txt2img"
        ours = {}
    if values.get("schedule") is None:
        values.pop("schedule", None)
    embeddings = _embeddings(ours, meta["parameters"])
    return Replay(prompt, check_mapping(values, f"{path} (metadata)"), meta["source"], mode, ours, embeddings)


def _embeddings(ours: dict, params: dict) -> dict[str, str]:
    """name -> hash (sdcli: the whole sha256; A1111's "TI hashes": its first 12 digits) of the textual-inversion
    embeddings the image was made with."""
    if isinstance(ours.get("embeddings"), list):
        return {str(e.get("name")): str(e.get("sha256", "")) for e in ours["embeddings"] if isinstance(e, dict)}
    found = {}
    for entry in str((params.get("extra") or {}).get("TI hashes", "")).split(","):
        name, _, digest = entry.strip().rpartition(":")
        if name.strip():
            found[name.strip()] = digest.strip()
    return found


def check_embeddings(image: str | Path, replay: Replay, folder: str | None) -> None:
    """Every embedding the image was made with must be in `folder` (the run's embeddings_dir), found by name as
    the prompt will find it: ModelNotFoundError (exit 4, as a missing LoRA or checkpoint) naming what is missing.
    A file of that name whose hash differs is said on stderr, and used (A1111 does the same)."""
    from . import console
    from .embeddings import find_embeddings
    from .formats.hashing import file_sha256

    if not replay.embeddings:
        return
    names = ", ".join(replay.embeddings)
    if not folder:
        raise ModelNotFoundError(f"{image} was made with textual-inversion embedding(s) {names}: give their folder "
                                 "with --embeddings-dir (or embeddings_dir: in a config)")
    paths = find_embeddings(folder).paths
    missing = [n for n in replay.embeddings if n not in paths]
    if missing:
        raise ModelNotFoundError(f"{image} was made with textual-inversion embedding(s) {', '.join(missing)}: "
                                 f"not found under {folder}")
    for name, digest in replay.embeddings.items():
        if digest and not file_sha256(paths[name]).startswith(digest.lower()):
            console.info(f"{paths[name]}: not the embedding {name} the image was made with (hash differs)")
