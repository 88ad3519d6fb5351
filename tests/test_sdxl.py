"""SDXL end to end against diffusers on the same tiny random weights, through the real single-file layout.

diffusers' StableDiffusionXLPipeline is built by its own single-file loader from the file sdcli loads
(scripts/make_checkpoint.py's tiny SDXL: CLIP-L 64 wide, bigG 128 wide with a 128 -> 96 projection, depth 2 on a
level), with a local config folder so it runs offline (tests/test_models_sdxl.py). The conventions that line the
two up (first generator draw = initial noise, Euler given our sigmas, DPM-Solver's unrounded timestep, img2img's
posterior mean) are tests/test_pipeline_oracle.py's. fp32, CPU, 64x64, 2-4 steps.
"""

from __future__ import annotations

import dataclasses
import json

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from diffusers import StableDiffusionXLPipeline
from typer.testing import CliRunner

from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir, tiny_sdxl_refiner  # noqa: F401
from test_checkpoint import header_of, read_tsv
from test_models_sdxl import _config_folder
from test_pipeline_oracle import (FinalLatents, assert_latents_close, assert_pixels_close, first_draws, init_image,
                                  pixels, posterior_mean, unround_timesteps)  # noqa: F401
from sdcli import checkpoint as ck
from sdcli import pipeline as P
from sdcli.app import render
from sdcli.app.render import sized
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.images import pil_to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          prediction_type="epsilon")
SIZE = 64
CFG = 5.0
PROMPT = "a photo of an astronaut riding a horse, 4k"


# --- detection -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,family,context,adm,texts", [
    ("sdxl_base_keys.tsv", "sdxl", 2048, 2816, ((768, 12, None, 49407), (1280, 32, 1280, 0))),
    ("sdxl_refiner_keys.tsv", "sdxl-refiner", 1280, 2560, ((1280, 32, 1280, 0),)),
])
def test_real_layouts_are_detected_with_every_part(name, family, context, adm, texts):
    shapes = read_tsv(ROOT / "tests" / "data" / name)
    info = ck.detect(header_of(shapes))
    assert (info.family, info.unet.context_dim, info.unet.adm_in_channels, info.inpaint) == (family, context, adm, False)
    assert tuple((t.hidden_size, t.num_layers, t.projection_dim, t.pad_id) for t in info.texts) == texts
    assert info.unet.head_dim == 64 and info.unet.use_linear_in_transformer
    shapes["model.diffusion_model.input_blocks.0.0.weight"] = (info.unet.model_channels, 9, 3, 3)
    assert ck.detect(header_of(shapes)).inpaint  # SDXL inpainting: the same family, a 9-channel UNet


def test_sd_turbo_layout_is_not_sdxl():
    """SD-Turbo (SD 2.1) ships under conditioner.embedders.0.model but has no label_emb: never an SDXL family."""
    shapes = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
              for k, v in read_tsv(ROOT / "tests" / "data" / "sd21_keys.tsv").items()}
    assert ck.detect(header_of(shapes)).family == "sd2"


# --- the oracle ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl(tiny_sdxl, tmp_path_factory, clip_tokenizer_dir):  # noqa: F811
    """(diffusers' pipeline from its single-file loader, our models from the same file)."""
    config = _config_folder(tmp_path_factory.mktemp("xl_config"), "sdxl", clip_tokenizer_dir)
    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny_sdxl), config=str(config), local_files_only=True,
                                                      torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ck.load_models(tiny_sdxl, dtype=torch.float32)


def scheduler(sampler: str):
    if sampler == "euler":
        return EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    return DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                       final_sigmas_type="zero")


def our_plan(models, sampler: str, steps: int):
    """Our karras plan; DPM-Solver computes its own karras sigmas from a float32 table: checked close, then used
    (test_pipeline_oracle.our_plan says why)."""
    plan = P.make_plan(sampler, "karras", steps, cfg=CFG, family=models.family)
    if sampler == "dpm++_2m":
        sched = scheduler(sampler)
        sched.set_timesteps(steps)
        torch.testing.assert_close(plan.sigmas, sched.sigmas.float(), rtol=3e-5, atol=0)
        plan = dataclasses.replace(plan, sigmas=sched.sigmas.float())
    return plan


def steps_kwargs(sampler: str, plan) -> dict:
    return {"sigmas": plan.sigmas.tolist()} if sampler == "euler" else {"num_inference_steps": len(plan.sigmas) - 1}


def our_conds(models, negative: str, size=(SIZE, SIZE), **cfg):
    cond, uncond = P.encode_text(models, PROMPT, negative)
    return sized(models, RunConfig(**cfg), (cond, uncond), size)


# --- text ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [PROMPT, "", "(a cat:1.3) on a [mat], ünïcödé ✓ " + "word " * 73])
def test_text_conditioning_equals_encode_prompt(xl, prompt):
    """Both encoders through the loader: context (CLIP-L | bigG penultimate, no final norm) and bigG's pooled
    vector equal diffusers' encode_prompt. diffusers neither weights nor chunks: the weighted/long prompt is
    compared on diffusers' prompt_embeds of the same token windows built without weights."""
    pipe, models = xl
    cond, uncond = P.encode_text(models, prompt, "blurry")
    plain = prompt.replace("(a cat:1.3)", "a cat").replace("[mat]", "mat")
    with torch.no_grad():
        pe, npe, pp, npp = pipe.encode_prompt(plain, device="cpu", do_classifier_free_guidance=True,
                                              negative_prompt="blurry")
    assert cond.context.shape[-1] == 64 + 128 and cond.pooled.shape == (1, 96)
    torch.testing.assert_close(cond.pooled, pp, rtol=0, atol=1e-6)  # pooled: the first chunk, never weighted
    if plain == prompt and len(prompt.split()) < 70:
        torch.testing.assert_close(cond.context, pe, rtol=0, atol=1e-6)
    else:  # two 77-token chunks here; the weights moved the first one
        assert cond.context.shape[1] == 154 and not torch.allclose(cond.context[:, :77], pe, atol=1e-3)
    torch.testing.assert_close(uncond.context[:, :77], npe, rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond.pooled, npp, rtol=0, atol=1e-6)


