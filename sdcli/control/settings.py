"""ControlNet units as settings: what a user writes (flags, YAML `controlnets:`, a prompts-file job), checked
before the model loads; the loaded networks; what an image records of them (A1111's infotext fields, sdcli's
JSON) and how a replay finds them again.

A unit: {model, image, weight, start, end, guess_mode, resize, preprocess}. Flags: `--controlnet FILE
--control-image IMAGE` per unit; `--control-weight/-start/-end/-resize/-preprocess` given once apply to every
unit, given once per unit belong to the n-th; `--guess-mode` applies to every unit (per unit: YAML).

Replay (`generate --from-image`, `verify`): the recorded settings are used; ControlNet files are the user's, like
the checkpoint, so they are given again with --controlnet (n-th flag, n-th recorded unit); the hint image is
found beside the replayed image under its recorded file name, unless --control-image gives it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sdcli.runtime.errors import BadInputError, UsageError, quote, quote_list

RESIZE_MODES = ("just", "crop", "fill")
RESIZE_LABELS = {"just": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}  # A1111's names
KEYS = ("model", "image", "weight", "start", "end", "guess_mode", "resize", "preprocess")
MAX_WEIGHT = 10.0


@dataclass(frozen=True)
class ControlSpec:
    model: str  # ControlNet file or diffusers folder
    image: str  # the hint (or the picture a preprocessor turns into one)
    weight: float = 1.0
    start: float = 0.0  # fractions of the sampling steps (diffusers' rule: models.controlnet.unit_active)
    end: float = 1.0
    guess_mode: bool = False
    resize: str = "just"  # just | crop | fill (A1111's resize modes)
    preprocess: str | None = None  # a sdcli.control.preprocess kind applied to the image first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def preprocess_kinds() -> tuple[str, ...]:
    from sdcli.control.preprocess import PREPROCESSORS

    return tuple(PREPROCESSORS)


# --- checking what the user wrote ---------------------------------------------------------------

def parse_specs(value: Any, where: str) -> tuple[ControlSpec, ...]:
    """The `controlnets` config value (a list of unit objects, or specs already) checked; BadInputError naming
    `where`, the unit and the key."""
    if isinstance(value, tuple) and all(isinstance(v, ControlSpec) for v in value):
        return value
    if not isinstance(value, list):
        raise BadInputError(f"{where}: 'controlnets' must be a list of {{model, image, ...}} objects")
    return tuple(_spec(entry, f"{where}: 'controlnets'[{i}]") for i, entry in enumerate(value))


def _spec(entry: Any, where: str) -> ControlSpec:
    if isinstance(entry, ControlSpec):
        entry = entry.to_dict()
    if not isinstance(entry, dict):
        raise BadInputError(f"{where}: must be an object with 'model' and 'image'")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise BadInputError(f"{where}: unknown key '{quote(unknown[0], 60)}' (known: {', '.join(KEYS)})")
    for key in ("model", "image"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise BadInputError(f"{where}: '{key}' must be given as a file name")
    spec = ControlSpec(entry["model"], entry["image"],
                       **{k: _number(entry[k], k, where) for k in ("weight", "start", "end") if k in entry})  # fmt: skip
    if "guess_mode" in entry:
        if not isinstance(entry["guess_mode"], bool):
            raise BadInputError(f"{where}: 'guess_mode' must be true or false")
        spec = replace(spec, guess_mode=entry["guess_mode"])
    if entry.get("resize") is not None:
        if entry["resize"] not in RESIZE_MODES:
            raise BadInputError(f"{where}: 'resize' must be one of {', '.join(RESIZE_MODES)}, "
                                f"got {quote(repr(entry['resize']))}")
        spec = replace(spec, resize=entry["resize"])
    if entry.get("preprocess") not in (None, "none"):
        if entry["preprocess"] not in preprocess_kinds():
            raise BadInputError(f"{where}: 'preprocess' must be one of {', '.join(preprocess_kinds())}, "
                                f"got {quote(repr(entry['preprocess']))}")  # fmt: skip
        spec = replace(spec, preprocess=entry["preprocess"])
    _check_ranges(spec, where)
    return spec


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInputError(f"{where}: '{key}' must be a finite number, got {quote(repr(value))}")
    return float(value)


def _check_ranges(spec: ControlSpec, where: str) -> None:
    if not 0 <= spec.weight <= MAX_WEIGHT:
        raise BadInputError(f"{where}: 'weight' must be between 0 and {MAX_WEIGHT:g}, got {spec.weight}")
    if not 0 <= spec.start < spec.end <= 1:
        raise BadInputError(f"{where}: need 0 <= start < end <= 1 (fractions of the steps), got start "
                            f"{spec.start}, end {spec.end}")  # fmt: skip


def from_flags(models: list[str], images: list[str], weights: list[float], starts: list[float],
               ends: list[float], guess: bool, resizes: list[str], preprocesses: list[str]) -> list[dict] | None:  # fmt: skip
    """Unit objects from the repeated flags (None when no --controlnet): the n-th of each flag belongs to the
    n-th unit, one value applies to every unit. UsageError naming the flag."""
    if not models:
        stray = [f for f, v in (("--control-image", images), ("--control-weight", weights),
                                ("--control-start", starts), ("--control-end", ends), ("--guess-mode", guess),
                                ("--control-resize", resizes), ("--control-preprocess", preprocesses)) if v]  # fmt: skip
        if stray:
            raise UsageError(f"option {stray[0]}: needs --controlnet FILE")
        return None
    n = len(models)
    if len(images) != n:
        raise UsageError(f"option --control-image: one per --controlnet ({n} given, {len(images)} images)")
    units = [{"model": m, "image": i, "guess_mode": guess} for m, i in zip(models, images)]
    for flag, key, values in (("--control-weight", "weight", weights), ("--control-start", "start", starts),
                              ("--control-end", "end", ends), ("--control-resize", "resize", resizes),
                              ("--control-preprocess", "preprocess", preprocesses)):  # fmt: skip
        if len(values) not in (0, 1, n):
            raise UsageError(f"option {flag}: give it once (all units) or once per --controlnet ({n}), "
                             f"got {len(values)}")  # fmt: skip
        for k, unit in enumerate(units):
            if values:
                unit[key] = values[k if len(values) == n else 0]
    try:
        parse_specs(units, "command line")
    except BadInputError as e:
        raise UsageError(str(e).replace("command line: 'controlnets'", "--controlnet unit ")) from None
    return units


# --- before the model loads ---------------------------------------------------------------------

def all_specs(jobs) -> list[ControlSpec]:
    """Every distinct unit of a run's jobs, in order of appearance."""
    seen: dict[ControlSpec, None] = {}
    for job in jobs:
        seen.update(dict.fromkeys(job.cfg.controlnets))
    return list(seen)


