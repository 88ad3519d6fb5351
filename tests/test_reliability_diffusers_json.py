"""The JSON files of a diffusers folder are input too: a shard index or a scheduler config that is not what
diffusers writes (a list, deep nesting, a weight_map pointing outside the folder, a non-text prediction type) is
exit 3 naming the file, never a crash, through the real `inspect` and `generate`."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1_diffusers  # noqa: F401
from sdcli.cli import app

BAD_SCHEDULER = {
    "a-list": "[1, 2, 3]",
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "not-json": "{prediction_type: eps",
    "number-prediction": json.dumps({"prediction_type": 3}),
}
BAD_INDEX = {
    "weight-map-a-list": {"weight_map": ["diffusion_pytorch_model.safetensors"]},
    "outside-the-folder": {"weight_map": {"conv_in.weight": "../../vae/diffusion_pytorch_model.safetensors"}},
    "empty": {"weight_map": {}},
    "not-text": {"weight_map": {"conv_in.weight": 7}},
}


@pytest.fixture
def folder(tiny_sd1_diffusers, tmp_path):  # noqa: F811
    copy = tmp_path / "model"
    shutil.copytree(tiny_sd1_diffusers, copy)
    return copy


def _run(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def _check_refused(result, name: str):
    assert result.exit_code == 3, (result.exit_code, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and name in errors[0], result.stderr


@pytest.mark.parametrize("case", BAD_SCHEDULER)
def test_bad_scheduler_config(folder, tmp_path, case):
    (folder / "scheduler" / "scheduler_config.json").write_text(BAD_SCHEDULER[case])
    _check_refused(_run("inspect", folder), "scheduler_config.json")
    result = _run("generate", "a cat", "-m", folder, "-W", "64", "-H", "64", "--steps", "1", "--dtype", "fp32",
                  "-o", tmp_path / "out.png")
    _check_refused(result, "scheduler_config.json")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize("case", BAD_INDEX)
def test_bad_shard_index(folder, case):
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "shard-1.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(BAD_INDEX[case]))
    _check_refused(_run("inspect", folder), "index.json")


def test_a_good_shard_index_is_followed(folder):
    from safetensors import safe_open

    unet = folder / "unet"
    with safe_open(unet / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = list(f.keys())
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "shard-1.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "shard-1.safetensors" for k in keys}}))
    result = _run("inspect", folder)
    assert result.exit_code == 0, result.stderr
