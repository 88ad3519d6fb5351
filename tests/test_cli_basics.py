"""CLI surface that needs no model: help, version, config printing, usage errors and their exit codes."""

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from sdcli.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def test_help_lists_the_five_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("generate", "img2img", "encode", "decode", "inspect"):
        assert name in result.output


@pytest.mark.parametrize("command", ["generate", "img2img", "encode", "decode", "inspect"])
def test_command_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_help_does_not_import_torch_and_is_fast():
    code = ("import sys, time; t=time.perf_counter(); from sdcli.cli import app\n"
            "try:\n app(['generate', '--help'])\nexcept SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "sys.stderr.write(repr(heavy)); sys.exit(1 if heavy else 0)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 5  # a loose guard; the real figure is in docs/benchmarks.md


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("sdcli ")


def test_print_config_json_reflects_flags_and_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 9\nsampler: euler\n")
    result = runner.invoke(app, ["generate", "x", "--config", str(cfg), "--cfg", "3.5", "--print-config", "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert (line["kind"], line["path"]) == ("config", None)  # the --json envelope (README "JSON lines")
    data = line["config"]
    assert (data["steps"], data["sampler"], data["cfg"]) == (9, "euler", 3.5)


def test_print_config_yaml():
    result = runner.invoke(app, ["generate", "x", "--steps", "4", "--print-config"])
    assert result.exit_code == 0 and "steps: 4" in result.stdout


@pytest.mark.parametrize(
    "args, code",
    [
        (["generate", "x", "--steps", "0"], 2),
        (["generate", "x", "--width", "500"], 2),
        (["generate", "x", "--seed", "-5"], 2),
        (["generate", "x", "--seed", str(2**32)], 2),
        (["generate", "x", "--dtype", "fp64"], 2),
        (["generate", "x", "--steps", "many"], 2),
        (["generate"], 2),
        (["generate", "x", "--config", "missing.yaml"], 3),
        (["generate", "x", "--prompts-file", "missing.txt"], 3),
        (["generate", "x"], 2),  # no model given
        (["inspect", "missing.safetensors"], 3),
        (["inspect"], 2),
        (["encode", "-o", "x.latent"], 2),
    ],
)
def test_errors_exit_codes(args, code):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output


def test_error_is_one_line_on_stderr():
    result = runner.invoke(app, ["generate", "x", "--steps", "0"])
    assert result.stdout == ""
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--steps" in lines[0]


def test_user_text_is_not_markup(tmp_path):
    # A prompts file whose bad line contains rich markup-looking text must be printed verbatim.
    path = tmp_path / "p.txt"
    path.write_text('{"prompt": "[blurry] [/] :dog:", "steps": "[/]"}\n')
    result = runner.invoke(app, ["generate", "--prompts-file", str(path)])
    assert result.exit_code == 3
    assert "[/]" in result.stderr


def test_unexpected_error_hides_traceback_unless_debug(monkeypatch):
    import sdcli.app.inspect as insp

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(insp, "run_inspect", boom)
    result = runner.invoke(app, ["inspect", "--prompt", "x"])
    assert result.exit_code == 1 and "SDCLI_DEBUG=1" in result.stderr and "Traceback" not in result.stderr
    monkeypatch.setenv("SDCLI_DEBUG", "1")
    result = runner.invoke(app, ["inspect", "--prompt", "x"])
    assert isinstance(result.exception, RuntimeError)


def test_python_m_entry_point():
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "sdcli", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("sdcli")
