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
from types import SimpleNamespace

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from typer.testing import CliRunner

from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir, tiny_sdxl_refiner  # noqa: F401
from test_checkpoint import header_of, read_tsv
from test_models_sdxl import _config_folder
from test_pipeline_oracle import (FinalLatents, assert_latents_close, assert_pixels_close, first_draws, in_our_layout,
                                  init_image, pixels, posterior_mean, unround_timesteps)  # noqa: F401
from sdcli.loading import checkpoint as ck
from sdcli import pipeline as P
from sdcli.app import live_preview, render
from sdcli.app import refine
from sdcli.app.refine import sized
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.runtime.errors import UnsupportedModelError
from sdcli.formats.images import pil_to_tensor

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
    """SD-Turbo (SD 2.1) ships under conditioner.embedders.0.model but has no label_emb: never taken for an SDXL
    refiner (A1111's misfire), and its text weights are named rather than dropped (exit 8)."""
    shapes = {k.replace("cond_stage_model.model.", "conditioner.embedders.0.model."): v
              for k, v in read_tsv(ROOT / "tests" / "data" / "sd21_keys.tsv").items()}
    with pytest.raises(UnsupportedModelError, match="SD 2.x checkpoint has none"):
        ck.detect(header_of(shapes))


# --- the oracle ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl(tiny_sdxl, tmp_path_factory, clip_tokenizer_dir):  # noqa: F811
    """(diffusers' pipeline from its single-file loader, our models from the same file)."""
    config = _config_folder(tmp_path_factory.mktemp("xl_config"), "sdxl", clip_tokenizer_dir)
    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny_sdxl), config=str(config), local_files_only=True,
                                                      torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    in_our_layout(pipe.unet, pipe.vae)
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





# --- the refiner (ensemble of experts) -----------------------------------------------------------

@pytest.fixture(scope="module")
def refiner(tiny_sdxl_refiner, tmp_path_factory, clip_tokenizer_dir):  # noqa: F811
    config = _config_folder(tmp_path_factory.mktemp("xl_refiner_config"), "sdxl-refiner", clip_tokenizer_dir)
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(tiny_sdxl_refiner), config=str(config), local_files_only=True, torch_dtype=torch.float32,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, ck.load_models(tiny_sdxl_refiner, dtype=torch.float32)


@pytest.mark.parametrize("sampler,steps,switch", [("euler", 6, 0.8), ("dpm++_2m", 6, 0.7)])
def test_base_and_refiner_ensemble_matches_diffusers(xl, refiner, sampler, steps, switch, monkeypatch):
    """diffusers' denoising_end (base, latents out still noisy) then denoising_start (refiner, same generators)
    against our split of one schedule: the refiner's own text encoder, its aesthetic-score vector y."""
    (pipe, models), (ref_pipe, ref_models) = xl, refiner
    assert ref_models.info.family == "sdxl-refiner" and len(ref_models.text_encoders) == 1
    plan = our_plan(models, sampler, steps)
    base_plan, rest = P.split_at_switch(plan, switch, models.family)
    assert rest is not None and 1 < len(base_plan.sigmas) - 1 < steps  # both models run
    t = P.schedule.sigma_to_t(plan.sigmas[:-1], P.schedule.sigmas_of(models.family.schedule))
    assert (t - round(1000 * (1 - switch))).abs().min() > 0.5  # DPM-Solver rounds t: stay off the boundary
    cond, uncond = our_conds(models, "blurry")
    rcond, runcond = our_conds(ref_models, "blurry")
    gens = P.generators([5])
    latents = P.txt2img(models, base_plan, cond, uncond, gens, SIZE, SIZE)
    latents = P.continue_sampling(ref_models, rest, latents, rcond, runcond, gens)

    for p in (pipe, ref_pipe):
        p.scheduler = scheduler(sampler)
        if sampler == "dpm++_2m":
            unround_timesteps(monkeypatch, p)
    pipe.scheduler.set_timesteps(**steps_kwargs(sampler, plan))
    ref_gens, noise = first_draws([5])
    sigma0 = float(plan.sigmas[0])
    start = noise * sigma0 / ((sigma0**2 + 1) ** 0.5 if sampler == "dpm++_2m" else 1)
    handed = pipe(PROMPT, negative_prompt="blurry", height=SIZE, width=SIZE, guidance_scale=CFG,
                  latents=start / pipe.scheduler.init_noise_sigma, generator=ref_gens, output_type="latent",
                  denoising_end=switch, **steps_kwargs(sampler, plan)).images
    final = FinalLatents()
    out = ref_pipe(PROMPT, image=handed, negative_prompt="blurry", guidance_scale=CFG, generator=ref_gens,
                   denoising_start=switch, output_type="pil", callback_on_step_end=final,
                   **steps_kwargs(sampler, plan))
    assert_latents_close(latents, final.latents)
    assert_pixels_close(pixels(ref_models, latents), [np.asarray(out.images[0])])  # the refiner's VAE decodes


