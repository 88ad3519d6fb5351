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
from sdcli.runtime.errors import BadInputError, ModelNotFoundError
from sdcli.text.prompts import check_prompt

RENDER_KEYS = ("negative", "steps", "sampler", "schedule", "sigmas", "cfg", "guidance_rescale", "seed", "width",
               "height", "clip_skip", "strength", "seamless", "hires_scale", "hires_strength", "hires_steps",
               "hires_upscaler", "original_size", "target_size", "crop_coords", "aesthetic_score",
               "negative_aesthetic_score", "refiner_switch", "tome_ratio", "tome_ratio_hr", "mask_blur",
               "inpaint_fill", "inpaint_area", "inpaint_padding", "mask_invert", "overlay", "pad", "rng", "subseed",
               "subseed_strength", "seed_resize_from", "ensd", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise",
               "guidance", "flow_shift", "vae_tiling", "vae_tile_size", "slg_scale", "skip_layers", "slg_start",
               "slg_end")
# A1111 infotext fields of the "extra" part that replay as numbers -> config key (then Forge's fields of the flow
# models, and stable-diffusion.cpp's of SD3.5's skip-layer guidance: "Skip layers" is read by _skip_layers)
INFOTEXT_NUMBERS = {"Refiner switch at": "refiner_switch", "Token merging ratio": "tome_ratio",
                    "Token merging ratio hr": "tome_ratio_hr", "Distilled CFG Scale": "guidance",
                    "Shift": "flow_shift", "SLG scale": "slg_scale", "Skip layer start": "slg_start",
                    "Skip layer end": "slg_end"}
# parse_infotext / summarize_comfyui key -> config key
INFOTEXT_KEYS = {"negative_prompt": "negative", "steps": "steps", "sampler": "sampler", "schedule": "schedule",
                 "cfg_scale": "cfg", "seed": "seed", "width": "width", "height": "height", "clip_skip": "clip_skip",
                 "denoising_strength": "strength"}
# A1111's noise fields: parse_infotext key -> config key (sampler parameters: a1111_params.from_infotext)
A1111_NOISE_KEYS = {"subseed": "subseed", "subseed_strength": "subseed_strength",
                    "seed_resize_from": "seed_resize_from", "ensd": "ensd"}
# parse_infotext key -> infotext label, for the fields a1111_params reads by label
_SAMPLER_LABELS = {"eta": "Eta", "eta_ddim": "Eta DDIM", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin",
                   "s_tmax": "Sigma tmax", "s_noise": "Sigma noise", "ensd": "ENSD"}


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
    model: str | None = None  # the checkpoint it was made with: its file name (A1111: the name without extension)
    model_hash: str | None = None  # its sha256 (sdcli: whole; A1111: the first 10 digits; older A1111: 8, not ours)


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
        model, model_hash = (ours.get("model") or {}).get("name"), (ours.get("model") or {}).get("sha256")
    else:
        params = meta["parameters"]
        values = {INFOTEXT_KEYS[k]: v for k, v in params.items() if k in INFOTEXT_KEYS and v is not None}
        extra = params.get("extra") or {}
        refiner = extra.get("Refiner")
        model, model_hash = params.get("model"), params.get("model_hash")
        values.update({key: _number(extra[field]) for field, key in INFOTEXT_NUMBERS.items()
                       if extra.get(field) is not None})
        _hires_values(values, extra)
        values.update(_skip_layers(extra, meta.get("raw") or {}))
        masked = _inpaint_values(extra)
        values.update(masked)
        mode = "inpaint" if masked else "img2img" if "strength" in values else "txt2img"
        prompt = params.get("prompt", "")
        ours = {}
        if meta["source"] == "a1111":
            values.update(a1111_noise(params, path))
            _cpu_hires_note(values, path)
        else:  # sd.cpp draws its own noise (a CUDA-like Philox by default)
            from sdcli.runtime import console

            console.info(f"{path}: made by stable-diffusion.cpp, which draws its noise and steps its samplers its "
                         "own way (not A1111's), so the same seed gives a different image")
    if values.get("schedule") is None:
        values.pop("schedule", None)
    if isinstance(values.get("hires_upscaler"), str):  # a name, found in the user's upscaler_dir: never a path
        from sdcli.upscale.names import display_name  # that an image's metadata points at

        values["hires_upscaler"] = display_name(values["hires_upscaler"])
    where = f"{path} (metadata)"
    steps = values.get("steps") if isinstance(values.get("steps"), int) else 20
    check_prompt(prompt, where, steps)
    check_prompt(values.get("negative") if isinstance(values.get("negative"), str) else "", where, steps, tags=False)
    return Replay(prompt, check_mapping(values, where), meta["source"], mode, ours, path=str(path),
                  embeddings=_embeddings(ours, meta["parameters"]),
                  refiner=refiner if isinstance(refiner, str) else None,
                  model=model if isinstance(model, str) and model else None,
                  model_hash=model_hash.lower() if isinstance(model_hash, str) and model_hash else None)


