"""Inpainting with a 9-channel UNet (SD1.5-inpainting style): `img2img --mask`.

The oracle is diffusers' StableDiffusionInpaintPipeline on the same tiny random 9-channel weights (a diffusers
folder and a single file made by scripts/make_checkpoint.py with the same seed), fp32, CPU, 64x64, with the
conventions of test_pipeline_oracle.py (whose helpers are reused):
- Euler is handed our sigmas (`sigmas=`), so both sides run the same schedule with unrounded timesteps.
- strength 1: both start from pure noise. Ours is noise * sigmas[0]; diffusers multiplies the `latents` it is
  given by init_noise_sigma, so it gets our start divided by that, and the generators after their first draw.
- strength < 1: diffusers draws the noise itself from each image's generator (its first draw, as ours) and
  adds it at the strength's sigma, as our img2img does.
- VAE: both the init latent and the masked-image latent use the posterior mean (diffusers' sampling of the
  posterior is patched to return the mean without drawing, the `posterior_mean` fixture).
The mask holds values on both sides of 0.5 (127 and 128) and edges that are not on the 8-pixel grid, so the
binarisation and the nearest-neighbour downsampling to latent size are compared too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from make_checkpoint import make_checkpoint
from test_pipeline_oracle import (  # noqa: F401  (posterior_mean is a fixture)
    CFG, NEGATIVE, PROMPT, SIZE, Case, FinalLatents, assert_latents_close, assert_pixels_close, first_draws,
    init_image, our_plan, pixels, posterior_mean,
)
from sdcli import pipeline as P
from sdcli.loading.checkpoint import load_models
from sdcli.cli import app
from sdcli.formats.images import load_mask, pil_to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def tiny_inpaint(tiny_models_dir: Path) -> Path:  # noqa: F811
    out = tiny_models_dir / "tiny_sd1_inpaint.safetensors"
    if not out.exists():
        make_checkpoint(out, "sd1", "tiny", seed=0, layout="single", inpaint=True)
    return out


@pytest.fixture(scope="session")
def tiny_inpaint_diffusers(tiny_models_dir: Path) -> Path:  # noqa: F811
    out = tiny_models_dir / "tiny_sd1_inpaint_diffusers"
    if not out.exists():
        make_checkpoint(out, "sd1", "tiny", seed=0, layout="diffusers", prediction="eps", inpaint=True)
    return out


@pytest.fixture(scope="session")
def inpaint_models(tiny_inpaint):
    models = load_models(tiny_inpaint)
    assert models.info.inpaint
    return models


@pytest.fixture(scope="session")
def diffusers_inpaint(tiny_inpaint_diffusers, clip_tokenizer_dir):  # noqa: F811
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from test_pipeline_oracle import SD

    folder = tiny_inpaint_diffusers
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    assert unet.config.in_channels == 9
    pipe = StableDiffusionInpaintPipeline(
        unet=unet, vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir, pad_token="<|endoftext|>", model_max_length=77),
        scheduler=EulerDiscreteScheduler(**SD, prediction_type="epsilon", timestep_spacing="linspace",
                                         steps_offset=1),  # the pipeline sets 1; unused with sigmas=
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_image() -> Image.Image:
    """RGB mask: a white rectangle off the 8-pixel grid, a 128 band (>= 0.5: repaint), a 127 band (< 0.5: keep)."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[13:45, 21:51] = 255
    m[45:53, 21:51] = 128
    m[5:13, 21:51] = 127
    return Image.fromarray(np.stack([m] * 3, -1), "RGB")


def ours(models, case, seeds, strength, mask_path):
    plan = our_plan(case)
    cond, uncond = P.encode_text(models, PROMPT, NEGATIVE)
    image = pil_to_tensor(init_image())
    mask, notes = load_mask(mask_path, (SIZE, SIZE))
    assert notes == []
    extra = P.inpaint_conditioning(models, image, mask)
    if strength >= 1.0:
        latents = P.txt2img(models, plan, cond, uncond, seeds, SIZE, SIZE, extra=extra)
    else:
        latents = P.img2img(models, plan, P.encode_image(models, image), cond, uncond, seeds, strength, extra=extra)
    return plan, latents


