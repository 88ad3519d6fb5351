"""sha256 of model files, cached per (path, size, mtime) in memory and on disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from sdcli.runtime.paths import xdg_path

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


def _hash_cache_path() -> Path | None:
    return xdg_path("XDG_CACHE_HOME", ".cache", "sdcli", "sha256.json")  # None: no home, so no cache


def _cache_key(key: tuple[str, int, int]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CACHE_KEY = re.compile(r".+\|[0-9]+\|-?[0-9]+")
_MAX_HASH_CACHE = 16 << 20  # bytes; ~100k entries


def _read_hash_cache() -> dict[str, str]:
    """The well-formed entries of the disk cache: anything else (not a regular file, too big, not JSON, a value
    that is not 64 lowercase hex digits) is dropped, so a damaged cache is rebuilt, never believed."""
    path = _hash_cache_path()
    try:
        if path is None or not path.is_file() or path.stat().st_size > _MAX_HASH_CACHE:  # a FIFO would block the read
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}  # no cache yet, or a damaged one: hashing again is always correct
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str) and _SHA256_HEX.fullmatch(v)
            and _CACHE_KEY.fullmatch(k)}  # fmt: skip


def _write_hash_cache(data: dict[str, str]) -> None:
    """Best effort, atomic: a read-only home or a full disk only costs the next run a re-hash."""
    path = _hash_cache_path()
    if path is None:
        return
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
