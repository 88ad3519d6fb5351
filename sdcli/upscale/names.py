"""Upscaler names as A1111 spells them, for the hires fix (`--hires-upscaler`) and `sdcli upscale --upscaler`:
its latent modes, its PIL resizes, and model files found by name in an upscaler folder laid out as A1111's
``models/`` folder (``ESRGAN/``, ``RealESRGAN/``, ...).

No torch here: the config check and `--print-config` use it, and a name is resolved (a missing file is exit 4)
before any model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdcli.runtime.errors import ModelNotFoundError, quote

DEFAULT = "Latent"  # the hires fix's upscaler when none is named: sdcli's behaviour before upscalers

# A1111 shared_items / shared.latent_upscale_modes: name -> (F.interpolate mode, antialias)
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# A1111 modules/upscaler.py: UpscalerLanczos, UpscalerNearest, UpscalerNone (a plain Lanczos to the target)
RESIZES = {"Lanczos": "lanczos", "Nearest": "nearest", "None": "none"}

# A1111's built-in model upscalers -> the stem of the release file it downloads into models/RealESRGAN or
# models/ESRGAN (modules/realesrgan_model.py get_realesrgan_models, modules/esrgan_model.py UpscalerESRGAN).
BUILTIN_FILES = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "ESRGAN_4x": "ESRGAN_4x",
}
SUBFOLDERS = ("ESRGAN", "RealESRGAN", "DAT", "SwinIR", "ScuNET", "HAT")  # A1111's models/<upscaler> folders
SUFFIXES = (".pth", ".safetensors", ".pt")

_BUILTIN_BY_LOWER = {name.lower(): name for name in (*LATENT_MODES, *RESIZES)}


@dataclass(frozen=True)
class UpscalerChoice:
    """What an upscaler name means."""

    name: str  # as A1111 writes it ("Latent (antialiased)", "Lanczos", "4x-UltraSharp"): the infotext's value
    kind: str  # "latent" | "resize" | "model"
    mode: str = ""  # latent: the F.interpolate mode; resize: "lanczos" | "nearest" | "none"
    antialias: bool = False  # latent modes only
    path: Path | None = None  # model files only


def _is_path(value: str) -> bool:
    """A value that names a file rather than an upscaler: it has a folder in it or a weights suffix."""
    return "/" in value or os.sep in value or value.lower().endswith(SUFFIXES)


def canonical(value: str) -> str:
    """A built-in name in A1111's spelling, whatever case it was given in; any other value as it is."""
    return _BUILTIN_BY_LOWER.get(value.strip().lower(), value)


def display_name(value: str) -> str:
    """The name A1111 shows and writes for `value`, without looking at the disk: a built-in name in its own
    spelling (any case given), a file's stem (A1111 lists user models by file name without extension), else
    the name as given."""
    value = value.strip()
    if value.lower() in _BUILTIN_BY_LOWER:
        return _BUILTIN_BY_LOWER[value.lower()]
    return Path(value).stem if _is_path(value) else value


def choose(value: str, folder: str | None) -> UpscalerChoice:
    """What `value` names: a latent mode, a PIL resize, or a model file (a path, or a name looked up in
    `folder`). ModelNotFoundError (exit 4) names the file looked for and where."""
    name = display_name(value)
    if name in LATENT_MODES:
        mode, antialias = LATENT_MODES[name]
        return UpscalerChoice(name, "latent", mode, antialias)
    if name in RESIZES:
        return UpscalerChoice(name, "resize", RESIZES[name])
    return UpscalerChoice(name, "model", path=find_model(value.strip(), folder))


def find_model(value: str, folder: str | None) -> Path:
    """The upscaler file `value` names: a path as it is, else NAME.pth / .safetensors / .pt (A1111's built-in
    names by their release file's stem) in `folder`'s A1111 sub-folders, the folder itself, then anywhere below."""
    if _is_path(value) or Path(value).expanduser().is_file():
        path = Path(value).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"upscaler {quote(value)}: no such file")
        return path
    stems = list(dict.fromkeys([BUILTIN_FILES.get(value, value), value]))
    wanted = " or ".join(f"{quote(s, 120)}.pth/.safetensors" for s in stems)
    if not folder:
        raise ModelNotFoundError(f"upscaler '{quote(value, 120)}': not a latent mode, Lanczos, Nearest, None or a "
                                 f"file; to find {wanted} by name give --upscaler-dir DIR (upscaler_dir: in a config)")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(f"upscaler_dir {quote(folder)}: no such folder (looking for {wanted})")
    found = _direct(root, stems) or _below(root, stems)
    if found is None:
        places = ", ".join(f"{s}/" for s in SUBFOLDERS)
        raise ModelNotFoundError(f"upscaler '{quote(value, 120)}': {wanted} not found under {quote(folder)} (looked "
                                 f"in {places}, the folder itself and every sub-folder)")
    return found


def _direct(root: Path, stems: list[str]) -> Path | None:
    for sub in (*SUBFOLDERS, ""):
        for stem in stems:
            for suffix in SUFFIXES:
                path = root / sub / f"{stem}{suffix}"
                if path.is_file():
                    return path
    return None


def _below(root: Path, stems: list[str]) -> Path | None:
    """The first file (in sorted path order, so the same one every time) anywhere under `root` whose stem is
    one of `stems`, with a weights suffix (A1111 walks its model folders recursively)."""
    matches = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            stem, suffix = os.path.splitext(f)
            if stem in stems and suffix.lower() in SUFFIXES:
                matches.append(Path(dirpath) / f)
    return min(matches, key=lambda p: (stems.index(p.stem), str(p))) if matches else None
