"""Replay: the settings an image was made with, read from its metadata and turned into config values.

Works for images written by sdcli (the full resolved config is in its JSON chunk), A1111 and stable-diffusion.cpp
(the `parameters` infotext) and ComfyUI (the KSampler and text nodes of its prompt graph). Only the settings
that describe the render are taken; the model, device, dtype and output stay the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli.config import check_mapping, check_value
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, quote, quote_list
from sdcli.text.prompts import check_prompt

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
    path: str = ""  # the image, for messages
    embeddings: dict[str, str] = field(default_factory=dict)  # textual-inversion name -> recorded hash
    refiner: str | None = None  # the SDXL refiner it was made with (a file of the user's, like the model)


def from_image(path: str | Path) -> Replay:
    """The replayable settings of an image; BadInputError when it carries no generation metadata."""
    from sdcli.output.metadata import read_image_metadata

    meta = read_image_metadata(path)
    if meta["source"] is None:
        raise BadInputError(f"{path}: no generation metadata found (sdcli, A1111, ComfyUI or stable-diffusion.cpp)")
    if meta["source"] == "sdcli":
        ours = _checked_record(meta["sdcli"], f"{path} (sdcli metadata)")
        values = {k: v for k, v in ours.get("config", {}).items() if k in RENDER_KEYS}
        prompt, mode = ours.get("prompt", ""), ours.get("mode", "txt2img")
        refiner = (ours.get("refiner") or {}).get("name")
    else:
        params = meta["parameters"]
        values = {INFOTEXT_KEYS[k]: v for k, v in params.items() if k in INFOTEXT_KEYS and v is not None}
        extra = params.get("extra") or {}
        refiner = extra.get("Refiner")
        if extra.get("Refiner switch at") is not None:
            values["refiner_switch"] = _number(extra["Refiner switch at"])
        prompt, mode = params.get("prompt", ""), "img2img" if "strength" in values else "txt2img"
        ours = {}
        if meta["source"] == "a1111":
            rng_note(params.get("rng"), path)
        else:  # sd.cpp draws its own noise (a CUDA-like Philox by default)
            from sdcli.runtime import console

            console.info(f"{path}: made by stable-diffusion.cpp, whose noise differs from sdcli's (A1111's CPU "
                         "noise), so the same seed gives a different image")
    if values.get("schedule") is None:
        values.pop("schedule", None)
    where = f"{path} (metadata)"
    steps = values.get("steps") if isinstance(values.get("steps"), int) else 20
    check_prompt(prompt, where, steps)
    check_prompt(values.get("negative") if isinstance(values.get("negative"), str) else "", where, steps, tags=False)
    return Replay(prompt, check_mapping(values, where), meta["source"], mode, ours, path=str(path),
                  embeddings=_embeddings(ours, meta["parameters"]),
                  refiner=refiner if isinstance(refiner, str) else None)


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # refused by check_mapping, naming the image and the key


def check_refiner_given(replay: Replay, image, refiner: str | None) -> None:
    """An image made with a refiner replays only with one given again (--refiner), as its model is."""
    from sdcli.runtime.errors import UsageError

    if replay.refiner and not refiner:
        raise UsageError(f"{image} was made with the refiner {quote(replay.refiner, 80)}: give it again with "
                         "--refiner FILE")


_MODES = ("txt2img", "img2img", "inpaint", "decode")


def _checked_record(ours: dict, where: str) -> dict:
    """sdcli's own JSON chunk, typed: every field replay and verify read is checked here, so a hand-edited or
    hostile chunk is exit 3 naming the file and key, never a crash or an error blamed on an option."""
    def need(key: str, ok: bool, what: str) -> None:
        if key in ours and not ok:
            raise BadInputError(f"{where}: '{key}' must be {what}, got {_show(ours[key])}")

    if ours.get("mode") == "sweep":
        from sdcli.runtime.errors import UsageError

        raise UsageError(f"{where.removesuffix(' (sdcli metadata)')}: a sweep plot, not one render: its metadata "
                         "lists each cell's `sdcli generate` command (sdcli inspect shows them); replay or verify "
                         "a cell kept with --keep-cells")
    need("config", isinstance(ours.get("config"), dict), "an object of config keys")
    need("prompt", isinstance(ours.get("prompt"), str), "text")
    need("mode", ours.get("mode") in _MODES, "one of " + ", ".join(_MODES))
    loras = ours.get("loras")
    need("loras", isinstance(loras, list) and all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                   for e in loras), "a list of objects with a 'name'")
    refiner = ours.get("refiner")
    need("refiner", isinstance(refiner, dict) and isinstance(refiner.get("name"), str), "an object with a 'name'")
    model = ours.get("model")
    need("model", isinstance(model, dict) and isinstance(model.get("sha256", ""), (str, type(None))),
         "an object with a text 'sha256'")
    if "dtype" in ours:
        if ours["dtype"] == "auto":
            raise BadInputError(f"{where}: 'dtype' must be the dtype used (fp32, bf16 or fp16), got 'auto'")
        check_value("dtype", ours["dtype"], where)
    return ours


def _show(value: Any) -> str:
    from sdcli.config import _show as short

    return f"{type(value).__name__} {short(value)}"


def rng_note(rng: Any, path: str | Path) -> None:
    """sdcli draws A1111's CPU noise ("RNG: CPU"); an image made with GPU or NV noise ("RNG: GPU", "RNG: NV", or no
    RNG field at all, which A1111 reads as GPU) replays with the same settings but different noise: say so."""
    from sdcli.runtime import console

    if rng is None:
        console.info(f"{path}: no RNG field (A1111 then used GPU noise); sdcli draws A1111's CPU noise, so the same "
                     "seed gives a different image")
    elif rng.strip().upper() != "CPU":
        console.info(f"{path}: made with RNG: {rng.strip()} noise; sdcli draws A1111's CPU noise, so the same seed "
                     "gives a different image")


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
    from sdcli.runtime import console
    from sdcli.text.embeddings import find_embeddings
    from sdcli.formats.hashing import file_sha256

    if not replay.embeddings:
        return
    names = quote_list(replay.embeddings)  # names from the image's metadata: any number, any length
    if not folder:
        raise ModelNotFoundError(f"{image} was made with textual-inversion embedding(s) {names}: give their folder "
                                 "with --embeddings-dir (or embeddings_dir: in a config)")
    paths = find_embeddings(folder).paths
    missing = [n for n in replay.embeddings if n not in paths]
    if missing:
        raise ModelNotFoundError(f"{image} was made with textual-inversion embedding(s) {quote_list(missing)}: "
                                 f"not found under {folder}")
    for name, digest in replay.embeddings.items():
        if digest and not file_sha256(paths[name]).startswith(digest.lower()):
            console.info(f"{paths[name]}: not the embedding {name} the image was made with (hash differs)")
