"""FLUX.1 dev and schnell end to end against diffusers' FluxPipeline / FluxImg2ImgPipeline on the same tiny random
weights, through the files as users have them: BFL's DiT alone (no prefix), ae.safetensors, and ComfyUI's clip_l and
t5xxl files (tests/_fixtures_dit.py builds both sides).

The pipelines tokenize and encode the prompts themselves (T5 gives the 512 (dev) / 256 (schnell) tokens, CLIP-L
only its pooled vector, unprojected), pack the 16-channel latent 2x2, and run FlowMatchEulerDiscreteScheduler with
dev's resolution-dependent shift or schnell's shift 1. dev: distilled guidance as a network input; --cfg above 1
is diffusers' true_cfg_scale with the negative prompt. diffusers hands the network (sigma * 1000) / 1000, one ulp
off sigma at most: latents are compared within 1e-4 of their largest magnitude, PNGs within 2 levels on 99% of
the pixels. fp32, CPU, 64x64, 2-4 steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from _fixtures_dit import dit_components, dit_dir, flux_pipeline, tiny_flux, tiny_schnell  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from test_pipeline_oracle import FinalLatents, init_image, posterior_mean  # noqa: F401
from test_sd3_pipeline import assert_latents_close, assert_pixels_close, first_draws, pixels
from sdcli import pipeline as P
from sdcli.app.refine import sized
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.formats.images import pil_to_tensor
from sdcli.loading import checkpoint as ck
from sdcli.models.flux import pack, unpack
from sdcli.output.metadata import read_image_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"


def load(path, components, **kw):
    return ck.load_models(path, vae=components["vae"], text_files={"clip_l": components["clip_l"],
                                                                   "t5": components["t5"]}, **kw)


@pytest.fixture(scope="module")
def dev(tiny_flux, dit_components, clip_tokenizer_dir):  # noqa: F811
    return flux_pipeline(tiny_flux, dit_components, clip_tokenizer_dir, dev=True), load(tiny_flux, dit_components)


@pytest.fixture(scope="module")
def schnell(tiny_schnell, dit_components, clip_tokenizer_dir):  # noqa: F811
    return (flux_pipeline(tiny_schnell, dit_components, clip_tokenizer_dir, dev=False),
            load(tiny_schnell, dit_components))


def conds(models, prompt: str, negative: str | None, guidance: float | None = None):
    cond, uncond = P.encode_text(models, prompt, negative)
    cond, uncond = sized(models, RunConfig(), (cond, uncond), (SIZE, SIZE))
    return P.with_guidance(models, cond, guidance), P.with_guidance(models, uncond, guidance)


def test_files_are_detected_and_loaded(tiny_flux, tiny_schnell, dit_components):  # noqa: F811
    dev_info, schnell_info = ck.detect(tiny_flux), ck.detect(tiny_schnell)
    assert (dev_info.family, schnell_info.family) == ("flux", "flux-schnell")
    assert dev_info.unet.guidance_embed and not schnell_info.unet.guidance_embed
    assert dev_info.vae is None and dev_info.texts == ()  # the DiT alone: the rest comes from its own files
    models = load(tiny_flux, dit_components)
    clip_l, t5 = models.info.texts
    assert (clip_l.projection_dim, clip_l.pooled, t5.d_model) == (None, True, 128)
    assert models.family.text[1].length == 512 and ck.detect(tiny_schnell).spec.text[1].length == 256


@pytest.mark.parametrize("prompt", [PROMPT, ""])
def test_text_conditioning_equals_encode_prompt(dev, prompt):
    """T5's 512 tokens are the context; CLIP-L's pooled output (not projected) is y."""
    pipe, models = dev
    cond, _ = conds(models, prompt, None)
    with torch.no_grad():
        pe, pp, _ = pipe.encode_prompt(prompt, prompt, device="cpu")
    assert cond.context.shape == (1, 512, 128) and cond.y.shape == (1, 32) and float(cond.guidance) == 3.5
    torch.testing.assert_close(cond.context, pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.y, pp, rtol=0, atol=1e-6)


def diffusers_run(pipe, seeds: list[int], steps: int, **call):
    final = FinalLatents()
    noise = pack(first_draws(seeds))  # diffusers draws (B, 16, H/8, W/8) and packs it: the same draw, packed
    out = pipe([PROMPT] * len(seeds), height=SIZE, width=SIZE, num_inference_steps=steps, latents=noise,
               output_type="pil", callback_on_step_end=final, **call)  # fmt: skip
    return unpack(final.latents, SIZE // 8, SIZE // 8), [np.asarray(im) for im in out.images]


def _diffusers_sigmas(pipe, steps: int) -> torch.Tensor:
    """The sigmas FluxPipeline sets: linspace(1, 1/N) with mu from the image's token count."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    mu = calculate_shift((SIZE // 16) ** 2, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.float()


