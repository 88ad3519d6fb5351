"""SD3.5 skip-layer guidance (sdcli/sampling/slg.py) against diffusers' StableDiffusion3Pipeline
(skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start / stop) on the tiny SD3.5-Medium-shaped
model of tests/_fixtures_dit.py, and its options, metadata and replay.

Tolerances as tests/test_sd3_pipeline.py (latents within 1e-4 of their largest magnitude: sdcli mixes x0 = x -
sigma v where diffusers mixes v, the same sum in another order; PNGs within 2 levels on 99% of the pixels); each
case also checks that the skipped pass moved the latents by far more than that, so the comparison can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from _fixtures_dit import dit_components, dit_dir, sd3_pipeline, tiny_flux, tiny_sd3  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from test_pipeline_oracle import FinalLatents
from test_sd3_pipeline import NEGATIVE, PROMPT, SIZE, assert_latents_close, assert_pixels_close, conds, first_draws
from test_sd3_pipeline import pixels
from sdcli import pipeline as P
from sdcli.cli import app
from sdcli.loading import checkpoint as ck
from sdcli.output.metadata import read_image_metadata
from sdcli.runtime.errors import UsageError
from sdcli.sampling.slg import SkipLayerGuidance, parse_layers, skip_layer_guidance

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = 5.0


@pytest.fixture(scope="module")
def sd3(tiny_sd3, clip_tokenizer_dir):  # noqa: F811
    return sd3_pipeline(tiny_sd3, clip_tokenizer_dir), ck.load_models(tiny_sd3)


@pytest.mark.parametrize("steps,layers,scale,start,end", [(4, (1,), 2.8, 0.01, 0.8), (5, (0,), 2.5, 0.2, 0.7)])
def test_txt2img_with_slg_matches_diffusers(sd3, steps, layers, scale, start, end):
    pipe, models = sd3
    slg = skip_layer_guidance(scale, ",".join(map(str, layers)), start, end, models.family, models.info.unet.depth,
                              CFG)
    assert slg.steps(steps) == {i for i in range(steps) if steps * start < i < steps * end} and slg.steps(steps)
    plan = P.make_plan("euler", "auto", steps, cfg=CFG, family=models.family, size=(SIZE, SIZE))
    cond, uncond = conds(models, PROMPT, NEGATIVE)
    plain = P.txt2img(models, plan, cond, uncond, [7], SIZE, SIZE)
    latents = P.txt2img(models, P.replace(plan, slg=slg), cond, uncond, [7], SIZE, SIZE)
    final = FinalLatents()
    out = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
               guidance_scale=CFG, latents=first_draws([7]), output_type="pil", callback_on_step_end=final,
               skip_guidance_layers=list(layers), skip_layer_guidance_scale=scale, skip_layer_guidance_start=start,
               skip_layer_guidance_stop=end)
    assert_latents_close(latents, final.latents)
    assert_pixels_close(pixels(models, latents), [np.asarray(out.images[0])])
    moved = float((plain - final.latents).abs().max() / final.latents.abs().max())
    assert moved > 1e-2, f"the skipped pass moved the latents by {moved:.1e} only"


def test_the_window_and_the_layers_as_written():
    assert SkipLayerGuidance(2.5, (7, 8, 9)).steps(10) == {1}  # the defaults: 0.1 < i < 2
    assert SkipLayerGuidance(2.5, (7,), 0.0, 1.0).steps(4) == {1, 2, 3}  # strict at both ends, as diffusers
    assert parse_layers("7,8,9") == parse_layers("[7, 8, 9]") == parse_layers("9, 8,7") == (7, 8, 9)
    for bad in ("", "a", "-1", "[]"):
        with pytest.raises(UsageError):
            parse_layers(bad)


def base(model, out, *extra):
    return ["generate", PROMPT, "-m", str(model), "-o", str(out), "--steps", "4", "-W", str(SIZE), "-H", str(SIZE),
            "--seed", "3", "--cfg", str(CFG), "--negative", NEGATIVE, *extra]


def test_cli_records_slg_and_replays_it(tiny_sd3, tmp_path):  # noqa: F811
    runner = CliRunner()
    out, plain = tmp_path / "slg.png", tmp_path / "plain.png"
    slg = ["--slg-scale", "2.5", "--skip-layers", "1", "--slg-start", "0.1", "--slg-end", "0.9"]
    result = runner.invoke(app, base(tiny_sd3, out, *slg))
    assert result.exit_code == 0, result.output
    meta = read_image_metadata(out)
    config, text = meta["sdcli"]["config"], meta["raw"]["parameters"]
    assert (config["slg_scale"], config["skip_layers"], config["slg_start"], config["slg_end"]) == (2.5, "1", 0.1, 0.9)
    assert 'SLG scale: 2.5, Skip layers: "[1]", Skip layer start: 0.1, Skip layer end: 0.9' in text
    assert runner.invoke(app, base(tiny_sd3, plain)).exit_code == 0
    recorded = read_image_metadata(plain)["sdcli"]["config"]
    assert not {"slg_scale", "skip_layers", "slg_start", "slg_end"} & set(recorded)  # sparse: off is not written
    assert np.asarray(Image.open(out)).tobytes() != np.asarray(Image.open(plain)).tobytes()
    again = runner.invoke(app, ["verify", str(out), "-m", str(tiny_sd3)])
    assert again.exit_code == 0, again.output


def test_replay_reads_an_infotext_of_ours_and_of_stable_diffusion_cpp(tmp_path):
    """sd.cpp writes "Skip layers: [7, 8, 9, ]" unquoted (its commas split the field): read from the raw text."""
    from sdcli.output.replay import from_image

    head = "a cat\nNegative prompt: dog\nSteps: 20, CFG scale: 4.5, "
    cases = {
        "ours": (head + 'SLG scale: 2.5, Skip layers: "[7, 8, 9]", Skip layer start: 0.01, Skip layer end: 0.2, '
                 "Seed: 1, Size: 64x64, Sampler: Euler", (2.5, "7,8,9", 0.01, 0.2)),
        "sdcpp": (head + "SLG scale: 2.500000, Skip layers: [7, 8, 9, ], Skip layer start: 0.010000, "
                  "Skip layer end: 0.200000, Guidance: 3.500000, Eta: 0.000000, Seed: 1, Size: 64x64, "
                  "Model: sd3.5_medium, RNG: cuda, Sampler: euler, Version: stable-diffusion.cpp",
                  (2.5, "7,8,9", 0.01, 0.2)),
    }
    for name, (text, want) in cases.items():
        info = PngInfo()
        info.add_text("parameters", text)
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png", pnginfo=info)
        values = from_image(tmp_path / f"{name}.png").values
        assert tuple(values[k] for k in ("slg_scale", "skip_layers", "slg_start", "slg_end")) == want, name


def test_refused_where_it_has_no_meaning(tiny_sd3, tiny_flux, dit_components, tmp_path):  # noqa: F811
    runner = CliRunner()
    cases = [
        (base(tiny_sd3, tmp_path / "a.png", "--slg-scale", "2.5", "--skip-layers", "2"), "joint blocks 0 to 1"),
        (base(tiny_sd3, tmp_path / "b.png", "--slg-scale", "2.5", "--skip-layers", "x"), "--skip-layers"),
        (base(tiny_sd3, tmp_path / "c.png", "--slg-scale", "2.5", "--skip-layers", "1", "--cfg", "1"), "CFG above 1"),
        (base(tiny_sd3, tmp_path / "d.png", "--slg-scale", "2.5", "--skip-layers", "1", "--slg-start", "0.5",
              "--slg-end", "0.4"), "--slg-end"),
        (base(tiny_flux, tmp_path / "e.png", "--slg-scale", "2.5", "--vae", str(dit_components["vae"]),
              "--clip-l", str(dit_components["clip_l"]), "--t5", str(dit_components["t5"])), "SD3"),
    ]
    for args, words in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in result.stderr, (args[-4:], result.exit_code, result.output)