def test_empty_negative_is_zeros_as_force_zeros_for_empty_prompt(xl):
    pipe, models = xl
    cond, uncond = P.encode_text(models, PROMPT, "")
    with torch.no_grad():
        _, npe, _, npp = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    assert not npe.any() and not npp.any()
    assert torch.equal(uncond.context, npe) and torch.equal(uncond.pooled, npp)


# --- txt2img / img2img ---------------------------------------------------------------------------

def diffusers_txt2img(pipe, sampler, plan, seeds, negative, monkeypatch, **call):
    pipe.scheduler = scheduler(sampler)
    if sampler == "dpm++_2m":
        unround_timesteps(monkeypatch, pipe)
    pipe.scheduler.set_timesteps(**steps_kwargs(sampler, plan))
    gens, noise = first_draws(seeds)
    sigma0 = float(plan.sigmas[0])
    x = noise * sigma0
    start = x / (sigma0**2 + 1) ** 0.5 if sampler == "dpm++_2m" else x
    final = FinalLatents()
    out = pipe([PROMPT] * len(seeds), negative_prompt=negative and [negative] * len(seeds), height=SIZE, width=SIZE,
               guidance_scale=CFG, latents=start / pipe.scheduler.init_noise_sigma, generator=gens,
               output_type="pil", callback_on_step_end=final, **steps_kwargs(sampler, plan), **call)
    return final.latents, [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("sampler,steps,negative,sizes", [
    ("euler", 3, None, {}),
    ("dpm++_2m", 4, "blurry", {}),
    ("euler", 2, "blurry", {"original_size": "96x80", "crop_coords": "8,16", "target_size": "48x56"}),
])
def test_txt2img_matches_diffusers(xl, sampler, steps, negative, sizes, monkeypatch):
    pipe, models = xl
    plan = our_plan(models, sampler, steps)
    cond, uncond = our_conds(models, negative or "", **sizes)
    latents = P.txt2img(models, plan, cond, uncond, [7], SIZE, SIZE)
    call = {}
    if sizes:  # diffusers takes (height, width) and (top, left)
        call = dict(original_size=(80, 96), crops_coords_top_left=(8, 16), target_size=(56, 48))
    ref_latents, ref_images = diffusers_txt2img(pipe, sampler, plan, [7], negative, monkeypatch, **call)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def test_img2img_matches_diffusers(xl, posterior_mean, monkeypatch):  # noqa: F811
    pipe, models = xl
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=False)
    i2i.set_progress_bar_config(disable=True)
    i2i.scheduler = scheduler("euler")
    plan = our_plan(models, "euler", 4)
    cond, uncond = our_conds(models, "blurry")
    init = P.encode_image(models, pil_to_tensor(init_image()))
    latents = P.img2img(models, plan, init, cond, uncond, [3], 0.5)
    final = FinalLatents()
    out = i2i(PROMPT, image=init_image(), strength=0.5, negative_prompt="blurry", guidance_scale=CFG,
              generator=torch.Generator().manual_seed(3), output_type="pil", callback_on_step_end=final,
              sigmas=plan.sigmas.tolist())
    assert_latents_close(latents, final.latents)
    assert_pixels_close(pixels(models, latents), [np.asarray(out.images[0])])


# --- loading -------------------------------------------------------------------------------------

def test_diffusers_folder_loads_the_same_weights(xl, tmp_path):
    """diffusers' own conversion of the single file, saved as a folder, loads to the same networks."""
    pipe, models = xl
    pipe.save_pretrained(tmp_path / "xl", safe_serialization=True)
    folder = ck.load_models(tmp_path / "xl", dtype=torch.float32)
    assert folder.info.family == "sdxl" and folder.info.unet == models.info.unet
    for ours, theirs in zip((models.unet, models.vae, *models.text_encoders),
                            (folder.unet, folder.vae, *folder.text_encoders), strict=True):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_defaults_to_the_family_size_and_inspect_names_the_family(tiny_sdxl, tmp_path):  # noqa: F811
    runner = CliRunner()
    report = runner.invoke(app, ["inspect", str(tiny_sdxl), "--json", "--no-hash"])
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    assert data["family"] == "sdxl" and data["dtypes"] == {"F32": data["tensors"] - 1, "I64": 1}  # CLIP-L position_ids
    params = data["parameters"]
    assert set(params) == {"unet", "vae", "text_encoder", "text_encoder_2"} and params["text_encoder_2"] > 0
    assert len(data["sha256"]) == 64 if "sha256" in data else True
    assert render._size(RunConfig(), ck.load_models(tiny_sdxl, dtype=torch.float32), None) == (1024, 1024)
    out = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "a cat", "-m", str(tiny_sdxl), "--steps", "1", "--dtype", "fp32",
                                 "-o", str(out), "--seed", "1", "-W", "64", "-H", "64",
                                 "--original-size", "1024x768", "--crop-coords", "0,8"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["generate", "a cat", "-m", str(tiny_sdxl), "--original-size", "1024"])
    assert bad.exit_code == 2 and "WxH" in bad.stderr