@pytest.mark.parametrize("steps,guidance,seeds", [(4, None, [7]), (3, 5.0, [1, 2])])
def test_dev_txt2img_matches_diffusers(dev, steps, guidance, seeds):
    pipe, models = dev
    plan = P.make_plan("euler", "auto", steps, family=models.family, size=(SIZE, SIZE))
    assert plan.cfg == 1.0 and torch.equal(plan.sigmas, _diffusers_sigmas(pipe, steps))
    cond, uncond = conds(models, PROMPT, None, guidance)
    latents = P.txt2img(models, plan, cond, uncond, seeds, SIZE, SIZE)
    ref_latents, ref_images = diffusers_run(pipe, seeds, steps, guidance_scale=guidance or 3.5)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def test_dev_true_cfg_matches_true_cfg_scale(dev):
    """--cfg 4 with a negative prompt: two calls per step, diffusers' true_cfg_scale (distilled guidance stays)."""
    pipe, models = dev
    plan = P.make_plan("euler", "auto", 3, cfg=4.0, family=models.family, size=(SIZE, SIZE))
    cond, uncond = conds(models, PROMPT, NEGATIVE)
    latents = P.txt2img(models, plan, cond, uncond, [9], SIZE, SIZE)
    ref_latents, ref_images = diffusers_run(pipe, [9], 3, guidance_scale=3.5, true_cfg_scale=4.0,
                                            negative_prompt=[NEGATIVE])  # fmt: skip
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def test_schnell_txt2img_matches_diffusers(schnell):
    """shift 1 (the plain linspace), no guidance, T5 padded to 256 (the model card's)."""
    pipe, models = schnell
    plan = P.make_plan("euler", "auto", 4, family=models.family, size=(SIZE, SIZE))
    assert torch.equal(plan.sigmas[:-1], torch.linspace(1, 0.25, 4)) or \
        torch.allclose(plan.sigmas[:-1], torch.tensor([1.0, 0.75, 0.5, 0.25]), rtol=0, atol=1e-7)  # fmt: skip
    cond, uncond = conds(models, PROMPT, None)
    assert cond.guidance is None and cond.context.shape == (1, 256, 128)
    latents = P.txt2img(models, plan, cond, uncond, [3], SIZE, SIZE)
    ref_latents, ref_images = diffusers_run(pipe, [3], 4, guidance_scale=0.0, max_sequence_length=256)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def test_dev_img2img_matches_diffusers(dev, posterior_mean):  # noqa: F811
    from diffusers import FluxImg2ImgPipeline

    pipe, models = dev
    i2i = FluxImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    plan = P.make_plan("euler", "auto", 4, family=models.family, size=(SIZE, SIZE))
    cond, uncond = conds(models, PROMPT, None)
    init = P.encode_image(models, pil_to_tensor(init_image()))
    latents = P.img2img(models, plan, init, cond, uncond, [3], 0.6)
    final = FinalLatents()
    out = i2i(PROMPT, image=init_image(), strength=0.6, guidance_scale=3.5, height=SIZE, width=SIZE,
              num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pil",
              callback_on_step_end=final)  # fmt: skip
    assert_latents_close(latents, unpack(final.latents, SIZE // 8, SIZE // 8))
    assert_pixels_close(pixels(models, latents), [np.asarray(out.images[0])])


def test_fp8_t5_file_is_up_cast(dev, dit_components, tiny_flux, dit_dir):  # noqa: F811
    """An F8_E4M3 T5 file loads as its values up-cast (the header validator and the strict load accept fp8)."""
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(dit_components["t5"])).items()}
    path = dit_dir / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(state, str(path))
    models = ck.load_models(tiny_flux, vae=dit_components["vae"],
                            text_files={"clip_l": dit_components["clip_l"], "t5": path})
    t5 = models.text_encoders[1]
    assert torch.equal(t5.shared.weight, state["shared.weight"].float())
    assert t5.shared.weight.dtype == torch.float32


# --- the command line -----------------------------------------------------------------------------

def test_generate_end_to_end_with_separate_files(tiny_flux, dit_components, tmp_path):  # noqa: F811
    runner = CliRunner()
    out = tmp_path / "cat.png"
    files = ["--vae", str(dit_components["vae"]), "--clip-l", str(dit_components["clip_l"]),
             "--t5", str(dit_components["t5"])]
    result = runner.invoke(app, ["generate", "a cat", "-m", str(tiny_flux), *files, "--steps", "4", "-o", str(out),
                                 "-W", "64", "-H", "64", "--seed", "5", "--guidance", "4.5"])
    assert result.exit_code == 0, result.output
    meta = read_image_metadata(out)
    text, ours = meta["raw"]["parameters"], meta["sdcli"]
    assert "Distilled CFG Scale: 4.5" in text and "CFG scale: 1," in text and "Sampler: DPM++ 2M" in text
    assert (ours["model"]["family"], ours["config"]["guidance"], ours["config"]["t5"]) == ("flux", 4.5,
                                                                                           "t5xxl.safetensors")
    again = runner.invoke(app, ["verify", str(out), "-m", str(tiny_flux), *files])
    assert again.exit_code == 0, again.output


