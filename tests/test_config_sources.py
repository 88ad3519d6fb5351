"""`--print-config` names the source of every value (default, user config with its path, a packaged preset, a
--config file, the command line); the presets ship inside the package and `--config NAME` finds them; the printed
YAML is itself a config that resolves to the same values. Through the real command (no model is loaded)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sdcli.cli import app

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "sdcli" / "presets"


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)

    def run(*args: str, expect: int = 0):
        result = CliRunner().invoke(app, ["generate", "a cat", *args])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def _user_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdg" / "sdcli" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_each_value_names_its_source(cli, tmp_path):
    user = _user_config(tmp_path, "steps: 33\nnegative: blurry\n")
    data = json.loads(cli("--config", "fast", "--cfg", "5", "--print-config", "--json").stdout)
    fast = yaml.safe_load((PRESETS / "fast.yaml").read_text())
    sources = data.pop("sources")
    assert "steps" in fast and "cfg" in fast  # the preset sets both: steps over the user config, cfg under the flag
    assert {k: data[k] for k in fast if k != "cfg"} == {k: v for k, v in fast.items() if k != "cfg"}
    assert sources["steps"] == sources["sampler"] == f"preset fast ({PRESETS / 'fast.yaml'})"
    assert (data["negative"], sources["negative"]) == ("blurry", f"user config {user}")
    assert (data["cfg"], sources["cfg"]) == (5.0, "command line")
    assert sources["seed"] == "default" and set(sources) == set(data)


def test_yaml_comments_and_the_printed_config_resolves_to_itself(cli, tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text("sampler: euler\nnegative: |\n  two\n  lines\n")
    text = cli("--config", str(own), "--steps", "7", "--print-config").stdout
    lines = text.splitlines()
    assert lines[0].startswith("# later wins: default < user config ") and "(none there)" in lines[0]
    assert "sampler: euler  # --config " + str(own) in lines
    assert "steps: 7  # command line" in lines and "clip_skip: 1  # default" in lines
    assert f"# negative: --config {own}" in lines  # a value of several lines: its source on the line above
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    again = json.loads(cli("--config", str(printed), "--print-config", "--json").stdout)
    first = json.loads(cli("--config", str(own), "--steps", "7", "--print-config", "--json").stdout)
    again.pop("sources"), first.pop("sources")
    assert again == first


def test_presets_by_name_and_through_configs_folder(cli):
    by_name = json.loads(cli("--config", "sdxl-turbo", "--print-config", "--json").stdout)
    with_suffix = json.loads(cli("--config", "sdxl-turbo.yaml", "--print-config", "--json").stdout)
    through_repo = json.loads(cli("--config", str(REPO / "configs" / "sdxl-turbo.yaml"), "--print-config",
                                  "--json").stdout)  # fmt: skip
    values = [{k: v for k, v in d.items() if k != "sources"} for d in (by_name, with_suffix, through_repo)]
    assert values[0] == values[1] == values[2] and (values[0]["steps"], values[0]["cfg"]) == (1, 0.0)
    assert through_repo["sources"]["steps"].startswith("--config ")


def test_a_file_of_that_name_wins_and_an_unknown_name_lists_the_presets(cli, tmp_path):
    (tmp_path / "fast").write_text("steps: 3\n")
    assert json.loads(cli("--config", "fast", "--print-config", "--json").stdout)["steps"] == 3
    result = cli("--config", "nosuch", "--print-config", expect=3)
    assert "nosuch" in result.stderr and all(p.stem in result.stderr for p in PRESETS.glob("*.yaml"))


def test_presets_are_package_data():
    from setuptools.config.pyprojecttoml import read_configuration

    patterns = read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]["package-data"]["sdcli"]
    files = sorted(p.relative_to(REPO / "sdcli").as_posix() for p in PRESETS.glob("*.yaml"))
    assert len(files) >= 6 and all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files)


def test_values_replayed_from_an_image_name_the_image(cli, tmp_path):
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 9, Sampler: Euler, CFG scale: 5, Seed: 12, Size: 64x64")
    Image.new("RGB", (64, 64)).save(tmp_path / "found.png", pnginfo=info)
    result = CliRunner().invoke(app, ["generate", "--from-image", "found.png", "--seed", "3", "--print-config",
                                      "--json"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["steps"], data["sources"]["steps"]) == (9, "image metadata found.png")
    assert (data["seed"], data["sources"]["seed"]) == (3, "command line")
