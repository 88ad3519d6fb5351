"""The full-size SDXL 1.0 base architecture (2.57 B UNet parameters) against diffusers, on random weights.

Outside the default run (tests/conftest.py leaves tests/slow/ out): run it with

    SDCLI_SLOW=1 .venv/bin/python -m pytest tests/slow -q           # full size: ~7 GB file once, ~18 GB RAM peak
    SDCLI_SLOW=1 SDCLI_SLOW_PRESET=tiny .venv/bin/python -m pytest tests/slow -q   # the same path, tiny (seconds)

The checkpoint is scripts/bench_sdxl.py's (.bench/sdxl-full-fp16.safetensors, made once, tensor by tensor).
fp32 on both sides; an fp32 SDXL is ~14 GB, so the two never sit in memory together: sdcli renders and is freed,
then diffusers' text encoders alone (its single-file loader with unet=None, vae=None), then its UNet alone. The
latent comparison stops before the VAE (the tiny tests cover decoding). 64x64, 3 euler karras steps, cfg 5.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from _fixtures_pipeline import clip_tokenizer_dir  # noqa: F401
from bench_sdxl import ensure_checkpoint
from test_models_sdxl import _config_folder
from test_pipeline_oracle import first_draws
from sdcli.loading import checkpoint as ck
from sdcli import pipeline as P
from sdcli.app.refine import sized
from sdcli.config import RunConfig

PRESET = os.environ.get("SDCLI_SLOW_PRESET", "full")
SIZE, STEPS, CFG, SEED = 64, 3, 5.0, 7
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, 4k", "blurry"
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          prediction_type="epsilon", timestep_spacing="linspace")  # fmt: skip
RTOL = 1e-4  # relative to the largest magnitude of the reference


def assert_rel_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.1, f"degenerate oracle {what}"
    err = float((got - ref).abs().max() / max(1.0, float(ref.abs().max())))
    assert err <= RTOL, f"{what}: max |diff| / max(1, max |ref|) = {err:.2e} > {RTOL}"


@pytest.fixture
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def ours(path):
    """sdcli end to end (text, size vector, sampling) in fp32; only tensors come back, the models are freed."""
    models = ck.load_models(path, dtype=torch.float32)
    cond, uncond = sized(models, RunConfig(), P.encode_text(models, PROMPT, NEGATIVE), (SIZE, SIZE))
    plan = P.make_plan("euler", "karras", STEPS, cfg=CFG, family=models.family)
    latents = P.txt2img(models, plan, cond, uncond, [SEED], SIZE, SIZE)
    del models
    gc.collect()
    return cond, uncond, plan, latents


def diffusers_text(path, config):
    pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                      torch_dtype=torch.float32, unet=None, vae=None,
                                                      add_watermarker=False)  # fmt: skip
    with torch.no_grad():
        out = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    del pipe
    gc.collect()
    return out


def diffusers_latents(path, config, plan, embeds):
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config), subfolder="unet",
                                                 local_files_only=True, torch_dtype=torch.float32)  # fmt: skip
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(**SD),
                                     add_watermarker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(sigmas=plan.sigmas.tolist())  # to read init_noise_sigma for these sigmas
    gens, noise = first_draws([SEED])  # our first draw is the initial noise (tests/test_pipeline_oracle.py)
    start = noise * float(plan.sigmas[0]) / pipe.scheduler.init_noise_sigma
    pe, npe, pp, npp = embeds
    with torch.no_grad():
        out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pp,
                   negative_pooled_prompt_embeds=npp, height=SIZE, width=SIZE, guidance_scale=CFG, latents=start,
                   generator=gens[0], sigmas=plan.sigmas.tolist(), output_type="latent")  # fmt: skip
    return out.images


def test_full_size_sdxl_equals_diffusers(clip_tokenizer_dir, tmp_path, all_threads):  # noqa: F811
    path = ensure_checkpoint(PRESET)
    config = _config_folder(tmp_path, "sdxl", clip_tokenizer_dir, PRESET)
    cond, uncond, plan, latents = ours(path)
    embeds = diffusers_text(path, config)
    pe, npe, pp, npp = embeds
    assert_rel_close(cond.context, pe, "prompt context")
    assert_rel_close(uncond.context, npe, "negative context")
    assert_rel_close(cond.pooled, pp, "pooled prompt")
    assert_rel_close(uncond.pooled, npp, "pooled negative")
    ref = diffusers_latents(path, config, plan, embeds)
    assert latents.shape == ref.shape == (1, 4, SIZE // 8, SIZE // 8)
    assert_rel_close(latents, ref, "final latents")