def test_refiner_run_records_and_replays(tiny_sdxl, tiny_sdxl_refiner, tmp_path):  # noqa: F811
    """generate --refiner: A1111's Refiner fields, sdcli's record; verify and --from-image need it again."""
    from sdcli.output.metadata import read_image_metadata

    runner = CliRunner()
    out = tmp_path / "r.png"
    args = ["-m", str(tiny_sdxl), "--dtype", "fp32", "--progress", "none"]
    made = runner.invoke(app, ["generate", "a cat", *args, "--refiner", str(tiny_sdxl_refiner), "--refiner-switch",
                               "0.7", "--steps", "4", "--sampler", "euler", "-W", "64", "-H", "64", "--seed", "3",
                               "-o", str(out)])
    assert made.exit_code == 0, made.output
    meta = read_image_metadata(out)
    extra = meta["parameters"]["extra"]
    assert extra["Refiner switch at"] == "0.7" and extra["Refiner"].startswith(tiny_sdxl_refiner.stem + " [")
    assert meta["sdcli"]["refiner"]["family"] == "sdxl-refiner"
    missing = runner.invoke(app, ["verify", str(out), "-m", str(tiny_sdxl)])
    assert missing.exit_code == 2 and "--refiner" in missing.stderr
    again = runner.invoke(app, ["verify", str(out), "-m", str(tiny_sdxl), "--refiner", str(tiny_sdxl_refiner),
                                "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["identical"], again.output
    no_refiner = tmp_path / "n.png"
    plain = runner.invoke(app, ["generate", "a cat", *args, "--steps", "4", "--sampler", "euler", "-W", "64", "-H",
                                "64", "--seed", "3", "-o", str(no_refiner)])
    assert plain.exit_code == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(no_refiner)))
    replay = runner.invoke(app, ["generate", "--from-image", str(out), *args, "--refiner", str(tiny_sdxl_refiner),
                                 "-o", str(tmp_path / "again.png")])
    assert replay.exit_code == 0, replay.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
    hires = runner.invoke(app, ["generate", "a cat", *args, "--refiner", str(tiny_sdxl_refiner), "--hires-scale", "2"])
    assert hires.exit_code == 2


# --- LoRA ----------------------------------------------------------------------------------------

def test_kohya_sdxl_lora_reaches_both_text_encoders_and_the_unet(tiny_sdxl, tmp_path):  # noqa: F811
    """lora_te1_ -> CLIP-L, lora_te2_ -> bigG, lora_unet_ in sgm (LDM) names and in diffusers names: each merged
    as W + weight * alpha / rank * up @ down."""
    from safetensors.torch import save_file

    from sdcli.loading.lora import LoraSpec, apply_lora

    models = ck.load_models(tiny_sdxl, dtype=torch.float32)
    l_enc, g_enc = models.text_encoders
    unet = models.unet
    targets = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": l_enc.transformer.encoder.layers[0].self_attn.q_proj,
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": g_enc.transformer.encoder.layers[1].mlp.fc1,
        "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k":
            unet.input_blocks[7][1].transformer_blocks[1].attn2.to_k,
        "lora_unet_down_blocks_1_attentions_0_proj_in": unet.input_blocks[4][1].proj_in,
    }
    g, tensors, expected, rank = torch.Generator().manual_seed(4), {}, {}, 4
    for key, module in targets.items():
        out_f, in_f = module.weight.shape
        down, up = torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(2.0)})
        expected[key] = module.weight + 0.5 * (2.0 / rank) * (up @ down)
    save_file(tensors, str(tmp_path / "xl_lora.safetensors"))
    report = apply_lora(models, LoraSpec(tmp_path / "xl_lora.safetensors", 0.5))
    assert (report.applied, report.total) == (4, 4)
    for key, module in targets.items():
        torch.testing.assert_close(module.weight, expected[key], rtol=1e-6, atol=1e-6)


# --- the SDXL VAE in fp16 --------------------------------------------------------------------------

def test_fp16_run_keeps_the_sdxl_vae_in_fp32_unless_a_vae_is_given(tiny_sdxl, tmp_path):  # noqa: F811
    half = ck.load_models(tiny_sdxl, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float32  # SDXL's VAE overflows fp16 (force_upcast)
    from safetensors.torch import save_file
    from safetensors import safe_open

    with safe_open(str(tiny_sdxl), "pt") as f:
        vae = {k: f.get_tensor(k) for k in f.keys() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "fixed_vae.safetensors"))
    fixed = ck.load_models(tiny_sdxl, vae=tmp_path / "fixed_vae.safetensors", dtype=torch.float16)
    assert next(fixed.vae.parameters()).dtype == torch.float16  # an fp16-fix VAE given with --vae