def test_missing_text_encoder_and_vae_exit_4_naming_the_option(tiny_flux, dit_components, tmp_path):  # noqa: F811
    runner = CliRunner()
    base = ["generate", "a cat", "-m", str(tiny_flux), "--steps", "1", "-o", str(tmp_path / "x.png"),
            "-W", "64", "-H", "64"]
    no_t5 = runner.invoke(app, [*base, "--vae", str(dit_components["vae"]), "--clip-l", str(dit_components["clip_l"])])
    assert no_t5.exit_code == 4 and "--t5" in no_t5.stderr
    no_vae = runner.invoke(app, [*base, "--clip-l", str(dit_components["clip_l"]), "--t5", str(dit_components["t5"])])
    assert no_vae.exit_code == 4 and "--vae" in no_vae.stderr
    stray = runner.invoke(app, [*base, "--clip-g", str(dit_components["clip_g"])])
    assert stray.exit_code == 2 and "--clip-g" in stray.stderr


# --- prompt weights on T5, residency, hires -------------------------------------------------------

def test_t5_weights_as_forge_and_unweighted_prompts_unchanged(dev):
    """A1111 weights on T5 tokens (Forge's T5 engine: scale, then restore the mean); the weighted pieces tokenize
    to the ids of the plain text, BREAK only separates pieces."""
    from sdcli.text.prompts import _apply_weights, encode_t5, t5_units
    from sdcli.text.t5_tokenizer import t5_tokenizer

    _, models = dev
    tok, t5 = t5_tokenizer(), models.text_encoders[1]
    ids, weights = t5_units("a (cat:1.5) BREAK on a [mat]", tok, 16)
    assert ids == tok.encode("a cat on a mat", 16)
    pieces = [("a", 1.0), ("cat", 1.5), ("on a", 1.0), ("mat", 1 / 1.1)]
    expected = [w for text, w in pieces for _ in tok.tokenize(text)]
    assert weights == expected + [1.0] * (16 - len(expected)) and 1.5 in weights
    assert t5_units(PROMPT, tok, 512) == (tok.encode(PROMPT, 512), [1.0] * 512)
    with torch.no_grad():
        plain = t5(torch.tensor([ids]))
        got = encode_t5("a (cat:1.5) BREAK on a [mat]", t5, tok, 16)
    want = _apply_weights(plain, torch.tensor([weights]))
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert torch.allclose(got.mean(), plain.mean(), rtol=1e-5, atol=1e-6)


def test_lean_residency_frees_t5_with_the_clip_encoder(tiny_flux, dit_components):  # noqa: F811
    models = load(tiny_flux, dit_components, residency="lean")
    cond, _ = conds(models, PROMPT, None)
    assert models.parts.peek("text") is not None
    plan = P.make_plan("euler", "auto", 1, family=models.family, size=(SIZE, SIZE))
    P.txt2img(models, plan, cond, None, [1], SIZE, SIZE)
    assert models.parts.peek("text") is None and ("release", "text") in models.parts.events


def test_hires_fix_and_preview_run_on_flux(tiny_flux, dit_components, tmp_path):  # noqa: F811
    """The second pass at 1.5x (rounded to 16 px), its own resolution shift; the cheap preview maps 16 channels."""
    from PIL import Image

    runner = CliRunner()
    out = tmp_path / "h.png"
    result = runner.invoke(app, ["generate", "a cat", "-m", str(tiny_flux), "--vae", str(dit_components["vae"]),
                                 "--clip-l", str(dit_components["clip_l"]), "--t5", str(dit_components["t5"]),
                                 "--steps", "2", "-W", "64", "-H", "64", "--hires-scale", "1.4", "-o", str(out),
                                 "--preview", str(tmp_path / "p.png"), "--sampler", "euler_a"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (96, 96) and Image.open(tmp_path / "p.png").size == (96, 96)
    assert "Hires upscale: 1.4" in read_image_metadata(out)["raw"]["parameters"]


def test_token_merging_is_refused_on_a_transformer(tiny_flux, dit_components, tmp_path):  # noqa: F811
    """--tome-ratio merges tokens in a UNet's blocks: on FLUX it would change nothing while the infotext said it
    did, so it is a usage error before any sampling, and nothing is written."""
    out = tmp_path / "t.png"
    result = CliRunner().invoke(app, ["generate", "a cat", "-m", str(tiny_flux), "--vae", str(dit_components["vae"]),
                                      "--clip-l", str(dit_components["clip_l"]), "--t5", str(dit_components["t5"]),
                                      "--steps", "1", "-W", "64", "-H", "64", "--tome-ratio", "0.5", "-o", str(out)])
    assert result.exit_code == 2 and "token merging applies to UNet models" in result.output
    assert not out.exists()
