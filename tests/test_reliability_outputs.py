"""Output safety through the real command (RELIABILITY.md "Output and environment"): no overwrite without
--overwrite, temp file + rename in the target folder, Ctrl-C mid-batch exits 130 keeping finished images and no
temp file, read-only folder / full disk are exit 7, `-o -` only for one image, a closed stdout pipe is exit 7
without a traceback. Signals and pipes are tested on a real `python -m sdcli` process."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403

import sdcli.output.targets


def test_existing_target_is_refused_before_any_work(tiny_sd1, tmp_path, monkeypatch):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    before = target.stat().st_mtime_ns
    loaded = []
    monkeypatch.setattr("sdcli.loading.checkpoint.load_models", lambda *a, **k: loaded.append(1))
    assert_clean_error(cli(*render_args(tiny_sd1, "-o", "keep.png")), 7, "keep.png", "--overwrite")
    assert target.read_bytes() == b"precious" and target.stat().st_mtime_ns == before
    assert loaded == []  # refused up front, the model was never loaded


def test_output_is_written_to_a_temp_file_in_the_target_folder_then_renamed(tiny_sd1, tmp_path, monkeypatch):
    renames = []
    real = os.link  # a new name is published with a hard link (it cannot replace a name), then the temp unlinked

    def spy(src, dst):
        if os.fspath(dst).endswith(".png"):  # os is shared: other renames (e.g. the hash cache) are not outputs
            renames.append((os.fspath(src), os.fspath(dst)))
        return real(src, dst)

    monkeypatch.setattr(sdcli.output.targets.os, "link", spy)
    result = cli(*render_args(tiny_sd1, "-o", "sub/out.png"))
    assert result.exit_code == 0, result.output
    [(src, dst)] = renames
    assert os.path.samefile(os.path.dirname(src), os.path.dirname(os.path.abspath(dst))) and os.path.basename(src).startswith(".out.png.")
    assert files_in(tmp_path / "sub") == ["out.png"] and temp_files(tmp_path) == []


def test_ctrl_c_in_the_middle_of_a_batch_keeps_finished_images(tiny_sd1, tmp_path, monkeypatch):
    """KeyboardInterrupt while image 3 of 4 is being written (its temp file exists at that moment)."""
    syncs = []
    real = os.fsync

    def fsync(fd):
        syncs.append(fd)
        assert temp_files(tmp_path), "the image is written to a temp file first"
        if len(syncs) == 3:
            raise KeyboardInterrupt
        return real(fd)

    monkeypatch.setattr(sdcli.output.targets.os, "fsync", fsync)
    result = cli(*render_args(tiny_sd1, "-n", "4", "-o", "out/{index}.png"))
    assert_clean_error(result, 130, "interrupted")
    assert files_in(tmp_path / "out") == ["0.png", "1.png"]
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("code, what", [(errno.EACCES, "Permission denied"), (errno.ENOSPC, "No space left")])
def test_read_only_folder_or_full_disk_is_exit_7(tiny_sd1, tmp_path, monkeypatch, code, what):
    """Root ignores permission bits, so the OS error is raised where the write would fail."""
    real = os.fsync

    def failing(fd):
        if code == errno.ENOSPC:
            raise OSError(code, os.strerror(code))
        return real(fd)

    def mkstemp(*args, **kwargs):
        raise PermissionError(code, os.strerror(code))

    if code == errno.EACCES:
        monkeypatch.setattr(sdcli.output.targets.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(sdcli.output.targets.os, "fsync", failing)
    result = cli(*render_args(tiny_sd1, "-o", "out.png"))
    assert_clean_error(result, 7, "out.png", what)
    assert files_in(tmp_path) == [] and temp_files(tmp_path) == []


def test_stdout_output_with_several_images_is_a_usage_error(tiny_sd1):
    assert_clean_error(cli(*render_args(tiny_sd1, "-n", "2", "-o", "-")), 2, "-o -", "2 images")


def test_stdout_output_writes_one_png_and_nothing_else(tiny_sd1, tmp_path):
    result = cli(*render_args(tiny_sd1, "-o", "-"))
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes.startswith(b"\x89PNG\r\n\x1a\n") and result.stdout_bytes.endswith(b"IEND\xaeB`\x82")
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- real processes


def test_closed_stdout_pipe_is_exit_7_without_traceback(tiny_sd1, tmp_path):
    """`sdcli generate ... -o - | head -c 0`: the reader is gone before the PNG is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = run_module(render_args(tiny_sd1, "-o", "-"), tmp_path, stdout=write_end, stderr=-1)
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 7, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: stdout: the pipe was closed before the output was written"]


def test_real_sigint_mid_batch_exits_130_and_keeps_finished_images(tiny_sd1, tmp_path):
    proc = run_module(render_args(tiny_sd1, "-n", "40", "-o", "out/{index:02d}.png"), tmp_path,
                      stdout=-1, stderr=-1)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(list(out.glob("*.png"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "error: interrupted" in err
    kept = files_in(out)
    assert 2 <= len(kept) < 40 and kept == [f"{i:02d}.png" for i in range(len(kept))]
    assert temp_files(tmp_path) == []
