"""Output names and safe writing: refuse overwrite, atomic temp+rename, disk errors, stdout."""

import errno
import io
import os
import sys
import types

import pytest
from PIL import Image

from sdcli.output import targets as outputs
from sdcli.runtime.errors import OutputError, UsageError
from sdcli.output.targets import atomic_write_bytes, expand_template, save_png, slugify


def _img():
    return Image.new("RGB", (16, 8), (200, 100, 50))


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_expand_template_fields_and_specs():
    p = expand_template("out/{seed}_{index:03d}_{prompt}.png", index=7, seed=42, prompt="A cat, on a mat!")
    assert str(p) == "out/42_007_A_cat_on_a_mat.png"


def test_prompt_slug_is_safe_and_capped():
    slug = slugify("../../etc/passwd " + "x" * 500)
    assert "/" not in slug and not slug.startswith(".")
    assert len(slug.encode()) <= outputs.PROMPT_SLUG_MAX_BYTES
    assert slugify("🐱🐱") == "untitled"
    assert slugify("猫の写真") == "猫の写真"
    assert len(slugify("猫" * 200).encode()) <= outputs.PROMPT_SLUG_MAX_BYTES


@pytest.mark.parametrize("template", ["{name}.png", "{}.png", "{0}.png", "{seed.png", "{index:zz}.png"])
def test_bad_templates(template):
    with pytest.raises(UsageError):
        expand_template(template, index=0, seed=1, prompt="p")


def test_save_png_refuses_overwrite(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists"):
        save_png(_img(), target, "x", {})
    assert target.read_bytes() == b"keep me"
    save_png(_img(), target, "x", {}, overwrite=True)
    assert Image.open(target).size == (16, 8)
    assert _leftovers(tmp_path) == ["a.png"]


def test_save_png_creates_folders_and_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "dir" / "b.png"
    save_png(_img(), target, "x", {})
    mode = target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("boom")])
def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc):
    real_fdopen = os.fdopen

    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        real_write = f.write

        def write(data):
            real_write(data[: len(data) // 2])  # half of the file is on disk when the interrupt hits
            raise exc

        f.write = write
        return f

    monkeypatch.setattr(outputs.os, "fdopen", fdopen)
    with pytest.raises(type(exc)):
        save_png(_img(), tmp_path / "c.png", "x", {})
    assert _leftovers(tmp_path) == []


# A new name is published with os.link (fails if the name exists); --overwrite renames over the old file.
PUBLISH = [("link", False), ("replace", True)]


@pytest.mark.parametrize("primitive, overwrite", PUBLISH)
def test_interrupt_at_rename_leaves_nothing(tmp_path, monkeypatch, primitive, overwrite):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.os, primitive, interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_png(_img(), tmp_path / "d.png", "x", {}, overwrite=overwrite)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("primitive, overwrite", PUBLISH)
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_disk_errors_become_output_error(tmp_path, monkeypatch, code, primitive, overwrite):
    def failing(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(outputs.os, primitive, failing)
    with pytest.raises(OutputError, match="e.png") as info:
        save_png(_img(), tmp_path / "e.png", "x", {}, overwrite=overwrite)
    assert os.strerror(code) in str(info.value)
    assert _leftovers(tmp_path) == []


def test_unwritable_folder_without_monkeypatch(tmp_path):
    # Running as root makes chmod useless; a regular file used as a folder fails for everyone.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="f.png"):
        save_png(_img(), blocker / "f.png", "x", {})
    with pytest.raises(OutputError, match="proc"):
        atomic_write_bytes("/proc/sdcli-test.png", b"x")


def test_target_is_a_directory(tmp_path):
    with pytest.raises(OutputError, match="directory"):
        atomic_write_bytes(tmp_path, b"x", overwrite=True)


def _fake_stdout(monkeypatch, buffer):
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(buffer=buffer))


def test_dash_writes_png_to_stdout(monkeypatch, tmp_path):
    buf = io.BytesIO()
    _fake_stdout(monkeypatch, buf)
    assert str(save_png(_img(), "-", "hello", {"a": 1})) == "-"
    data = buf.getvalue()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    img = Image.open(io.BytesIO(data))
    assert img.text["parameters"] == "hello"
    assert _leftovers(tmp_path) == []


def test_broken_pipe_is_output_error(monkeypatch):
    class Closed(io.BytesIO):
        def write(self, data):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    _fake_stdout(monkeypatch, Closed())
    with pytest.raises(OutputError, match="stdout"):
        save_png(_img(), "-", "x", {})


def test_save_png_is_deterministic(tmp_path):
    a = save_png(_img(), tmp_path / "a.png", "text", {"k": [1, 2]})
    b = save_png(_img(), tmp_path / "b.png", "text", {"k": [1, 2]})
    assert a.read_bytes() == b.read_bytes()
