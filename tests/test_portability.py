"""Hidden machine dependencies: locale, time zone, a strict ASCII locale, paths with spaces and non-ASCII
characters. Each render runs in its own process with the environment under test, against one in the default
environment; the PNG bytes must be the same (one thread both times: see README, "Replaying an image")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401

PROMPT = "a fox in the snow, ü, 日本, ∑"


def _render(model: Path, out: Path, cwd: Path, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CONFIG_HOME=str(cwd / "xdg"), NO_COLOR="1")
    for key, value in env_changes.items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    args = ["generate", PROMPT, "-m", str(model), "-W", "64", "-H", "64", "--steps", "2", "--seed", "9",
            "--dtype", "fp32", "--device", "cpu", "-o", str(out)]
    return subprocess.run([sys.executable, "-m", "sdcli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          errors="replace", timeout=120)


@pytest.fixture(scope="module")
def odd_folder(tiny_sd1, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("port") / "a folder with spaces" / "ünïcödé 日本"
    folder.mkdir(parents=True)
    model = folder / "my módel v1.safetensors"
    shutil.copyfile(tiny_sd1, model)
    return folder, model


@pytest.fixture(scope="module")
def reference(odd_folder):
    folder, model = odd_folder
    out = folder / "reference image.png"
    done = _render(model, out, folder)
    assert done.returncode == 0, done.stderr
    return out


ENVIRONMENTS = {
    "c-locale-and-tokyo-time": dict(LC_ALL="C", LANG="C", TZ="Asia/Tokyo"),
    "german-locale": dict(LC_ALL="de_DE.UTF-8", LANG="de_DE.UTF-8", TZ="Europe/Berlin"),
    "strict-ascii-locale": dict(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0"),
    "no-home": dict(HOME=None, XDG_CACHE_HOME=None),
}


@pytest.mark.parametrize("name", ENVIRONMENTS)
def test_same_bytes_in_every_environment(odd_folder, reference, name):
    folder, model = odd_folder
    out = folder / f"{name} ∂.png"
    done = _render(model, out, folder, **ENVIRONMENTS[name])
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == reference.read_bytes()


def test_metadata_keeps_non_ascii_text(reference):
    meta = json.loads(Image.open(reference).text["sdcli"])
    assert meta["prompt"] == PROMPT
    assert "my módel v1" in Image.open(reference).text["parameters"]
