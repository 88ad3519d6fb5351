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
from safetensors.torch import load_file

from bench_dit import sd3_checkpoint, sd3_configs
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
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from sdcli.formats.sd3_layouts import to_diffusers

    cfg = DIT
    state = load_file(str(path))  # bf16, cast to fp32 one tensor at a time below
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
            attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
            caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.adm_in_channels,
            out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=cfg.dual_attention_layers, qk_norm="rms_norm")  # fmt: skip
    dit = {k.removeprefix("model.diffusion_model."): state.pop(k).float() for k in list(state)
           if k.startswith("model.diffusion_model.")}  # fmt: skip
    transformer.load_state_dict(to_diffusers(dit, cfg.depth), strict=True, assign=True)
    del dit
    n = len(VAE16.ch_mult)
    config = dict(in_channels=3, out_channels=3, block_out_channels=[VAE16.ch * m for m in VAE16.ch_mult],
                  layers_per_block=VAE16.num_res_blocks, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, latent_channels=16, norm_num_groups=32,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    vae = DiffusersVAE(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint({k.removeprefix("first_stage_model."): v.float() for k, v in state.items()},
                                                   config), strict=True)  # fmt: skip
    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), vae=vae,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
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