def check_model(replay: Replay, model: str | None) -> None:
    """--from-image with no model: UsageError naming the checkpoint the image was made with. With another
    checkpoint than the image's (by hash where both are known, else by name): a warning naming both, since the
    render goes on and cannot give that image (verify says the same after its re-render)."""
    from sdcli.runtime import console
    from sdcli.runtime.errors import UsageError

    made = _model_words(replay.model, replay.model_hash)
    if not model:
        if made:
            raise UsageError(f"no model given: {replay.path} was made with {made}; pass --model with that "
                             "checkpoint (FILE.safetensors | FOLDER | HUB_ID)")
        return  # render.load says no model given
    if made is None:
        return
    ours = _sha256(model)
    if ours is not None and replay.model_hash is not None and len(replay.model_hash) >= 10:
        same = ours.startswith(replay.model_hash)
    else:  # a folder, a hub id, or an old A1111 hash (of 64 KiB of the file): the names are all there is
        same = replay.model in (None, Path(model).name, Path(model).stem)
    if not same:
        console.info(f"warning: {replay.path} was made with {made}, but this render uses "
                     f"{_model_words(Path(model).name, ours)}: the result will not be that image")


def _model_words(name: str | None, sha256: str | None) -> str | None:
    if name is None and sha256 is None:
        return None
    return f"{name or 'an unnamed checkpoint'}" + (f" (sha256 {sha256[:10]})" if sha256 else "")


def _sha256(model: str) -> str | None:
    from sdcli.formats.hashing import file_sha256

    try:
        return file_sha256(model) if Path(model).is_file() else None
    except OSError:
        return None


# A1111's hires fix fields -> config keys (processing.py StableDiffusionProcessingTxt2Img: extra_generation_params)
HIRES_FIELDS = {"Hires upscale": ("hires_scale", float), "Hires steps": ("hires_steps", int),
                "Hires upscaler": ("hires_upscaler", str)}


def _hires_values(values: dict, extra: dict) -> None:
    """An A1111 hires fix render: its Hires fields, and its Denoising strength as the second pass's (it is not an
    img2img strength there)."""
    if extra.get("Hires upscale") is None:
        return
    for label, (key, kind) in HIRES_FIELDS.items():
        if extra.get(label) is not None:
            values[key] = extra[label] if kind is str else _number(extra[label], kind)
    if "strength" in values:
        values["hires_strength"] = values.pop("strength")


def _cpu_hires_note(values: dict, path) -> None:
    """An A1111 hires fix render made with CPU noise: A1111 starts new generators for the second pass, sdcli's `cpu`
    noise goes on with the first pass's (pipeline.NoiseSettings.fresh_hires_noise), so the second pass differs."""
    if values.get("hires_scale", 1) != 1 and str(values.get("rng", "")).lower() == "cpu":
        from sdcli.runtime import console

        console.info(f"{path}: a hires fix with CPU noise: A1111 draws the second pass's noise from new generators, "
                     "sdcli's cpu noise goes on with the first pass's, so the hires pass differs")


# A1111's inpaint fields -> (config key, {A1111's word: ours}; None: a number)
_INPAINT_FIELDS = {
    "Mask blur": ("mask_blur", None),
    "Masked content": ("inpaint_fill", {"original": "original", "fill": "fill", "latent noise": "latent-noise",
                                        "latent nothing": "latent-nothing"}),
    "Inpaint area": ("inpaint_area", {"Whole picture": "whole", "Only masked": "masked"}),
    "Masked area padding": ("inpaint_padding", None),
    "Mask mode": ("mask_invert", {"Inpaint masked": False, "Inpaint not masked": True}),
}


