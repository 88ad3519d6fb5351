"""Checkpoint sha256 is cached on disk per (path, size, mtime): used when valid, ignored when the file changed
or the cache is damaged or cannot be written."""

import hashlib
import json
import os

from sdcli.formats import hashing


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_SHA_CACHE", {})


def test_disk_cache_is_used_and_invalidated_by_mtime(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path)
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert hashing.file_sha256(f) == real
    cache = tmp_path / "cache" / "sdcli" / "sha256.json"
    data = json.loads(cache.read_text())
    assert list(data.values()) == [real]
    # A later process (empty memory cache) takes the hash from disk without reading the file.
    data = {k: "0" * 64 for k in data}
    cache.write_text(json.dumps(data))
    monkeypatch.setattr(hashing, "_SHA_CACHE", {})
    assert hashing.file_sha256(f) == "0" * 64
    # The file changed (new mtime): hashed again.
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    monkeypatch.setattr(hashing, "_SHA_CACHE", {})
    assert hashing.file_sha256(f) == real


def test_damaged_or_unwritable_cache_is_harmless(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path)
    cache = tmp_path / "cache" / "sdcli" / "sha256.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    f = tmp_path / "m.bin"
    f.write_bytes(b"x")
    assert hashing.file_sha256(f) == hashlib.sha256(b"x").hexdigest()
    monkeypatch.setenv("XDG_CACHE_HOME", str(f))  # a file where the folder should be: cannot write
    monkeypatch.setattr(hashing, "_SHA_CACHE", {})
    assert hashing.file_sha256(f) == hashlib.sha256(b"x").hexdigest()