def check_files(jobs, base_model: str | None) -> None:
    """Every unit's files exist, its model is a ControlNet, and (when the base checkpoint's header is cheap to
    read) it fits the base model: exit 3 naming the file, before the slow model load."""
    specs = all_specs(jobs)
    if not specs:
        return
    from sdcli.formats.images import load_image

    base = _base_unet(base_model)
    for spec in specs:
        if not Path(spec.image).is_file():
            raise BadInputError(f"{spec.image}: no such control image")
        _detect(spec.model, base)
    for image in dict.fromkeys(spec.image for spec in specs):  # decoded once now: a damaged or oversized hint
        load_image(image, multiple=1)  # is exit 3 before the slow load, not after it


def _detect(model: str, base):
    from sdcli.control.files import check_fits, detect_controlnet
    from sdcli.runtime.errors import UnsupportedModelError

    try:
        info, source = detect_controlnet(model, base[0] if base else None)
    except (BadInputError, UnsupportedModelError) as e:  # detection sees names and shapes: say which file
        raise e if Path(model).name in str(e) else type(e)(f"{model}: {e}") from None
    source.close()
    if base is not None:
        check_fits(info, *base)
    return info


def _base_unet(model: str | None):
    """(UNet config, family title) of the base checkpoint from its header, or None when that would mean reading
    the whole file (a pickle) or a download (then the fit is checked right after the load)."""
    from sdcli.loading.checkpoint import detect
    from sdcli.families import by_name
    from sdcli.formats.pickle_ckpt import is_pickle

    if not model:
        return None
    path = Path(model)
    if not path.exists() or (path.is_file() and is_pickle(path)):
        return None
    try:
        info = detect(path)
    except Exception:  # noqa: BLE001 - the model load names a bad checkpoint properly
        return None
    return info.unet, by_name(info.family).title


