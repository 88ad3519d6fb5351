"""sha256 of model files, cached per (path, size, mtime) in memory and on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a whole file, read in 8 MiB chunks. Cached per (path, size, mtime) in memory and in
    $XDG_CACHE_HOME/sdcli/sha256.json, so a shell loop of renders hashes a 2 GB checkpoint once, not per run."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        disk = _read_hash_cache()
        known = disk.get(_cache_key(key))
        if known is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            known = h.hexdigest()
            _write_hash_cache({**disk, _cache_key(key): known})
        _SHA_CACHE[key] = known
    return _SHA_CACHE[key]


def _hash_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdcli" / "sha256.json"


def _cache_key(key: tuple[str, int, int]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def _read_hash_cache() -> dict[str, str]:
    try:
        data = json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hashing again is always correct
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _write_hash_cache(data: dict[str, str]) -> None:
    """Best effort, atomic: a read-only home or a full disk only costs the next run a re-hash."""
    path = _hash_cache_path()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
