"""Helpers for the reliability tests: run the REAL `sdcli` command (Typer's CliRunner on sdcli.cli.app, or a
subprocess where signals and pipes matter) and check the contract of RELIABILITY.md: one `error:` line on
stderr, the documented exit code, no traceback, no partial or temp file left behind.

Import in a test module with ``from _fixtures_reliability import *  # noqa: F403``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sdcli.cli import app

ROOT = Path(__file__).resolve().parents[1]


class _Runner(CliRunner):
    """CliRunner that builds the click command from the Typer app once (Typer rebuilds it on every invoke,
    ~30 ms of signature parsing, which dominates the fuzz tests' hundreds of calls)."""

    _command = None

    def invoke(self, app_, *args, **kwargs):
        import typer.main
        import typer.testing

        if _Runner._command is None:
            _Runner._command = typer.main.get_command(app_)
        real, typer.testing._get_command = typer.testing._get_command, lambda _app: _Runner._command
        try:
            return super().invoke(app_, *args, **kwargs)
        finally:
            typer.testing._get_command = real


RUNNER = _Runner()

__all__ = ["ROOT", "deadline", "cli", "assert_clean_error", "files_in", "temp_files", "render_args", "one_thread",
           "isolated", "run_module", "sdcli_meta"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny models are dispatch-bound, and on a shared 2-core box two spinning
    threads per test process make each conv ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user config, no debug tracebacks, run inside the test's own folder."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("SDCLI_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)


def cli(*args: str, input: str | bytes | None = None):
    """Invoke the real command in-process; never lets a traceback or an exception escape unnoticed."""
    result = RUNNER.invoke(app, [str(a) for a in args], input=input)
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"exception escaped the CLI: {result.exception!r}\n{result.output}")
    return result


def assert_clean_error(result, code: int, *needles: str) -> str:
    """Exit `code`, exactly one non-empty stderr line, starting 'error:' and containing every needle."""
    assert result.exit_code == code, f"exit {result.exit_code} != {code}: {result.output}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def temp_files(folder: Path) -> list[str]:
    """Leftovers of an interrupted atomic write (output/targets.py names them .NAME.XXXX.tmp)."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.name.endswith((".tmp", ".partial")))


def render_args(model: Path, *extra: str, steps: int = 1, size: int = 64) -> list[str]:
    """A fast txt2img command line on the tiny model."""
    return ["generate", "a cat", "--model", str(model), "--steps", str(steps), "-W", str(size), "-H", str(size),
            "--sampler", "euler", "--seed", "1", "--dtype", "fp32", "--device", "cpu", *extra]


def run_module(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    """Start `python -m sdcli ARGS` in its own process (for real signals and pipes). PYTHONPATH names this
    checkout: run from `cwd`, `-m sdcli` would otherwise import whatever sdcli the venv has installed."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CONFIG_HOME=str(cwd / "xdg"), NO_COLOR="1", PYTHONPATH=path)
    env.pop("SDCLI_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "sdcli", *map(str, args)], cwd=cwd, env=env,
                            preexec_fn=_interruptible if os.name == "posix" else None, **kw)


def _interruptible() -> None:
    # The child starts as from a terminal: a suite started in the background by a non-interactive shell inherits
    # SIGINT ignored (Python then never raises KeyboardInterrupt) and under nohup SIGHUP ignored (which sdcli
    # keeps, by design): a test's Ctrl-C or hang-up would be lost.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def sdcli_meta(png: Path) -> dict:
    """The sdcli JSON metadata chunk of a PNG we wrote."""
    import json

    from PIL import Image

    from sdcli.output.metadata import SDCLI_JSON_KEY

    with Image.open(png) as img:
        return json.loads(img.text[SDCLI_JSON_KEY])


@contextmanager
def deadline(seconds: int, what: str):
    """Fail (instead of hanging the suite) when one command runs past `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"hang: {what} ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
