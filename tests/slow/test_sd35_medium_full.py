"""The real SD3.5 Medium architecture (MMDiT-X: 24 joint blocks of width 1536, dual attention in blocks 0-12, q/k
RMS norm, the 384 x 384 position table; 2.24 B parameters) and the full 16-channel VAE, on random weights, against
diffusers' StableDiffusion3Pipeline: 64x64, 2 euler steps, CFG 5.

The text encoders are not the subject (tests/test_sd3_pipeline.py covers them at tiny size; T5-XXL alone is 19 GB
in fp32): both sides get the same random conditioning of the real shapes (context (1, 77 + 256, 4096), pooled
(1, 2048)). sdcli loads a Stability single file (the DiT and the VAE, no encoders; scripts/bench_dit.py's random
bf16 file in .bench/, written once, tensor by tensor: 4.5 GB); diffusers gets the same tensors through
sdcli/formats/sd3_layouts.to_diffusers. Both compute in fp32. The two never sit in memory together (fp32: ~9 GB
each): sdcli renders and is freed, then diffusers runs. Latents within 1e-4 of their largest magnitude, pixels
within 2 levels on 99%; the process's peak RSS stays under 24 GiB (~14 GB expected: diffusers' fp32 weights beside
the bf16 file's tensors not yet cast).

    SDCLI_SLOW=1 .venv/bin/python -m pytest tests/slow/test_sd35_medium_full.py -q            # full size
    SDCLI_SLOW=1 SDCLI_SLOW_PRESET=tiny .venv/bin/python -m pytest tests/slow/test_sd35_medium_full.py -q  # seconds
"""

from __future__ import annotations

import gc
import os
import resource

import numpy as np
import pytest
import torch

from bench_dit import sd3_checkpoint, sd3_configs, sd3_pipeline
from test_sd3_pipeline import assert_latents_close, assert_pixels_close, first_draws, pixels
from sdcli import pipeline as P
from sdcli.loading import checkpoint as ck
from sdcli.sampling.conditioning import Cond

PRESET = os.environ.get("SDCLI_SLOW_PRESET", "full")
SIZE, STEPS, CFG, SEED = 64, 2, 5.0, 7
DIT, VAE16 = sd3_configs(PRESET)
LIMIT = 24 << 30


@pytest.fixture
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def _conds(width: int, pooled: int) -> tuple[Cond, Cond]:
    g = torch.Generator().manual_seed(1)
    make = lambda: Cond(context=torch.randn(1, 77 + 256, width, generator=g),  # noqa: E731
                        y=torch.randn(1, pooled, generator=g))
    return make(), make()


def _ours(path, cond, uncond):
    models = ck.load_models(path, residency="lean")  # the encoders are absent: never staged
    assert models.info.unet == DIT and models.info.vae == VAE16
    plan = P.make_plan("euler", "auto", STEPS, cfg=CFG, family=models.family, size=(SIZE, SIZE))
    latents = P.txt2img(models, plan, cond, uncond, [SEED], SIZE, SIZE)
    return latents, pixels(models, latents)


def _diffusers(path, cond, uncond):
    pipe = sd3_pipeline(str(path), PRESET, torch.float32)  # the file's bf16 tensors cast one at a time
    final = {}

    def keep(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return kwargs

    with torch.no_grad():
        out = pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.y, negative_prompt_embeds=uncond.context,
                   negative_pooled_prompt_embeds=uncond.y, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                   guidance_scale=CFG, latents=first_draws([SEED]), output_type="pil", callback_on_step_end=keep)
    return final["latents"], [np.asarray(out.images[0])]


def test_sd35_medium_architecture_matches_diffusers(all_threads):
    cfg = DIT
    if PRESET == "full":  # the real SD3.5 Medium, as Stability's sd3.5_medium.safetensors header says
        assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.pos_embed_max_size) == (24, 1536, 24, 384)
        assert cfg.dual_attention_layers == tuple(range(13)) and cfg.qk_norm
    path = sd3_checkpoint(PRESET)
    cond, uncond = _conds(cfg.context_dim, cfg.adm_in_channels)
    latents, images = _ours(path, cond, uncond)
    gc.collect()
    ref_latents, ref_images = _diffusers(path, cond, uncond)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(images, ref_images)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10  # KiB on Linux
    assert peak < LIMIT, f"peak RSS {peak / 2**30:.1f} GiB"
    print(f"peak RSS {peak / 2**30:.1f} GiB")
