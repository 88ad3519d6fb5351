"""Hires fix (A1111 "Hires. fix", Latent upscaler) through `sdcli generate` with the tiny SD1 checkpoint on CPU:
the output has the upscaled size (rounded to a multiple of 8), image k of a batch equals a single run with seed+k
bit for bit (pass 2 continues the per-image generators), scale 1 is exactly plain txt2img, the infotext carries
A1111's Hires fields and sd-parsers still reads it, bad values are usage errors naming the option."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from sd_parsers import ParserManager
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli import pipeline
from sdcli.loading import checkpoint
from sdcli.cli import app
from sdcli.output.metadata import parse_infotext

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a lighthouse"


@pytest.fixture
def gen(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """gen(*args, expect=0) -> result of `sdcli generate` at 64x64, 2 steps, euler_a (stochastic), in tmp_path."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    base = ["generate", PROMPT, "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "-W", "64", "-H", "64",
            "--steps", "2", "--sampler", "euler_a", "--cfg", "5"]

    def run(*args: str, expect: int = 0):
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == expect, (result.output, result.exception)
        return result

    return run


def test_output_has_the_upscaled_size(gen, tmp_path):
    result = gen("--hires-scale", "2", "--seed", "3", "-o", "h.png")
    assert Image.open(tmp_path / "h.png").size == (128, 128)
    assert "64x64 -> 128x128" in result.stderr
    meta = json.loads(Image.open(tmp_path / "h.png").text["sdcli"])
    assert (meta["config"]["width"], meta["config"]["height"]) == (64, 64)  # the first pass's, as asked
    assert meta["config"]["hires_scale"] == 2.0 and meta["config"]["hires_strength"] == 0.5
    assert meta["hires_size"] == {"width": 128, "height": 128}


def test_size_not_a_multiple_of_8_is_rounded(gen, tmp_path):
    # 64 * 1.3 = 83.2 px: the 8x8 latent scales to 10.4 -> 10, so 80 px
    result = gen("--hires-scale", "1.3", "--seed", "3", "-o", "r.png")
    assert Image.open(tmp_path / "r.png").size == (80, 80)
    assert "-> 80x80 (rounded to a multiple of 8)" in result.stderr
    assert pipeline.hires_size(64, 96, 1.5) == (96, 144)
    assert pipeline.hires_size(64, 64, 1.1) == (72, 72)  # 8.8 latents round up


def test_batch_image_equals_single_run(gen, tmp_path):
    hires = ["--hires-scale", "2", "--hires-steps", "3"]
    gen(*hires, "--seed", "10", "-n", "2", "--batch-size", "2", "-o", "b-{index}.png")
    for k in range(2):
        gen(*hires, "--seed", str(10 + k), "-o", f"s-{k}.png")
        assert Image.open(tmp_path / f"b-{k}.png").tobytes() == Image.open(tmp_path / f"s-{k}.png").tobytes()
    assert Image.open(tmp_path / "b-0.png").tobytes() != Image.open(tmp_path / "b-1.png").tobytes()


def test_scale_1_is_plain_txt2img(gen, tmp_path):
    gen("--seed", "5", "-o", "plain.png")
    gen("--seed", "5", "--hires-scale", "1", "--hires-strength", "0.9", "-o", "one.png")
    gen("--seed", "5", "--hires-scale", "1.5", "-o", "hires.png")
    plain = Image.open(tmp_path / "plain.png")
    assert plain.tobytes() == Image.open(tmp_path / "one.png").tobytes()
    assert "Hires" not in Image.open(tmp_path / "one.png").text["parameters"]
    assert Image.open(tmp_path / "hires.png").size != plain.size


def test_second_pass_continues_the_generator(tiny_sd1):  # noqa: F811
    """Pass 2's noise comes from the pass-1 generator's continued state, not from a fresh seed: a fresh
    generator there gives a different image (so the test can tell)."""
    models = checkpoint.load_models(tiny_sd1)
    cond, uncond = pipeline.encode_text(models, PROMPT, "")
    plan = pipeline.make_plan("euler_a", "auto", 2, cfg=5.0)
    gens = pipeline.generators([4])
    first = pipeline.txt2img(models, plan, cond, uncond, gens, 32, 32)
    state = gens[0].get_state()
    ours = pipeline.hires_fix(models, plan, first, cond, uncond, gens, 0.5, (64, 64))
    again = torch.Generator().manual_seed(0)
    again.set_state(state)
    assert torch.equal(ours, pipeline.hires_fix(models, plan, first, cond, uncond, [again], 0.5, (64, 64)))
    fresh = pipeline.hires_fix(models, plan, first, cond, uncond, [4], 0.5, (64, 64))
    assert not torch.equal(ours, fresh)
    # strength 0 runs nothing: exactly the bilinear (no antialias) upscale of the pass-1 latents
    up = pipeline.hires_fix(models, plan, first, cond, uncond, [4], 0.0, (64, 64))
    ref = torch.nn.functional.interpolate(first, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(up, ref)


def test_infotext_has_hires_fields(gen, tmp_path, tiny_sd1):  # noqa: F811
    gen("--hires-scale", "2", "--hires-steps", "3", "--hires-strength", "0.45", "--seed", "77", "-o", "m.png")
    text = Image.open(tmp_path / "m.png").text["parameters"]
    assert "Size: 64x64" in text  # the first pass's size, as A1111 writes it
    assert "Denoising strength: 0.45" in text
    assert "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent" in text
    parsed = parse_infotext(text)
    assert parsed["extra"]["Hires upscale"] == "2" and parsed["denoising_strength"] == 0.45
    info = ParserManager().parse(tmp_path / "m.png")
    assert [p.value for p in info.prompts] == [PROMPT]
    sampler = info.samplers[0]
    assert (sampler.parameters["steps"], sampler.parameters["seed"]) == ("2", "77")
    gen("--hires-scale", "2", "--seed", "77", "-o", "n.png")
    assert "Hires steps" not in Image.open(tmp_path / "n.png").text["parameters"]  # only when set


@pytest.mark.parametrize("flag, value", [("--hires-scale", "0.5"), ("--hires-scale", "5"),
                                         ("--hires-strength", "2"), ("--hires-steps", "0")])
def test_bad_values_are_usage_errors(gen, tmp_path, flag, value):
    result = gen(flag, value, "-o", "x.png", expect=2)
    assert flag in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_value_in_config_file_names_the_key(gen, tmp_path):
    (tmp_path / "c.yaml").write_text("hires_scale: 5\n")
    result = gen("--config", "c.yaml", "-o", "x.png", expect=3)
    assert "'hires_scale'" in result.stderr


def test_refused_with_latent_in(gen):
    result = gen("--hires-scale", "2", "--latent-in", "start.latent", "-o", "x.png", expect=2)
    assert "--latent-in" in result.stderr and "--hires-scale" in result.stderr
