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
    return _cached(path, "", lambda f: f)


def body_sha256(path: str | Path) -> str:
    """kohya's "addnet" hash of a safetensors file: the sha256 of the bytes after the header (A1111's AutoV3), so
    that editing a file's metadata does not change it. Cached as file_sha256 is."""

    def skip_header(f):
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        return f

    return _cached(path, "body:", skip_header)


def a1111_lora_hash(path: str | Path) -> str:
    """The hash A1111 writes for a LoRA in "Lora hashes" (its first 12 digits): the file's own sshs_model_hash
    metadata if it has one, else the addnet hash for safetensors, else the whole file's sha256
    (extensions-builtin/Lora/network.py, NetworkOnDisk)."""
    if Path(path).suffix.lower() != ".safetensors":
        return file_sha256(path)
    from sdcli.formats.safetensors import read_header

    meta = read_header(path).get("__metadata__")
    given = meta.get("sshs_model_hash") if isinstance(meta, dict) else None
    if isinstance(given, str) and _SHA256_HEX.fullmatch(given.lower()):
        return given.lower()
    return body_sha256(path)


def _cached(path: str | Path, tag: str, position) -> str:
    """sha256 of what `position(file)` leaves to read, cached under `tag` + (path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (tag + str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        disk = _read_hash_cache()
        known = disk.get(_cache_key(key))
        if known is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                f = position(f)
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
