"""SD3.5 end to end against diffusers' StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline on the same tiny
random weights, through Stability's single-file layout (tests/_fixtures_dit.py builds both sides).

The pipelines tokenize and encode the prompts themselves (CLIP-L and bigG penultimate states without the final
norm, zero-padded to T5's width, T5's 256 tokens appended; pooled = CLIP-L unprojected | bigG projected), and run
FlowMatchEulerDiscreteScheduler(shift=3.0) with CFG. Conventions that line the two up, as for SD/SDXL: the first
draw of each image's generator is its noise (passed to diffusers as `latents`), img2img encodes the VAE posterior's
mean. Tolerances: conditioning within 1e-6, final latents within 1e-4 of their largest magnitude (measured: see the
report), decoded PNGs within 2 levels on 99% of the pixels. fp32, CPU, 64x64, 2-4 steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from _fixtures_dit import dit_dir, sd3_pipeline, tiny_sd3  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from test_pipeline_oracle import FinalLatents, init_image, posterior_mean  # noqa: F401
from sdcli import pipeline as P
from sdcli.app.refine import sized
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.formats.images import pil_to_tensor, tensor_to_pil
from sdcli.loading import checkpoint as ck
from sdcli.output.metadata import read_image_metadata

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
CFG = 5.0
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"


@pytest.fixture(scope="module")
def sd3(tiny_sd3, clip_tokenizer_dir):  # noqa: F811
    return sd3_pipeline(tiny_sd3, clip_tokenizer_dir), ck.load_models(tiny_sd3)


def conds(models, prompt: str, negative: str | None):
    cond, uncond = P.encode_text(models, prompt, negative)
    return sized(models, RunConfig(), (cond, uncond), (SIZE, SIZE))


def first_draws(seeds: list[int]) -> torch.Tensor:
    return torch.cat([torch.randn((1, 16, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(s))
                      for s in seeds])  # fmt: skip


def pixels(models, latents) -> list[np.ndarray]:
    images = P.decode_latents(models, latents).images
    return [np.asarray(tensor_to_pil(images[k])) for k in range(images.shape[0])]


def assert_latents_close(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.5, "degenerate oracle output"
    scale = float(ref.abs().max())
    rel = float((got - ref).abs().max()) / scale
    assert rel <= 1e-4, f"latents differ by {rel:.2e} of their largest magnitude"
    return rel


def assert_pixels_close(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (SIZE, SIZE, 3)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert (diff <= 2).mean() >= 0.99, f"{(diff > 2).mean():.2%} of the pixels differ by more than 2 levels"
        assert len(np.unique(b)) > 16, "degenerate oracle image (flat or saturated)"


# --- detection and text ---------------------------------------------------------------------------

def test_single_file_is_detected_with_every_part(tiny_sd3):  # noqa: F811
    info = ck.detect(tiny_sd3)
    assert (info.family, info.prediction) == ("sd3", "flow")
    assert info.unet.dual_attention_layers == (0,) and info.unet.qk_norm and info.unet.patch_size == 2
    assert info.vae.z_channels == 16 and not info.vae.use_quant_conv
    clip_l, clip_g, t5 = info.texts
    assert (clip_l.hidden_size, clip_l.projection_dim, clip_l.pooled) == (32, None, True)  # pooled unprojected
    assert (clip_g.hidden_size, clip_g.projection_dim, clip_g.pad_id) == (64, 40, 0)
    assert (t5.d_model, t5.num_layers) == (128, 2)


@pytest.mark.parametrize("prompt,negative", [(PROMPT, NEGATIVE), (PROMPT, ""), ("", "x")])
def test_text_conditioning_equals_encode_prompt(sd3, prompt, negative):
    """[CLIP-L | bigG] zero-padded to T5's width, then 256 T5 tokens; pooled = L | G; the empty negative is the
    encoding of "" (not zeros)."""
    pipe, models = sd3
    cond, uncond = conds(models, prompt, negative)
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(prompt, prompt, prompt, negative_prompt=negative, device="cpu",
                                              do_classifier_free_guidance=True)  # fmt: skip
    assert cond.context.shape == (1, 77 + 256, 128) and cond.y.shape == (1, 32 + 40)
    assert npe.abs().max() > 0.01  # "" is encoded, not zeros
    for ours, ref in ((cond.context, pe), (uncond.context, npe), (cond.y, pp), (uncond.y, npp)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_without_t5_the_sequence_is_zeros_as_diffusers(sd3, tiny_sd3, dit_dir):  # noqa: F811
    """A file without text_encoders.t5xxl: T5's 256 tokens are zeros (diffusers with text_encoder_3=None)."""
    state = {k: v for k, v in load_file(str(tiny_sd3)).items() if not k.startswith("text_encoders.t5xxl.")}
    path = dit_dir / "sd35_no_t5.safetensors"
    save_file(state, str(path))
    models = ck.load_models(path)
    assert models.text_encoders[2] is None
    pipe, _ = sd3
    cond, _ = conds(models, PROMPT, None)
    pipe_no_t5 = type(pipe)(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    with torch.no_grad():
        pe, _, pp, _ = pipe_no_t5.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu",
                                                do_classifier_free_guidance=False)  # fmt: skip
    assert not cond.context[:, 77:].any()
    torch.testing.assert_close(cond.context, pe, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.y, pp, rtol=0, atol=1e-6)


