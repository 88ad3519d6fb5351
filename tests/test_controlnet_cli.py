"""ControlNet from the command line: flags, YAML and prompts-file units, the checks before the model load, the
metadata an image records and its replay (generate --from-image, verify), `preprocess` and `inspect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from make_checkpoint import make_controlnet
from PIL import Image
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli.control import preprocess
from _cli import invoker, pixels
from sdcli.cli import app
from sdcli.output.metadata import read_image_metadata

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(tmp_path / "edges.png")
    return {"cn": make_controlnet(tmp_path / "cn.safetensors", "sd1"),
            "xl": make_controlnet(tmp_path / "cnxl.safetensors", "sdxl"), "hint": tmp_path / "edges.png"}


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    model = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32"]
    render = ["--steps", "3", "-W", "64", "-H", "64", "--sampler", "euler", "--cfg", "5", "--seed", "3"]

    return invoker({"generate": model + render, "img2img": model + render[:2] + render[6:], "verify": model[:2]})


def test_generate_records_replays_and_verifies(cli, files, tmp_path):
    cli("generate", "a fox", "-o", "a.png", "--controlnet", str(files["cn"]), "--control-image", str(files["hint"]),
        "--control-weight", "0.8", "--control-end", "0.6", "--control-resize", "crop", "--hires-scale", "1.5")
    meta = read_image_metadata(tmp_path / "a.png")
    field = meta["parameters"]["extra"]["ControlNet 0"]
    assert field.startswith("Module: none, Model: cn [") and "Weight: 0.8" in field and "Guidance End: 0.6" in field
    assert "Resize Mode: Crop and Resize" in field
    (unit,) = meta["sdcli"]["config"]["controlnets"]
    assert unit["model"] == "cn.safetensors" and unit["image"] == "edges.png" and len(unit["model_sha256"]) == 64
    assert (unit["weight"], unit["end"], unit["resize"]) == (0.8, 0.6, "crop")
    plain = cli("generate", "a fox", "-o", "plain.png", "--hires-scale", "1.5")
    assert plain.exit_code == 0 and not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "plain.png"))

    missing = cli("verify", "a.png", expect=2)
    assert "--controlnet" in missing.stderr
    cli("verify", "a.png", "--controlnet", str(files["cn"]))  # the hint is found beside the image
    cli("generate", "-o", "b.png", "--from-image", "a.png", "--controlnet", str(files["cn"]))
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    files["hint"].rename(tmp_path / "gone.png")
    gone = cli("verify", "a.png", "--controlnet", str(files["cn"]), expect=2)
    assert "edges.png" in gone.stderr and "--control-image" in gone.stderr
    cli("verify", "a.png", "--controlnet", str(files["cn"]), "--control-image", str(tmp_path / "gone.png"))


def test_checked_before_the_model_loads(cli, files):
    xl = cli("generate", "x", "--controlnet", str(files["xl"]), "--control-image", str(files["hint"]), expect=3)
    assert "cnxl.safetensors" in xl.stderr and "ControlNet with" in xl.stderr and "loading" not in xl.stderr
    not_cn = cli("generate", "x", "--controlnet", str(files["hint"]), "--control-image", str(files["hint"]), expect=3)
    assert "edges.png" in not_cn.stderr
    no_hint = cli("generate", "x", "--controlnet", str(files["cn"]), "--control-image", "nope.png", expect=3)
    assert "nope.png" in no_hint.stderr
    cli("generate", "x", "--controlnet", str(files["cn"]), expect=2)  # no --control-image
    cli("generate", "x", "--control-image", str(files["hint"]), expect=2)  # no --controlnet
    bad = cli("generate", "x", "--controlnet", str(files["cn"]), "--control-image", str(files["hint"]),
              "--control-start", "0.8", "--control-end", "0.5", expect=2)  # fmt: skip
    assert "start < end" in bad.stderr


def test_yaml_and_prompts_file_units(cli, files, tmp_path):
    unit = {"model": str(files["cn"]), "image": str(files["hint"]), "weight": 0.5, "guess_mode": True}
    (tmp_path / "c.yaml").write_text(json.dumps({"controlnets": [unit]}))
    cli("generate", "a fox", "--config", "c.yaml", "-o", "y.png")
    assert read_image_metadata(tmp_path / "y.png")["sdcli"]["config"]["controlnets"][0]["guess_mode"] is True
    jobs = [{"prompt": "a fox", "controlnets": [unit]}, {"prompt": "a fox"}]
    (tmp_path / "p.txt").write_text("\n".join(json.dumps(j) for j in jobs))
    cli("generate", "--prompts-file", "p.txt", "-o", "j{index}.png")
    assert np.array_equal(pixels(tmp_path / "j0.png"), pixels(tmp_path / "y.png"))  # same unit, same seed
    assert "ControlNet 0" not in read_image_metadata(tmp_path / "j1.png")["parameters"].get("extra", {})
    (tmp_path / "bad.txt").write_text(json.dumps({"prompt": "x", "controlnets": [{**unit, "weight": "high"}]}))
    bad = cli("generate", "--prompts-file", "bad.txt", expect=3)
    assert "bad.txt:1" in bad.stderr and "weight" in bad.stderr


def test_img2img_with_controlnet(cli, files, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "init.png")
    args = ("a fox", "-i", "init.png", "--strength", "0.6")
    cli("img2img", *args, "-o", "i.png", "--controlnet", str(files["cn"]), "--control-image", str(files["hint"]))
    cli("img2img", *args, "-o", "j.png")
    assert not np.array_equal(pixels(tmp_path / "i.png"), pixels(tmp_path / "j.png"))
    assert read_image_metadata(tmp_path / "i.png")["sdcli"]["config"]["controlnets"][0]["image"] == "edges.png"


def test_preprocess_and_inspect(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["preprocess", "canny", str(files["hint"]), "-o", "e.png", "--low", "60",
                                 "--high", "150"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    expected = preprocess.canny(Image.open(files["hint"]), 60, 150)
    assert np.array_equal(pixels(tmp_path / "e.png"), np.asarray(expected))
    depth = runner.invoke(app, ["preprocess", "depth", str(files["hint"]), "-o", "d.png"])
    assert depth.exit_code == 2 and "need models" in depth.stderr
    shown = runner.invoke(app, ["inspect", str(files["xl"]), "--json", "--no-hash"])
    assert shown.exit_code == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["kind"] == "controlnet" and report["layout"] == "original"
    assert any("9 down residuals" in line for line in report["about"])