def load_nets(jobs, models) -> dict[str, tuple]:
    """model path -> (ControlNet, ControlNetInfo), each file loaded once for the run, in the model's dtype on
    its device, checked against the loaded base UNet."""
    specs = all_specs(jobs)
    if specs and models.family.denoiser != "unet":  # ControlNets here are the UNet families' encoder copies
        from sdcli.runtime.errors import UnsupportedModelError

        raise UnsupportedModelError(f"--controlnet with {models.family.title} is not supported yet")
    return _load(specs, models)


def _load(specs, models) -> dict[str, tuple]:
    from sdcli.runtime.console import info as say
    from sdcli.control.files import load_controlnet

    nets: dict[str, tuple] = {}
    for spec in specs:
        if spec.model not in nets:
            net, info = load_controlnet(spec.model, models.info.unet, models.family.title, models.dtype,
                                        models.parts.home)
            say(f"ControlNet {Path(spec.model).name}: for {info.family}, {info.layout} layout")
            models.parts.attach("unet", net)  # it runs with the UNet: moves with it under offload
            nets[spec.model] = (net.eval(), info)
    return nets


def units_for(specs, nets: dict[str, tuple], models) -> list:
    """The job's runnable units (control.Unit), hint pictures read and preprocessed; a ControlNet not in `nets`
    yet (a caller that did not load the run's up front) is loaded into it now."""
    from sdcli.control.apply import Unit

    missing = [s for s in specs if s.model not in nets]
    if missing:
        nets.update(_load(missing, models))

    return [Unit(nets[s.model][0], hint_picture(s), s.weight, s.start, s.end, s.guess_mode, s.resize,
                 nets[s.model][1].bgr) for s in specs]  # fmt: skip


def hint_picture(spec: ControlSpec):
    from sdcli.formats.images import load_image
    from sdcli.control.preprocess import PREPROCESSORS

    image, _notes = load_image(spec.image, multiple=1)
    return PREPROCESSORS[spec.preprocess](image) if spec.preprocess else image


# --- what an image records ----------------------------------------------------------------------

def _sha256(path: str) -> str | None:
    from sdcli.formats.hashing import file_sha256

    p = Path(path)
    if p.is_dir():
        weights = sorted(p.glob("diffusion_pytorch_model*.safetensors"))
        return file_sha256(weights[0]) if weights else None
    return file_sha256(p) if p.is_file() else None


def infotext_fields(specs) -> dict[str, str]:
    """A1111 sd-webui-controlnet's fields: `ControlNet N: "Module: ..., Model: name [hash], Weight: ...,
    Resize Mode: ..., Guidance Start: ..., Guidance End: ..., Control Mode: ..."` (hash: sha256's first 8)."""
    out = {}
    for k, s in enumerate(specs):
        digest = (_sha256(s.model) or "")[:8]
        mode = "My prompt is more important" if s.guess_mode else "Balanced"
        out[f"ControlNet {k}"] = (f"Module: {s.preprocess or 'none'}, Model: {Path(s.model).stem} [{digest}], "
                                  f"Weight: {s.weight:g}, Resize Mode: {RESIZE_LABELS[s.resize]}, "
                                  f"Guidance Start: {s.start:g}, Guidance End: {s.end:g}, Control Mode: {mode}")  # fmt: skip
    return out


