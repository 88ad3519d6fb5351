"""SIGTERM and SIGHUP (issue 12, item 11) are handled like Ctrl-C: the images finished so far are kept, no temp
file is left, one `error:` line, exit 128 + the signal (143, 129). Real signals go to a real `python -m sdcli`."""

from __future__ import annotations

import os
import signal
import time

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403

import sdcli.output.targets
from sdcli.runtime.errors import Terminated


def test_termination_while_an_image_is_written_keeps_the_finished_ones(tiny_sd1, tmp_path, monkeypatch):
    """Terminated (what the SIGTERM handler raises) while image 3 of 4 is in its temp file."""
    syncs = []
    real = os.fsync

    def fsync(fd):
        syncs.append(fd)
        if len(syncs) == 3:
            raise Terminated(signal.SIGTERM)
        return real(fd)

    monkeypatch.setattr(sdcli.output.targets.os, "fsync", fsync)
    result = cli(*render_args(tiny_sd1, "-n", "4", "-o", "out/{index}.png"))
    assert_clean_error(result, 143, "terminated by SIGTERM", "kept")
    assert files_in(tmp_path / "out") == ["0.png", "1.png"] and temp_files(tmp_path) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_real_signal_mid_batch_exits_128_plus_signal(tiny_sd1, tmp_path, sig, code):
    proc = run_module(render_args(tiny_sd1, "-n", "40", "-o", "out/{index:02d}.png"), tmp_path,
                      stdout=-1, stderr=-1)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and len(list(out.glob("*.png"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1].decode()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: terminated by {signal.Signals(sig).name}; finished images were kept"]
    kept = files_in(out)
    assert 2 <= len(kept) < 40 and kept == [f"{i:02d}.png" for i in range(len(kept))]
    assert temp_files(tmp_path) == []
