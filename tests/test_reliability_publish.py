"""Publishing outputs (issue 12, items 2, 3, 11): only regular files are ever replaced (--overwrite or not, a
device, pipe, socket, folder or symbolic link at the target is exit 7 and stays as it was); a new name is
published with a primitive that fails when the name exists, so of two runs racing for one name exactly one wins;
stale temp files of our naming left by a killed run are cleaned by a later write into the same folder."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403

import sdcli.output.targets as outputs
from sdcli.runtime.errors import OutputError


def _no_model_load(monkeypatch) -> list:
    loaded = []
    monkeypatch.setattr("sdcli.loading.checkpoint.load_models", lambda *a, **k: loaded.append(1))
    return loaded


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_named_pipe_at_the_target_is_never_replaced(tiny_sd1, tmp_path, monkeypatch, overwrite):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    loaded = _no_model_load(monkeypatch)
    result = cli(*render_args(tiny_sd1, "-o", "pipe.png", *overwrite))
    assert_clean_error(result, 7, "pipe.png", "named pipe" if overwrite else "")
    assert os.path.exists(fifo) and os.stat(fifo).st_mode & 0o170000 == 0o010000  # still a FIFO
    assert loaded == []  # refused before the model load


def test_symlink_to_a_device_is_never_replaced(tiny_sd1, tmp_path, monkeypatch):
    """`-o link --overwrite` with link -> /dev/null: the link is not followed to the device, nor replaced."""
    link = tmp_path / "null.png"
    link.symlink_to("/dev/null")
    loaded = _no_model_load(monkeypatch)
    result = cli(*render_args(tiny_sd1, "-o", "null.png", "--overwrite"))
    assert_clean_error(result, 7, "null.png", "symbolic link to a character device")
    assert os.readlink(link) == "/dev/null" and loaded == []


def test_socket_and_link_to_a_file_are_not_replaced_either(tmp_path):
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(OutputError, match="socket"):
            outputs.atomic_write_bytes(sock_path, b"png", overwrite=True)
    (tmp_path / "real.png").write_bytes(b"keep")
    (tmp_path / "link.png").symlink_to("real.png")
    with pytest.raises(OutputError, match="symbolic link to a regular file"):
        outputs.atomic_write_bytes(tmp_path / "link.png", b"png", overwrite=True)
    assert (tmp_path / "real.png").read_bytes() == b"keep" and os.path.islink(tmp_path / "link.png")
    assert temp_files(tmp_path) == []


def test_a_pipe_that_appears_after_the_check_is_still_not_replaced(tmp_path, monkeypatch):
    """The kind is checked again right before the rename, not only when the run starts."""
    target = tmp_path / "late.png"
    real = outputs._write_temp

    def write_then_pipe(folder, name, data):
        tmp = real(folder, name, data)
        os.mkfifo(target)  # someone made a pipe there while we were writing
        return tmp

    monkeypatch.setattr(outputs, "_write_temp", write_then_pipe)
    with pytest.raises(OutputError, match="named pipe"):
        outputs.atomic_write_bytes(target, b"png", overwrite=True)
    assert os.stat(target).st_mode & 0o170000 == 0o010000 and temp_files(tmp_path) == []


def test_overwrite_replaces_a_regular_file(tmp_path):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    outputs.atomic_write_bytes(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new" and temp_files(tmp_path) == []


def test_two_writers_racing_for_one_name_exactly_one_wins(tmp_path, monkeypatch):
    """Both have passed the up-front check and written their temp file before either publishes."""
    target = tmp_path / "same.png"
    barrier = threading.Barrier(2)
    real = outputs._write_temp

    def write_and_wait(folder, name, data):
        tmp = real(folder, name, data)
        barrier.wait(timeout=10)  # both temp files exist, the target does not
        return tmp

    monkeypatch.setattr(outputs, "_write_temp", write_and_wait)
    results: dict[bytes, object] = {}

    def writer(data: bytes) -> None:
        try:
            outputs.atomic_write_bytes(target, data)
            results[data] = "saved"
        except OutputError as e:
            results[data] = e

    threads = [threading.Thread(target=writer, args=(d,)) for d in (b"first", b"second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    winners = [d for d, r in results.items() if r == "saved"]
    losers = [r for r in results.values() if isinstance(r, OutputError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "exists" in str(losers[0]) and losers[0].exit_code == 7
    assert target.read_bytes() == winners[0] and temp_files(tmp_path) == []


def test_without_hard_links_the_name_is_reserved_exclusively(tmp_path, monkeypatch):
    """File systems without hard links (FAT, some FUSE): O_EXCL reservation, still never replacing a name."""
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", no_links)
    outputs.atomic_write_bytes(tmp_path / "a.png", b"one")
    assert (tmp_path / "a.png").read_bytes() == b"one"
    real_write = outputs._write_temp

    def someone_else_first(folder, name, data):
        tmp = real_write(folder, name, data)
        (tmp_path / "b.png").write_bytes(b"theirs")
        return tmp

    monkeypatch.setattr(outputs, "_write_temp", someone_else_first)
    with pytest.raises(OutputError, match="exists"):
        outputs.atomic_write_bytes(tmp_path / "b.png", b"ours")
    assert (tmp_path / "b.png").read_bytes() == b"theirs" and temp_files(tmp_path) == []


def test_two_real_runs_for_one_name_one_saves_one_exits_7(tiny_sd1, tmp_path):
    procs = [run_module(render_args(tiny_sd1, "-o", "same.png", "--seed", str(seed)), tmp_path,
                        stdout=-1, stderr=-1) for seed in (1, 2)]
    outs = [(p.wait(timeout=180), p.communicate()[1].decode()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 7], outs
    winner = next(i for i, (code, _) in enumerate(outs) if code == 0)
    loser_err = outs[1 - winner][1]
    assert "Traceback" not in loser_err and "same.png" in loser_err and "exists" in loser_err
    assert sdcli_meta(tmp_path / "same.png")["seed"] == (1, 2)[winner]
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- stale temp files


def _old(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_stale_temp_files_of_our_naming_are_cleaned_by_a_later_write(tmp_path):
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no process has it
    dead = tmp_path / f".x.png.sdcli-{dead_pid}-abc123.tmp"
    old = tmp_path / f".y.png.sdcli-{os.getpid()}-def456.tmp"
    fresh_dead = tmp_path / f".z.png.sdcli-{dead_pid}-ghi789.tmp"
    live = tmp_path / f".w.png.sdcli-{os.getpid()}-jkl012.tmp"
    foreign = tmp_path / ".v.png.abc.tmp"  # not our naming: never touched
    for p in (dead, old, fresh_dead, live, foreign):
        p.write_bytes(b"half")
    _old(dead, 120)
    _old(old, 2 * outputs.STALE_AFTER_S)
    _old(foreign, 10 * outputs.STALE_AFTER_S)
    outputs._swept.discard(os.path.abspath(tmp_path))
    outputs.atomic_write_bytes(tmp_path / "new.png", b"png")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([fresh_dead.name, live.name, foreign.name, "new.png"])