def recorded(specs) -> list[dict]:
    """sdcli's JSON: every setting, file names (not the user's folders) and the files' sha256."""
    return [{**s.to_dict(), "model": Path(s.model).name, "image": Path(s.image).name,
             "model_sha256": _sha256(s.model), "image_sha256": _sha256(s.image)} for s in specs]  # fmt: skip


def put_record(config: dict, specs) -> None:
    """A recorded config's `controlnets` (save.metadata, and resume comparing an image with its job): the
    units as `recorded` lists them; absent without units, so such images keep their record as it was."""
    if specs:
        config["controlnets"] = recorded(specs)
    else:
        config.pop("controlnets", None)


def replayed(entries: Any, image: Path, models: list[str], images: list[str]) -> list[dict]:
    """The recorded units of `image` as unit objects for this run: models from --controlnet (n-th flag, n-th
    unit), hints from --control-image or beside the image under the recorded name. Exit 2 saying what to give."""
    where = f"{image} (metadata)"
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadInputError(f"{where}: 'controlnets' must be a list of objects")
    if len(models) != len(entries):
        names = quote_list(str(e.get("model")) for e in entries)  # from the image's metadata: bounded
        raise UsageError(f"{image} was made with {len(entries)} ControlNet unit(s) ({names}): give each file again "
                         f"with --controlnet FILE, in order ({len(models)} given)")  # fmt: skip
    if images and len(images) != len(entries):
        raise UsageError(f"option --control-image: one per recorded ControlNet unit ({len(entries)})")
    units = []
    for k, entry in enumerate(entries):
        hint = images[k] if images else str(image.parent / Path(str(entry.get("image", ""))).name)
        if not Path(hint).is_file():
            raise UsageError(f"{image} was made with control image {quote(repr(entry.get('image')))} (unit {k}), "
                             "which is not beside it: give it with --control-image FILE")  # fmt: skip
        units.append({**{key: entry[key] for key in KEYS if key in entry}, "model": models[k], "image": hint})
    parse_specs(units, where)
    return units


# --- inspect ------------------------------------------------------------------------------------

def inspect_report(path: Path, hashes: bool = True) -> dict | None:
    """`sdcli inspect` on a ControlNet file or folder (controlnet_files.describe), or None when `path` is not
    one (then it is inspected as a checkpoint). Only headers are read (a .pth is unpickled, restricted)."""
    from sdcli.control.files import describe, detect_controlnet, open_controlnet
    from sdcli.models.unet import UNetConfig

    looks_like = (path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").exists()
                  or path.is_file() and path.suffix.lower() in (".safetensors", ".pth"))  # fmt: skip
    if not looks_like:
        return None
    if path.is_dir():  # a config.json that cannot be read is named as such, not taken for another kind of folder
        from sdcli.formats.diffusers import read_json_object

        read_json_object(path / "config.json", "config")
    try:  # Control-LoRA, T2I-Adapter and other look-alikes are refused here, named (exit 8)
        open_controlnet(path)[0].close()
    except BadInputError:
        return None  # not a ControlNet: the checkpoint report says what it is
    # The attention head split is in no file and not shown: a neutral one, so any width is read.
    info, source = detect_controlnet(path, UNetConfig(num_heads=1, head_dim=None))
    source.close()
    report = {"kind": "controlnet", "path": str(path), "family": info.family, "layout": info.layout,
              "hint_channels": info.config.hint_channels, "bgr": info.bgr, "global_pool": info.config.global_pool,
              "parameters": info.params, "dtypes": info.dtypes, "about": describe(info)}  # fmt: skip
    if hashes:
        report["sha256"] = _sha256(str(path))
    return report
