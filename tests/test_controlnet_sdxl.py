"""SDXL ControlNet through the whole pipeline against diffusers' StableDiffusionXLControlNetPipeline on the same
tiny random weights: the tiny SDXL single file (tests/_fixtures_sdxl.py, diffusers' pipeline from its own
single-file loader as in test_sdxl.py) and a ControlNet that fits it with EVERY parameter random (zero
convolutions and label_emb included). fp32, CPU, 64x64, Euler on our sigmas (test_pipeline_oracle.py's
conventions), tolerances test_sdxl's (SDXL latents 2e-5 of max(1, |ref|), pixels within 1 level).

What SDXL adds over tests/test_controlnet_pipeline.py (SD1): the ControlNet takes the vector y (pooled bigG text
+ size/crop embeddings) through its own label_emb, on both CFG halves, the uncond's y from the negative prompt;
diffusers' default original_size is the prepared hint's size, which is the output size (ours too). Covered:
start/end with weight != 1, guess mode under CFG, non-default size conditioning; weight 0 equals no ControlNet
byte for byte; the CLI's generate with an original-layout file on disk equals diffusers' image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline
from make_checkpoint import controlnet_diffusers_config, controlnet_state_dict, controlnet_to_diffusers
from PIL import Image

from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir  # noqa: F401
from test_pipeline_oracle import FinalLatents, assert_latents_close, assert_pixels_close, first_draws, pixels
from test_sdxl import SD, SIZE, our_conds, xl  # noqa: F401
from sdcli import pipeline as P
from sdcli.control.apply import Unit, attach
from sdcli.models.controlnet import ControlNet, ControlNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, CFG = 5, 6.0
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, 4k", "blurry"


@pytest.fixture(scope="module")
def net(xl):
    """(ours, diffusers') ControlNet for the tiny SDXL UNet (its encoder's config), every tensor random."""
    _, models = xl
    cfg = ControlNetConfig(unet=models.info.unet, hint_widths=(8, 8, 16, 16))
    state = controlnet_state_dict(cfg, seed=21)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(state, strict=True)
    config = controlnet_diffusers_config(cfg)
    ref = ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(controlnet_to_diffusers(state, cfg), strict=True)
    assert hasattr(ours, "label_emb") and ref.add_embedding is not None
    assert all(p.abs().sum() > 0 for p in ref.parameters()), "a zero parameter would hide a mix-up"
    return ours, ref, state


def hint_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), mode="RGB")


def ours(models, units: list[Unit], seed: int, **sizes):
    plan = P.make_plan("euler", "karras", STEPS, cfg=CFG, family=models.family)
    cond, uncond = attach(*our_conds(models, NEGATIVE, **sizes), units)
    latents = P.txt2img(models, plan, cond, uncond, [seed], SIZE, SIZE)
    return plan, latents


def theirs(pipe, controlnet, plan, image, weight, start, end, guess, seed, **call):
    cn = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet, add_watermarker=False)
    cn.set_progress_bar_config(disable=True)
    cn.scheduler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    gens, noise = first_draws([seed])
    final = FinalLatents()
    out = cn(PROMPT, image=image, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=CFG,
             latents=noise * float(plan.sigmas[0]) / cn.scheduler.init_noise_sigma, generator=gens,
             controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
             guess_mode=guess, sigmas=plan.sigmas.tolist(), output_type="pil", callback_on_step_end=final,
             **call)  # fmt: skip
    return final.latents, [np.asarray(out.images[0])]


CASES = [  # weight, start, end, guess mode, our size options, diffusers' (H, W) / (top, left) equivalents
    (0.7, 0.2, 0.8, False, {}, {}),
    (1.4, 0.0, 1.0, True, {}, {}),
    (1.1, 0.0, 0.6, False, {"original_size": "96x80", "crop_coords": "8,16", "target_size": "48x56"},
     {"original_size": (80, 96), "crops_coords_top_left": (8, 16), "target_size": (56, 48)}),
]


@pytest.mark.parametrize("weight,start,end,guess,sizes,call", CASES, ids=["w0.7-0.2..0.8", "guess-w1.4", "sizes"])
def test_sdxl_controlnet_matches_diffusers(xl, net, weight, start, end, guess, sizes, call):
    pipe, models = xl
    image = hint_image(int(weight * 10))
    plan, latents = ours(models, [Unit(net[0], image, weight, start, end, guess)], 3, **sizes)
    ref_latents, ref_images = theirs(pipe, net[1], plan, image, weight, start, end, guess, 3, **call)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def test_weight_zero_is_no_controlnet_and_the_controlnet_changes_the_image(xl, net):
    _, models = xl
    _, plain = ours(models, [], 9)
    _, zero = ours(models, [Unit(net[0], hint_image(1), weight=0.0)], 9)
    assert torch.equal(zero, plain)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(models, zero), pixels(models, plain)))
    _, steered = ours(models, [Unit(net[0], hint_image(1), weight=1.0)], 9)
    assert (steered - plain).abs().max() > 0.1
    assert np.abs(pixels(models, steered)[0].astype(int) - pixels(models, plain)[0].astype(int)).max() > 10


def test_generate_with_an_sdxl_controlnet_file_equals_diffusers(xl, net, tiny_sdxl, tmp_path):  # noqa: F811
    """The CLI path: the ControlNet read from an original-layout file (control_model.*), checked against the SDXL
    model, the hint read from a PNG, the size vector built by render: the PNG equals diffusers' image."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from sdcli.cli import app

    pipe, models = xl
    save_file({"control_model." + k: v for k, v in net[2].items()}, str(tmp_path / "cn.safetensors"))
    hint_image(5).save(tmp_path / "hint.png")
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, [
        "generate", PROMPT, "-m", str(tiny_sdxl), "--negative", NEGATIVE, "--dtype", "fp32", "--sampler", "euler",
        "--schedule", "karras", "--steps", str(STEPS), "--cfg", str(CFG), "--seed", "4", "-W", str(SIZE), "-H",
        str(SIZE), "--controlnet", str(tmp_path / "cn.safetensors"), "--control-image", str(tmp_path / "hint.png"),
        "--control-weight", "0.8", "--control-start", "0.2", "--control-end", "0.8", "--progress", "none",
        "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = P.make_plan("euler", "karras", STEPS, cfg=CFG, family=models.family)
    _, ref_images = theirs(pipe, net[1], plan, hint_image(5), 0.8, 0.2, 0.8, False, 4)
    assert_pixels_close([np.asarray(Image.open(out).convert("RGB"))], ref_images)