# --- txt2img / img2img ----------------------------------------------------------------------------

def diffusers_txt2img(pipe, seeds: list[int], steps: int, negative: str, **call):
    final = FinalLatents()
    out = pipe([PROMPT] * len(seeds), negative_prompt=[negative] * len(seeds), height=SIZE, width=SIZE,
               num_inference_steps=steps, guidance_scale=CFG, latents=first_draws(seeds), output_type="pil",
               callback_on_step_end=final, **call)  # fmt: skip
    return final.latents, [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("steps,negative,seeds", [(4, NEGATIVE, [7]), (3, "", [1, 2])])
def test_txt2img_matches_diffusers(sd3, steps, negative, seeds):
    pipe, models = sd3
    plan = P.make_plan("euler", "auto", steps, cfg=CFG, family=models.family, size=(SIZE, SIZE))
    assert torch.equal(plan.sigmas, _diffusers_sigmas(pipe, steps))  # the scheduler's own, bit for bit
    cond, uncond = conds(models, PROMPT, negative)
    latents = P.txt2img(models, plan, cond, uncond, seeds, SIZE, SIZE)
    ref_latents, ref_images = diffusers_txt2img(pipe, seeds, steps, negative)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def _diffusers_sigmas(pipe, steps: int) -> torch.Tensor:
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    return sched.sigmas.float()


def test_img2img_matches_diffusers(sd3, posterior_mean):  # noqa: F811
    """strength 0.6 of 4 steps runs 3 (diffusers' get_timesteps); x = sigma noise + (1 - sigma) latent."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, models = sd3
    i2i = StableDiffusion3Img2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    plan = P.make_plan("euler", "auto", 4, cfg=CFG, family=models.family, size=(SIZE, SIZE))
    cond, uncond = conds(models, PROMPT, NEGATIVE)
    init = P.encode_image(models, pil_to_tensor(init_image()))
    steps = []
    latents = P.img2img(models, plan, init, cond, uncond, [3], 0.6, callback=lambda i, n, *_: steps.append(n))
    final = FinalLatents()
    out = i2i(PROMPT, image=init_image(), strength=0.6, negative_prompt=NEGATIVE, guidance_scale=CFG, height=SIZE, width=SIZE,
              num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pil",
              callback_on_step_end=final)  # fmt: skip
    assert steps == [3, 3, 3]
    assert_latents_close(latents, final.latents)
    assert_pixels_close(pixels(models, latents), [np.asarray(out.images[0])])


def test_batch_is_single_runs_bit_for_bit(sd3):
    _, models = sd3
    plan = P.make_plan("euler_a", "auto", 2, cfg=CFG, family=models.family, size=(SIZE, SIZE))
    cond, uncond = conds(models, PROMPT, NEGATIVE)
    both = P.txt2img(models, plan, cond, uncond, [4, 5], SIZE, SIZE)
    one = P.txt2img(models, plan, cond, uncond, [5], SIZE, SIZE)
    assert torch.equal(both[1:], one)


def test_refused_sampler_and_schedule_name_what_works(sd3):
    from sdcli.runtime.errors import UsageError

    _, models = sd3
    with pytest.raises(UsageError, match="no rectified-flow form.*euler_a"):
        P.make_plan("dpm++_sde", "auto", 4, family=models.family)
    with pytest.raises(UsageError, match="auto or simple"):
        P.make_plan("euler", "karras", 4, family=models.family)


# --- the command line -----------------------------------------------------------------------------

def test_generate_single_file_with_encoders_end_to_end(tiny_sd3, tmp_path):  # noqa: F811
    runner = CliRunner()
    out = tmp_path / "cat.png"
    result = runner.invoke(app, ["generate", "a cat", "-m", str(tiny_sd3), "-o", str(out), "--steps", "2",
                                 "-W", "64", "-H", "64", "--seed", "3", "--sampler", "euler",
                                 "--latent-out", str(tmp_path / "cat.safetensors"), "--flow-shift", "2.5"])
    assert result.exit_code == 0, result.output
    meta = read_image_metadata(out)
    ours = meta["sdcli"]
    assert ours["model"]["family"] == "sd3" and ours["model"]["prediction"] == "flow"
    assert (ours["config"]["cfg"], ours["config"]["schedule"], ours["config"]["flow_shift"]) == (7.0, "simple", 2.5)
    assert "Shift: 2.5" in meta["raw"]["parameters"] and "Schedule type: Simple" in meta["raw"]["parameters"]
    from sdcli.output.latents import load_latent

    lf = load_latent(tmp_path / "cat.safetensors")
    assert lf.latent.shape == (1, 16, 8, 8) and (lf.family, lf.scale_factor, lf.shift_factor) == ("sd3", 1.5305, 0.0609)
    again = runner.invoke(app, ["verify", str(out), "-m", str(tiny_sd3)])
    assert again.exit_code == 0, again.output
    bad = runner.invoke(app, ["generate", "a cat", "-m", str(tiny_sd3), "-o", str(tmp_path / "x.png"),
                              "-W", "72", "-H", "64"])
    assert bad.exit_code == 2 and "multiples of 16" in bad.stderr


def test_missing_t5_is_optional_but_a_missing_clip_names_its_option(tiny_sd3, dit_dir, tmp_path):  # noqa: F811
    state = {k: v for k, v in load_file(str(tiny_sd3)).items() if not k.startswith("text_encoders.clip_g.")}
    path = dit_dir / "sd35_no_clip_g.safetensors"
    save_file(state, str(path))
    result = CliRunner().invoke(app, ["generate", "a cat", "-m", str(path), "-o", str(tmp_path / "x.png"),
                                      "--steps", "1", "-W", "64", "-H", "64"])
    assert result.exit_code == 4 and "--clip-g" in result.stderr


def test_taesd3_draws_the_preview_and_a_taesd_file_is_refused(tiny_sd3, tmp_path):  # noqa: F811
    """A 16-channel tiny decoder named taesd3_* decodes SD3's scaled latents; SD1's taesd_* does not fit."""
    from _fixtures_taesd import write_taesd_files

    _, paths = write_taesd_files(tmp_path / "tae", latent_channels=16)
    taesd3 = paths["decoder"].with_name("taesd3_decoder.safetensors")
    paths["decoder"].rename(taesd3)
    base = ["generate", "a cat", "-m", str(tiny_sd3), "--steps", "1", "-W", "64", "-H", "64"]
    runner = CliRunner()
    ok = runner.invoke(app, [*base, "-o", str(tmp_path / "a.png"), "--preview", str(tmp_path / "p.png"),
                             "--preview-vae", str(taesd3)])
    assert ok.exit_code == 0, ok.output
    assert "taesd3_decoder" in ok.stderr and Image.open(tmp_path / "p.png").size == (64, 64)
    wrong = paths["encoder"].with_name("taesd_decoder.safetensors")
    taesd3.rename(wrong)
    bad = runner.invoke(app, [*base, "-o", str(tmp_path / "b.png"), "--vae", str(wrong)])
    assert bad.exit_code == 3 and "taesd3" in bad.stderr


def test_encode_decode_16_channel_latents_in_both_file_formats(sd3, tiny_sd3, tmp_path):  # noqa: F811
    """encode writes the scaled latent ((z - 0.0609) * 1.5305) with the family and shift; ComfyUI's .latent holds
    raw VAE space; both decode to the same picture as decoding the latent directly."""
    from sdcli.output.latents import load_latent

    _, models = sd3
    init_image().save(tmp_path / "in.png")
    runner = CliRunner()
    for name in ("in.safetensors", "in.latent"):
        enc = runner.invoke(app, ["encode", str(tmp_path / "in.png"), "-m", str(tiny_sd3), "-o", str(tmp_path / name),
                                  "--dtype", "fp32"])  # the oracle's dtype, whatever `auto` picks on this CPU
        assert enc.exit_code == 0, enc.output
    ours, comfy = load_latent(tmp_path / "in.safetensors"), load_latent(tmp_path / "in.latent")
    want = P.encode_image(models, pil_to_tensor(init_image()))
    assert (ours.family, ours.shift_factor, ours.scaled, comfy.scaled) == ("sd3", 0.0609, True, False)
    torch.testing.assert_close(ours.latent, want, rtol=0, atol=0)
    torch.testing.assert_close(comfy.latent, want / 1.5305 + 0.0609, rtol=0, atol=1e-6)
    for name in ("in.safetensors", "in.latent"):
        out = tmp_path / f"{name}.png"
        dec = runner.invoke(app, ["decode", str(tmp_path / name), "-m", str(tiny_sd3), "-o", str(out),
                                  "--dtype", "fp32"])
        assert dec.exit_code == 0, dec.output
        diff = np.abs(np.asarray(Image.open(out)).astype(int) - pixels(models, want)[0].astype(int))
        assert diff.max() <= 1