def test_encode_decode_record_the_family_and_embeddings_are_refused(tiny_sdxl, tmp_path):  # noqa: F811
    from sdcli.output.latents import load_latent

    runner = CliRunner()
    init_image().save(tmp_path / "in.png")
    enc = runner.invoke(app, ["encode", str(tmp_path / "in.png"), "-m", str(tiny_sdxl), "--dtype", "fp32",
                              "-o", str(tmp_path / "in.safetensors")])
    assert enc.exit_code == 0, enc.output
    lf = load_latent(tmp_path / "in.safetensors")
    assert (lf.family, lf.scale_factor) == ("sdxl", 0.13025)
    dec = runner.invoke(app, ["decode", str(tmp_path / "in.safetensors"), "-m", str(tiny_sdxl), "--dtype", "fp32",
                              "-o", str(tmp_path / "out.png")])
    assert dec.exit_code == 0, dec.output
    text = runner.invoke(app, ["encode", "--text", "a cat", "-m", str(tiny_sdxl), "-o", str(tmp_path / "e.st")])
    assert text.exit_code == 8 and "pooled" in text.stderr


# --- SDXL inpainting (9-channel UNet) ------------------------------------------------------------

def test_inpaint_matches_diffusers(tiny_sdxl_dir, clip_tokenizer_dir, posterior_mean, tmp_path):  # noqa: F811
    """StableDiffusionXLInpaintPipeline (strength 1: pure noise; diffusers' default 0.9999 is not) on a 9-channel
    tiny SDXL: UNet input cat([latent, mask, masked-image latent]), SDXL's conditioning and latent scale."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from make_checkpoint import make_checkpoint
    from test_inpaint import mask_image

    from sdcli.formats.images import load_mask

    path = make_checkpoint(tiny_sdxl_dir / "tiny_sdxl_inpaint.safetensors", family="sdxl", size="tiny", seed=2,
                           inpaint=True)
    models = ck.load_models(path, dtype=torch.float32)
    assert models.info.family == "sdxl" and models.info.inpaint
    config = _config_folder(tmp_path, "sdxl", clip_tokenizer_dir)
    unet_config = json.loads((config / "unet" / "config.json").read_text())
    (config / "unet" / "config.json").write_text(json.dumps({**unet_config, "in_channels": 9}))
    pipe = StableDiffusionXLInpaintPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                             torch_dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler("euler")
    mask_image().save(tmp_path / "mask.png")
    plan = our_plan(models, "euler", 3)
    cond, uncond = our_conds(models, "blurry")
    image = pil_to_tensor(init_image())
    mask, _ = load_mask(tmp_path / "mask.png", (SIZE, SIZE))
    latents = P.txt2img(models, plan, cond, uncond, [4], SIZE, SIZE,
                        extra=P.inpaint_conditioning(models, image, mask))
    pipe.scheduler.set_timesteps(sigmas=plan.sigmas.tolist())
    gens, noise = first_draws([4])
    final = FinalLatents()
    out = pipe(PROMPT, image=init_image(), mask_image=mask_image(), strength=1.0, negative_prompt="blurry",
               height=SIZE, width=SIZE, guidance_scale=CFG, generator=gens,
               latents=noise * float(plan.sigmas[0]) / pipe.scheduler.init_noise_sigma, output_type="pil",
               callback_on_step_end=final, sigmas=plan.sigmas.tolist())
    assert_latents_close(latents, final.latents)
    assert_pixels_close(pixels(models, latents), [np.asarray(out.images[0])])


# --- hires fix, prompt editing, metadata ---------------------------------------------------------

def test_each_pass_conditions_on_its_own_size(xl):
    """A1111 builds the hires pass's SDXL conditioning with the hires size; given sizes apply to both passes."""
    from sdcli.families.sdxl import base_values
    from sdcli.jobs import single_job
    from sdcli.models.unet import sdxl_vector
    from sdcli.text.editing import ScheduledCond

    _, models = xl
    cfg = RunConfig(steps=2, width=64, height=64, hires_scale=1.5, crop_coords="4,8", negative="blurry")
    p = render.prepare(models, cfg, single_job("a [cat:dog:0.5]", cfg))
    assert isinstance(p.cond, ScheduledCond) and p.hires.size == (96, 96)
    for conds, size in (((p.cond, p.uncond), 64), (p.hires.conds, 96)):
        for value in conds:
            for _, c in value.entries if isinstance(value, ScheduledCond) else [(None, value)]:
                values = base_values(refine.size_cond(cfg, (size, size)), False)
                assert values == (size, size, 4, 8, size, size)
                torch.testing.assert_close(c.y, sdxl_vector(c.pooled, values, models.unet.config.adm_in_channels))