def _inpaint_values(extra: dict) -> dict:
    """The config values of A1111's inpaint fields (and sdcli's "Outpaint pad"), as written by app/inpaint.py. A
    value that is no known word or number is kept as text, for check_mapping to refuse naming the image."""
    values = {}
    for label, (key, words) in _INPAINT_FIELDS.items():
        if label in extra:
            raw = str(extra[label]).strip()
            values[key] = _whole_number(raw) if words is None else words.get(raw, raw)
    if "Outpaint pad" in extra:
        values["pad"] = ",".join(str(extra["Outpaint pad"]).split())
    return values


def _whole_number(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def _skip_layers(extra: dict, raw: dict) -> dict:
    """"Skip layers" of an infotext: sdcli's quoted "[7, 8, 9]", or stable-diffusion.cpp's unquoted "[7, 8, 9, ]"
    (its commas split the field: read from the raw text) -> {"skip_layers": "7,8,9"}."""
    import re

    if "Skip layers" not in extra:
        return {}
    text = str(extra["Skip layers"])
    if text.count("[") != text.count("]"):
        m = re.search(r"Skip layers:\s*\[([\d,\s]*)\]", str(raw.get("parameters", "")))
        text = m.group(1) if m else text
    return {"skip_layers": ",".join(re.findall(r"\d+", text))}


def _number(text: str, kind=float):
    try:
        value = float(text)
        return int(value) if kind is int and value.is_integer() else value
    except ValueError:
        return text  # refused by check_mapping, naming the image and the key


def check_refiner_given(replay: Replay, image, refiner: str | None) -> None:
    """An image made with a refiner replays only with one given again (--refiner), as its model is."""
    from sdcli.runtime.errors import UsageError

    if replay.refiner and not refiner:
        raise UsageError(f"{image} was made with the refiner {replay.refiner}: give it again with --refiner FILE")


_MODES = ("txt2img", "img2img", "inpaint", "decode")


def _checked_record(ours: dict, where: str) -> dict:
    """sdcli's own JSON chunk, typed: every field replay and verify read is checked here, so a hand-edited or
    hostile chunk is exit 3 naming the file and key, never a crash or an error blamed on an option."""
    def need(key: str, ok: bool, what: str) -> None:
        if key in ours and not ok:
            raise BadInputError(f"{where}: '{key}' must be {what}, got {_show(ours[key])}")

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


def a1111_noise(params: dict, path: str | Path) -> dict[str, Any]:
    """Config values of an A1111 / Forge image's noise: the source (no RNG field is A1111's default, GPU), the
    variation seed and strength, "Seed resize from", ENSD and the sampler parameters (Eta, Eta DDIM, Sigma ...).
    What sdcli cannot draw again is said on stderr, named: an RNG value A1111 does not have, the SDE samplers'
    Brownian tree, an ENSD the infotext does not record."""
    from sdcli.runtime import console
    from sdcli.sampling import a1111_params

    values = {A1111_NOISE_KEYS[k]: v for k, v in params.items() if k in A1111_NOISE_KEYS and v is not None}
    rng = params.get("rng")
    if rng is None:
        values["rng"] = "gpu"
    elif str(rng).strip().lower() in a1111_params.SOURCES:
        values["rng"] = str(rng).strip().lower()
    else:
        console.info(f"{path}: made with RNG: {str(rng).strip()}, a noise source A1111 does not have; sdcli draws "
                     "CPU noise for it, so the same seed gives a different image")
    sampler = params.get("sampler")
    if not isinstance(sampler, str):
        return values
    fields = {label: params[key] for key, label in _SAMPLER_LABELS.items() if params.get(key) is not None}
    values.update(a1111_params.from_infotext(sampler, fields))
    eta = values.get("eta")
    for note in (a1111_params.unreplayable(sampler, eta), a1111_params.unknown_ensd(sampler, eta, fields)):
        if note:
            console.info(f"{path}: {note}")
    return values


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
