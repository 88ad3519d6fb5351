"""The files of one diffusers component folder: its JSON files read safely, its weights (a shard index followed)."""

from __future__ import annotations

import json
from pathlib import Path

from sdcli.runtime.errors import BadInputError


def read_json_object(path: Path, what: str, limit: int = 16 << 20) -> dict:
    """A diffusers JSON file that must hold an object: anything else (unreadable, too big, not JSON, nested past
    Python's recursion limit, a list) is a BadInputError naming the file, never a crash."""
    try:
        if path.stat().st_size > limit:
            raise BadInputError(f"{path}: {what} is over {limit >> 20} MB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise BadInputError(f"{path}: unreadable {what} ({type(e).__name__}: {str(e)[:120]})") from e
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def component_files(folder: Path, names: tuple[str, ...]) -> list[Path]:
    """The safetensors file(s) of one diffusers component folder (a sharded index is followed)."""
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            weight_map = read_json_object(index, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or \
                    not all(isinstance(v, str) and v == Path(v).name for v in weight_map.values()):
                raise BadInputError(f"{index}: 'weight_map' must map tensor names to shard file names in this folder")
            return [folder / s for s in sorted(set(weight_map.values()))]
    raise BadInputError(f"{folder}: no weights found (expected {' or '.join(names)}; .bin pickles are not read)")