def test_size_options_are_recorded_and_replayed(tiny_sdxl, tmp_path):  # noqa: F811
    from sdcli.output.metadata import read_image_metadata

    runner = CliRunner()
    out = tmp_path / "s.png"
    args = ["-m", str(tiny_sdxl), "--dtype", "fp32", "--progress", "none", "--steps", "1", "-W", "64", "-H", "64"]
    made = runner.invoke(app, ["generate", "a cat", *args, "--target-size", "512x384", "--seed", "2", "-o", str(out)])
    assert made.exit_code == 0, made.output
    meta = read_image_metadata(out)
    assert meta["parameters"]["extra"]["Target size"] == "512x384"
    assert meta["sdcli"]["config"]["target_size"] == "512x384"
    again = runner.invoke(app, ["verify", str(out), "-m", str(tiny_sdxl), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["identical"], again.output


def test_seamless_and_preview_run_on_sdxl(tiny_sdxl, tmp_path):  # noqa: F811
    """--seamless and --preview run on SDXL; the live preview is given SDXL's latent-to-RGB factors."""
    from sdcli.families import by_name

    runner = CliRunner()
    args = ["-m", str(tiny_sdxl), "--dtype", "fp32", "--progress", "none", "--steps", "2", "-W", "64", "-H", "64",
            "--seed", "9", "--seamless", "--preview", str(tmp_path / "p.png")]
    made = runner.invoke(app, ["generate", "a cat", *args, "-o", str(tmp_path / "s.png")])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "p.png").is_file() and Image.open(tmp_path / "s.png").size == (64, 64)
    models = ck.load_models(tiny_sdxl, dtype=torch.float32)
    writer = live_preview.step_callback(None, SimpleNamespace(preview=str(tmp_path / "q.png")), models, None)
    assert writer.rgb_factors == by_name("sdxl").latent.rgb_factors != by_name("sd1").latent.rgb_factors


def test_refiner_sees_prompt_editing_where_the_base_left_it():
    from sdcli.text.editing import ScheduledCond

    schedule = ScheduledCond(((4, "a"), (9, "b")))
    assert refine.after(schedule, 3).entries == ((1, "a"), (6, "b"))  # evaluation 0 of the refiner is 3 of the run
    assert refine.after(schedule, 6).entries == ((3, "b"),)
    assert refine.after(schedule, 12).entries == ((9, "b"),)  # past every end: the last text stays
    assert refine.after("plain", 5) == "plain"


# --- textual inversion ---------------------------------------------------------------------------

def test_sdxl_embedding_reaches_both_encoders_as_diffusers(xl, tmp_path):
    """An SDXL embedding file (clip_l and clip_g vectors) in a prompt: each encoder takes its own rows; the context
    equals diffusers' after load_textual_inversion into text_encoder and text_encoder_2. (The pooled vector is
    not compared: transformers takes it at argmax(ids), the embedding's added id; we take the first EOS, as
    sd.cpp does and A1111's ids (the EOS is the largest of CLIP's own) imply.)"""
    import copy

    from _fixtures_embeddings import random_vectors, write_embedding

    pipe, models = xl
    vectors = {"clip_l": random_vectors(2, 64, 1), "clip_g": random_vectors(2, 128, 2)}
    write_embedding(tmp_path / "emb" / "xlemb.safetensors", "sdxl", vectors)
    ours = P.with_embeddings(models, tmp_path / "emb")
    cond, _ = P.encode_text(ours, "a photo of xlemb, a cat", "blurry")
    plain, _ = P.encode_text(models, "a photo of xlemb, a cat", "blurry")
    ref = StableDiffusionXLPipeline(**{**pipe.components, **{k: copy.deepcopy(pipe.components[k]) for k in (
        "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")}})
    ref.load_textual_inversion(vectors["clip_l"], token="xlemb", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(vectors["clip_g"], token="xlemb", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    with torch.no_grad():
        pe, _, _, _ = ref.encode_prompt("a photo of xlemb, a cat", device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.context, pe, rtol=0, atol=1e-5)
    assert not torch.allclose(cond.context[..., :64], plain.context[..., :64], atol=1e-3)  # CLIP-L half moved
    assert not torch.allclose(cond.context[..., 64:], plain.context[..., 64:], atol=1e-3)  # bigG half moved