def reference(pipe, plan, seeds, strength):
    steps = {"sigmas": plan.sigmas.tolist()}
    kwargs = {}
    if strength >= 1.0:
        pipe.scheduler.set_timesteps(**steps)  # to read init_noise_sigma for this schedule
        gens, noise = first_draws(seeds)
        kwargs["latents"] = noise * float(plan.sigmas[0]) / pipe.scheduler.init_noise_sigma
    else:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
    final = FinalLatents()
    out = pipe([PROMPT] * len(seeds), image=init_image(), mask_image=mask_image(), strength=strength,
               negative_prompt=[NEGATIVE] * len(seeds), height=SIZE, width=SIZE, guidance_scale=CFG,
               generator=gens if len(gens) > 1 else gens[0], output_type="pil", callback_on_step_end=final,
               **steps, **kwargs)
    return final.latents, [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("strength,seeds", [(1.0, [5, 6]), (0.75, [3])], ids=["s1-batch2", "s0.75"])
def test_inpaint_matches_diffusers(strength, seeds, inpaint_models, diffusers_inpaint, posterior_mean, tmp_path):  # noqa: F811
    mask_image().save(tmp_path / "mask.png")
    case = Case("sd1", "euler", "normal", 6)
    plan, latents = ours(inpaint_models, case, seeds, strength, tmp_path / "mask.png")
    ref_latents, ref_images = reference(diffusers_inpaint, plan, seeds, strength)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(inpaint_models, latents), ref_images)
    if len(seeds) > 1:  # image k of a batch is a single run with seed+k (the extra channels follow each image)
        _, single = ours(inpaint_models, case, seeds[1:], strength, tmp_path / "mask.png")
        assert torch.equal(latents[1:], single)


def test_inpaint_conditioning_layout(inpaint_models, tmp_path):
    """Channel 0 is the mask at latent size (pixel [8i, 8j], nearest), channels 1-4 the masked image's latent."""
    mask_image().save(tmp_path / "mask.png")
    mask, _ = load_mask(tmp_path / "mask.png", (SIZE, SIZE))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 0, 48, 30] == 1 and mask[0, 0, 8, 30] == 0  # 128 repaints, 127 keeps
    image = pil_to_tensor(init_image())
    extra = P.inpaint_conditioning(inpaint_models, image, mask)
    assert extra.shape == (1, 5, SIZE // 8, SIZE // 8)
    assert torch.equal(extra[:, :1], mask[:, :, ::8, ::8])
    torch.testing.assert_close(extra[:, 1:], P.encode_image(inpaint_models, image * (1 - mask)), rtol=0, atol=0)


def test_load_mask_modes_and_resize(tmp_path):
    """Any mode becomes a 0/1 mask; another size is resized to the image's and said."""
    Image.fromarray(np.full((16, 16), 200, np.uint8), "L").save(tmp_path / "small.png")
    mask, notes = load_mask(tmp_path / "small.png", (32, 24))
    assert mask.shape == (1, 1, 24, 32) and bool((mask == 1).all()) and "resized" in notes[0]
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, 16:, :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    mask, notes = load_mask(tmp_path / "rgba.png", (32, 24))
    assert notes == [] and mask[..., :16].sum() == 0 and bool((mask[..., 16:] == 1).all())


# --- CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    init_image().save(tmp_path / "in.png")
    mask_image().save(tmp_path / "mask.png")

    def run(model, *args, expect=0):
        result = CliRunner().invoke(app, ["img2img", "a red door", "-i", "in.png", "-m", str(model), "--steps", "3",
                                          "--device", "cpu", "--dtype", "fp32", "--seed", "2", *args])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def test_cli_inpaint_writes_png_with_mode_and_mask(cli, tiny_inpaint, tmp_path):
    cli(tiny_inpaint, "--mask", "mask.png", "-o", "out.png")
    assert Image.open(tmp_path / "out.png").size == (SIZE, SIZE)
    meta = json.loads(CliRunner().invoke(app, ["inspect", "out.png", "--json"]).stdout)
    assert meta["sdcli"]["mode"] == "inpaint" and meta["sdcli"]["mask"] == "mask.png"
    assert meta["sdcli"]["config"]["strength"] == 1.0  # inpainting's default: from pure noise
    cli(tiny_inpaint, "--mask", "mask.png", "--strength", "0.5", "-o", "half.png")
    assert json.loads(CliRunner().invoke(app, ["inspect", "half.png", "--json"]).stdout)["sdcli"]["config"][
        "strength"] == 0.5


def test_cli_inpaint_model_without_mask_is_usage_error(cli, tiny_inpaint, tmp_path):
    result = cli(tiny_inpaint, "-o", "out.png", expect=2)
    assert "inpainting model" in result.stderr and "--mask" in result.stderr
    assert not (tmp_path / "out.png").exists()


def test_cli_mask_with_plain_model_inpaints(cli, tiny_sd1, tmp_path):  # noqa: F811
    """Issue 28: an ordinary model inpaints too (A1111's latent blend, tests/test_inpaint_any.py); the refusal this
    test used to check is gone."""
    cli(tiny_sd1, "--mask", "mask.png", "-o", "out.png")
    meta = json.loads(CliRunner().invoke(app, ["inspect", "out.png", "--json"]).stdout)
    assert meta["sdcli"]["mode"] == "inpaint" and meta["sdcli"]["config"]["strength"] == 0.75  # A1111's default


def test_generate_with_an_inpainting_model_is_usage_error(tiny_inpaint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", "x", "-m", str(tiny_inpaint), "-W", "64", "-H", "64",
                                      "--steps", "2", "-o", "g.png"])
    assert result.exit_code == 2 and "inpainting model" in result.stderr and "--mask" in result.stderr
    assert not (tmp_path / "g.png").exists()
