"""Issue 30, items 9 and 11: the help a new user reads (option panels, examples, -h, defaults shown, the sampler
and schedule tables without a prompt), shell completion, and usage errors on one line. Through the real commands:
CliRunner on the app, and `python -m sdcli` where the entry point or a fresh process matters."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperOption
from typer.testing import CliRunner

from sdcli import cli_help
from sdcli.cli import app
from sdcli.sampling import names

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
WIDE = {"COLUMNS": "250", "NO_COLOR": "1"}  # rich reads COLUMNS: one line per option, no wrapping


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args], env=WIDE)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout


def _panels(text: str) -> list[str]:
    return re.findall(r"^╭─ (.+?) ─", text, flags=re.M)


def _sdcli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1", XDG_CONFIG_HOME=str(cwd / "xdg"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sdcli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


# --- item 9: panels, examples, -h, defaults -----------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_sits_in_a_named_panel_in_order(command):
    text = _help(command, "--help")
    shown = _panels(text)
    assert "Options" not in shown  # Typer's catch-all: no option was left out of the panels
    options = [p for p in GROUP.commands[command].params if isinstance(p, TyperOption)]
    assert all(p.rich_help_panel in cli_help.ORDER for p in options), [p.name for p in options]
    expected = [*dict.fromkeys(p.rich_help_panel for p in options), cli_help.HELP]  # -h / --help last
    assert [p for p in shown if p != "Arguments"] == expected
    assert expected == sorted(expected, key=cli_help.ORDER.index)  # panels in the declared order, Help last
    for option in options:  # each option is listed, in its own panel's box
        flag = next((o for o in option.opts if o.startswith("--")), option.opts[0])
        box = text.split(f"╭─ {option.rich_help_panel} ─", 1)[1].split("╰", 1)[0]
        assert re.search(rf"│ +(\* +)?{re.escape(flag)}\b", box), (command, flag)  # * marks a required one


def test_generate_panels_group_the_options_a_new_user_looks_for():
    text = _help("generate", "-h")
    assert _panels(text)[:5] == ["Arguments", cli_help.MODEL, cli_help.INPUT, cli_help.PROMPT, cli_help.SAMPLING]
    for panel, flag in [(cli_help.MODEL, "--model"), (cli_help.SAMPLING, "--sampler"), (cli_help.SIZE, "--width"),
                        (cli_help.HIRES, "--hires-scale"), (cli_help.CONTROLNET, "--controlnet"),
                        (cli_help.OUTPUT, "--dry-run"), (cli_help.NOISE, "--seed")]:
        box = text.split(f"╭─ {panel} ─", 1)[1].split("╰", 1)[0]
        assert f"│ {flag} " in box, (panel, flag)


@pytest.mark.parametrize("command", COMMANDS)
def test_dash_h_is_the_help_and_ends_with_examples_that_parse(command):
    long, short = _help(command, "--help"), _help(command, "-h")
    assert long == short
    examples = cli_help.EXAMPLES[command]
    assert 2 <= len(examples) <= 3
    tail = long[long.rindex("Examples:"):]
    for example in examples:
        assert example in tail
        words = shlex.split(example, comments=True)
        assert words[0] == "sdcli"
        # every example is a valid command line: Click parses it (types, required options) without running it
        sub = GROUP.commands[words[1]]
        sub.make_context(words[1], words[2:], parent=GROUP.make_context("sdcli", [words[1]]))


def test_root_accepts_dash_h():
    assert _help("-h") == _help("--help")


def test_defaults_from_the_config_are_shown():
    text = _help("generate", "-h")
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ --")}
    assert "[default: 20]" in lines["--steps"]  # RunConfig's default, though the option's own is "not given"
    assert "[default: dpm++_2m]" in lines["--sampler"]
    assert "[default: sdcli-{seed}.png]" in lines["--output"]
    assert "[default: off]" in lines["--seamless"]
    assert "default" not in lines["--width"].split("(multiple of 8).")[1]  # the model's: no number to show
    assert "[default: 512]" in _help("upscale", "-h").split("--tile ")[1].splitlines()[0]  # Typer's own default


def test_a_config_default_is_shown_without_becoming_a_flag(tmp_path):
    # showing RunConfig's default must not pass it as given: a config file's value still wins
    (tmp_path / "c.yaml").write_text("steps: 9\n")
    _help("generate", "-h")
    result = runner.invoke(app, ["generate", "x", "-c", "c.yaml", "--print-config"])
    assert result.exit_code == 0 and "steps: 9" in result.stdout


def test_an_option_missing_from_the_panels_lands_in_advanced():
    assert cli_help.panel_of("generate", "some_new_flag") == cli_help.ADVANCED
    assert cli_help.panel_of("preprocess", "seed") == cli_help.COMMAND
    assert cli_help.panel_of("generate", "seed") == cli_help.NOISE


@pytest.mark.parametrize("args", [["generate"], ["img2img"], ["sweep"], ["generate", "a cat"]])
def test_sampler_help_needs_no_prompt(args):
    result = runner.invoke(app, [*args, "--sampler", "help"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == names.sampler_help().strip() and result.stderr == ""


@pytest.mark.parametrize("args", [["generate"], ["img2img"], ["sweep"]])
def test_schedule_help_lists_every_schedule_and_its_a1111_label(args):
    result = runner.invoke(app, [*args, "--schedule", "HELP"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:] if line.strip()}
    for name in names.SCHEDULE_NAMES:
        assert name in rows
    assert "Karras" in rows["karras"] and "uniform" in rows["normal"] and "ays" in rows["align_your_steps"]


def test_name_tables_without_a_prompt_do_not_import_torch(tmp_path):
    code = ("import sys; from sdcli.cli import main; sys.argv = ['sdcli', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "sys.stderr.write(f\"TORCH={'torch' in sys.modules}\"); sys.exit(code)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    for args in (["img2img", "--sampler", "help"], ["generate", "--schedule", "help"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr.endswith("TORCH=False"), (args, proc.stderr)
        assert "karras" in proc.stdout


def test_sampler_help_from_a_config_file_is_still_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("sampler: help\n")
    result = runner.invoke(app, ["generate", "x", "-c", "c.yaml", "--dry-run"])
    assert result.exit_code == 3 and "'sampler'" in result.stderr


# --- item 9: shell completion ----------------------------------------------------------------------------------------

def test_completion_functions(tmp_path):
    for name in ("m1.safetensors", "m2.GGUF", "notes.txt", "photo.png", ".hidden.safetensors"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd15.ckpt").write_bytes(b"")
    assert cli_help.complete_sampler("dpm++_2") == ["dpm++_2m", "dpm++_2m_sde", "dpm++_2s_a"]
    assert "euler_ancestral" in cli_help.complete_sampler("euler")  # ComfyUI's name too
    assert all(" " not in w for w in cli_help.complete_sampler(""))  # nothing a shell would split
    assert set(names.SAMPLER_NAMES) <= set(cli_help.complete_sampler(""))
    assert cli_help.complete_schedule("s") == ["sgm_uniform", "simple"]
    assert set(names.SCHEDULE_NAMES) <= set(cli_help.complete_schedule(""))
    assert cli_help.complete_model("") == ["m1.safetensors", "m2.GGUF", "models/"]
    assert cli_help.complete_model("models/") == ["models/sd15.ckpt"]
    assert cli_help.complete_model(".") == [".hidden.safetensors"]
    assert cli_help.complete_image("") == ["models/", "photo.png"]
    assert cli_help.complete_any_file("n") == ["notes.txt"]
    assert cli_help.complete_folder("") == ["models/"]
    assert cli_help.complete_files("absent/") == []
    assert cli_help.complete_files(str(tmp_path) + "/mo") == [f"{tmp_path}/models/"]


def _complete(words: str) -> list[str]:
    """What bash completion gets for the command line `words` (the cursor after its last word), through Typer's
    completion environment variables, as the installed completion script asks."""
    cword = len(shlex.split(words)) - (0 if words.endswith(" ") else 1)
    env = {"_SDCLI_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = runner.invoke(app, [], env=env, prog_name="sdcli")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return result.stdout.split()


def test_completion_through_the_shell_mechanism(tmp_path):
    (tmp_path / "sd15.safetensors").write_bytes(b"")
    (tmp_path / "cat.png").write_bytes(b"")
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    assert _complete("sdcli generate --sampler dpm++_2m") == ["dpm++_2m", "dpm++_2m_sde"]
    assert _complete("sdcli img2img --schedule kar") == ["karras"]
    assert _complete("sdcli generate -m ") == ["sd15.safetensors"]
    assert _complete("sdcli img2img x -i c") == ["cat.png"]
    assert _complete("sdcli generate x --config ") == ["c.yaml"]
    assert "--sampler" in _complete("sdcli generate --sam")


# --- item 11: usage errors on one line ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["generate", "x", "--bogus"], "no such option: --bogus"),
    (["generate", "x", "--steps", "many"], "'--steps'"),
    (["img2img"], "missing argument 'prompt'"),
    (["img2img", "x"], "missing option '--image'"),
    (["nosuch"], "no such command 'nosuch'"),
    (["--bogus"], "no such option: --bogus"),
    (["upscale", "a.png", "-u", "x", "--tile", "big"], "'--tile'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == "", (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "--help" in lines[0] and "╭" not in lines[0]


def test_usage_error_through_the_entry_point(tmp_path):
    proc = _sdcli("generate", "a cat", "--stesp", "4", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no such option: --stesp")
    assert "--steps" in proc.stderr  # Click's "did you mean", kept on the line
    proc = _sdcli("img2img", "a cat", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--image" in proc.stderr


def test_bare_sdcli_still_prints_the_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.output and "generate" in result.output and "error:" not in result.output
