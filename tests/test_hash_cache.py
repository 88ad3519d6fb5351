"""Checkpoint sha256 is cached on disk per (path, size, mtime): used when valid, ignored when the file changed
or the cache is damaged or cannot be written."""

import hashlib
import json
import os

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401

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


BAD_VALUES = ["0" * 63, "0" * 65, "A" * 64, "g" * 64, " " + "0" * 63, "0" * 63 + "\n", "", 7, None, ["0" * 64],
              {"sha256": "0" * 64}, True]  # fmt: skip


def test_malformed_cache_values_are_never_believed_and_the_cache_is_rebuilt(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path)
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"weights")
    real = hashlib.sha256(b"weights").hexdigest()
    cache = tmp_path / "cache" / "sdcli" / "sha256.json"
    cache.parent.mkdir(parents=True)
    st = f.resolve().stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    for bad in BAD_VALUES:
        cache.write_text(json.dumps({key: bad, "junk key": "1" * 64, "/other|1|2": "2" * 64}))
        monkeypatch.setattr(hashing, "_SHA_CACHE", {})
        assert hashing.file_sha256(f) == real, bad
        # rewritten with the real hash; the malformed entries are gone, the well-formed one kept
        assert json.loads(cache.read_text()) == {key: real, "/other|1|2": "2" * 64}


def test_cache_that_is_not_a_map_or_not_a_file_is_rebuilt(tmp_path, monkeypatch):
    _fresh(monkeypatch, tmp_path)
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    cache = tmp_path / "cache" / "sdcli" / "sha256.json"
    cache.parent.mkdir(parents=True)
    for content in ['["0"]', '"abc"', "null", "[" * 100_000, '{"a": ' * 100_000]:
        cache.write_text(content)
        monkeypatch.setattr(hashing, "_SHA_CACHE", {})
        assert hashing.file_sha256(f) == hashlib.sha256(b"x").hexdigest()
        assert list(json.loads(cache.read_text()).values()) == [hashlib.sha256(b"x").hexdigest()]
    cache.unlink()
    os.mkfifo(cache)  # reading a FIFO would block for ever: it is skipped, then replaced by a real file
    monkeypatch.setattr(hashing, "_SHA_CACHE", {})
    assert hashing.file_sha256(f) == hashlib.sha256(b"x").hexdigest()
    assert cache.is_file()


def test_bad_cached_hash_never_reaches_the_png(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """Through the real command: a cache entry for the model that is not a sha256 is ignored, and the PNG
    records the file's real hash."""
    from PIL import Image
    from typer.testing import CliRunner

    from sdcli.cli import app

    _fresh(monkeypatch, tmp_path)
    model = tiny_sd1
    real = hashlib.sha256(model.read_bytes()).hexdigest()
    st = model.resolve().stat()
    cache = tmp_path / "cache" / "sdcli" / "sha256.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}": "<script>" + "0" * 56}))
    out = tmp_path / "o.png"
    result = CliRunner().invoke(app, ["generate", "a cat", "--model", str(model), "--steps", "1", "-W", "64", "-H",
                                      "64", "--dtype", "fp32", "--device", "cpu", "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        assert f"Model hash: {real[:10]}" in img.text["parameters"]
        assert json.loads(img.text["sdcli"])["model"]["sha256"] == real
