"""`sdcli inspect --list`: the model files in the configured folders (or the folders given), one line each: what
each is, the family it is for, its name and path. JSON: one object a line.

The configured folders are the config's lora_dir, embeddings_dir, vae_dir and upscaler_dir (searched with their
sub-folders, as the commands search them) and the folder of the configured model (its own level only). Each file is
told from its header alone, without hashing: a listing of a large folder stays quick. A pickled .ckpt (or any pickle
over PICKLE_LIMIT) is not opened: unpickling means reading it all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import typer

from sdcli.runtime import console
from sdcli.runtime.errors import ModelNotFoundError, SdcliError, UsageError

# --kind values -> the report kinds they show (singular or plural, as typed)
GROUPS = {"models": ("checkpoint",), "loras": ("lora",), "embeddings": ("textual_inversion",),
          "vaes": ("vae", "taesd"), "controlnets": ("controlnet",), "upscalers": ("upscaler",),
          "text-encoders": ("text_encoder",)}  # fmt: skip
FOLDER_KEYS = ("lora_dir", "embeddings_dir", "vae_dir", "upscaler_dir")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
PICKLE_LIMIT = 512 << 20  # bytes: a bigger pickle is a checkpoint, not opened by a listing


def run_list(folders: list[Path], kinds: list[str] | None, config_file: Path | None, json_out: bool,
             inspect_path: Callable[[Path, bool], dict]) -> None:
    """`inspect_path(path, hashes)`: inspect.py's report of one file (passed in: inspect.py imports this module)."""
    wanted = _wanted(kinds)
    roots = [(str(f), Path(f), True) for f in folders] or _configured(config_file)
    worst = 0
    for label, root, recursive in roots:
        try:
            entries = list_folder(root, inspect_path, recursive)
        except SdcliError as e:
            console.error(f"{label}: {e}" if label not in str(e) else str(e))
            worst = max(worst, e.exit_code)
            continue
        entries = [e for e in entries if wanted is None or e["kind"] in wanted]
        widths = [max((len(_columns(e)[i]) for e in entries), default=0) for i in range(3)]
        for entry in entries:
            typer.echo(json.dumps(entry, ensure_ascii=False) if json_out else _line(entry, widths))
    if worst:
        raise typer.Exit(worst)


def _wanted(kinds: list[str] | None) -> set[str] | None:
    if not kinds:
        return None
    out: set[str] = set()
    for kind in (k.strip().lower() for item in kinds for k in item.split(",") if k.strip()):
        group = GROUPS.get(kind) or GROUPS.get(kind + "s") or GROUPS.get(kind.replace("_", "-") + "s")
        if group is None:
            raise UsageError(f"option --kind: {kind!r} is not one of {', '.join(GROUPS)}")
        out.update(group)
    return out


def _configured(config_file: Path | None) -> list[tuple[str, Path, bool]]:
    """(config key, folder, recursive) for each folder the configuration names."""
    from sdcli import config as cfgmod

    cfg = cfgmod.resolve({}, config_file)
    roots = [(key, Path(getattr(cfg, key)).expanduser(), True) for key in FOLDER_KEYS if getattr(cfg, key)]
    if cfg.model and Path(cfg.model).expanduser().is_file():
        roots.insert(0, ("model", Path(cfg.model).expanduser().parent, False))
    if not roots:
        raise UsageError("no folders to list: set lora_dir, embeddings_dir, vae_dir or upscaler_dir in a config "
                         "(sdcli generate --print-config shows them), or name folders: sdcli inspect --list DIR")
    return roots


def list_folder(root: Path, inspect_path: Callable[[Path, bool], dict], recursive: bool = True) -> list[dict[str, Any]]:
    """One entry per model file or diffusers folder under `root`, in sorted order (links followed, as A1111)."""
    if not root.is_dir():
        raise ModelNotFoundError(f"{root}: no such folder")
    out = []
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        here_path = Path(here)
        if here_path != root and (here_path / "model_index.json").is_file():
            out.append(describe(here_path, root, inspect_path))
            dirs.clear()  # a diffusers model: one entry, its parts are not files of their own
            continue
        out += [describe(here_path / name, root, inspect_path) for name in sorted(files)
                if name.lower().endswith(MODEL_SUFFIXES)]
        if not recursive:
            break
    return out


def describe(path: Path, root: Path, inspect_path: Callable[[Path, bool], dict]) -> dict[str, Any]:
    """kind, family, name, path and size of one file, from its header; an unreadable one says why."""
    entry: dict[str, Any] = {"name": str(path.relative_to(root).with_suffix("")) if path.is_file()
                             else str(path.relative_to(root)), "path": str(path)}  # fmt: skip
    size = path.stat().st_size if path.is_file() else None
    if path.is_file() and path.suffix.lower() != ".safetensors" and _unopened(path, size):
        return {"kind": "checkpoint", "family": None, **entry, "size": size,
                "note": "a pickle: not opened by a listing (sdcli inspect FILE reads it)"}  # fmt: skip
    try:
        report = inspect_path(path, False)
    except SdcliError as e:
        return {"kind": "unknown", "family": None, **entry, "size": size, "error": str(e)}
    family = report.get("family")
    if report["kind"] == "controlnet" and str(family).startswith("context width"):
        family = None  # a width no release has (the ControlNet's report says it)
    out = {"kind": report["kind"], "family": family, **entry, "size": size}
    if "families" in report:  # a VAE, TAESD or text encoder: every family that takes it
        out["families"] = report["families"]
    return out


def _unopened(path: Path, size: int | None) -> bool:
    return path.suffix.lower() == ".ckpt" or (size or 0) > PICKLE_LIMIT and path.suffix.lower() != ".gguf"


def _columns(entry: dict[str, Any]) -> tuple[str, str, str]:
    families = entry["family"] or "/".join(entry.get("families") or ()) or "-"
    return entry["kind"], families, entry["name"]


def _line(entry: dict[str, Any], widths: list[int]) -> str:
    """`KIND  FAMILY  NAME  PATH`, the columns padded to the folder's widest; an error after the path."""
    columns = "  ".join(c.ljust(w) for c, w in zip(_columns(entry), widths))
    return f"{columns}  {entry['path']}" + (f"  ({entry['error']})" if "error" in entry else "")
