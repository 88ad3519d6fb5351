"""ControlNet through the whole pipeline (sdcli/control.py wired into conditioning, the denoiser and the UNet
adapter) against diffusers' StableDiffusionControlNetPipeline on the same tiny random weights, every ControlNet
parameter random (zero convolutions included). fp32, CPU, 64x64, Euler on our sigmas (so both sides sample the
same schedule; how the two conventions are lined up is explained in test_pipeline_oracle.py).

Covered: weight, start/end with diffusers' boundary rule (10 steps, 0.2..0.7), guess mode under CFG, two units at
once, a batch of two; weight 0 equals no ControlNet byte for byte; the ControlNet changes the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from make_checkpoint import controlnet_config, controlnet_diffusers_config, controlnet_state_dict, controlnet_to_diffusers
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread, sd1_models  # noqa: F401
from sdcli import pipeline as P
from sdcli.control.apply import Unit, attach
from sdcli.formats.images import tensor_to_pil
from sdcli.models.controlnet import ControlNet

pytestmark = pytest.mark.usefixtures("one_thread")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SIZE, STEPS, CFG = 64, 10, 6.5
PROMPT, NEGATIVE = "a house by a lake, evening light", "blurry"
RTOL_LATENT = 1e-4  # relative to the latents' largest value
MAX_PIXEL_LEVELS, PIXEL_SHARE = 2, 0.99


def _controlnet(seed: int) -> tuple[ControlNet, ControlNetModel]:
    cfg = controlnet_config("sd1")
    state = controlnet_state_dict(cfg, seed)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(state, strict=True)
    config = controlnet_diffusers_config(cfg)
    ref = ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(controlnet_to_diffusers(state, cfg), strict=True)
    assert all(p.abs().sum() > 0 for p in ref.parameters()), "a zero parameter would hide a mix-up"
    return ours, ref


@pytest.fixture(scope="module")
def nets():
    return [_controlnet(11), _controlnet(12)]


@pytest.fixture(scope="module")
def parts(tiny_sd1_diffusers, clip_tokenizer_dir):  # noqa: F811
    folder = tiny_sd1_diffusers
    return dict(unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
                vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
                text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir, pad_token="<|endoftext|>",
                                                        model_max_length=77))  # fmt: skip


def hint_image(seed: int) -> Image.Image:
    """A random RGB picture at the output size (so neither side resizes it)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), mode="RGB")


def ours(models, units: list[Unit], seeds: list[int]):
    plan = P.make_plan("euler", "normal", STEPS, cfg=CFG)
    cond, uncond = attach(*P.encode_text(models, PROMPT, NEGATIVE), units)
    latents = P.txt2img(models, plan, cond, uncond, seeds, SIZE, SIZE)
    images = P.decode_latents(models, latents).images
    return plan, latents, [np.asarray(tensor_to_pil(images[k])) for k in range(len(seeds))]


class FinalLatents:
    def __call__(self, pipe, i, t, kwargs):
        self.latents = kwargs["latents"].clone()
        return kwargs


def theirs(parts, plan, controlnets, images, scales, starts, ends, guess, seeds):
    multi = len(controlnets) > 1
    pipe = StableDiffusionControlNetPipeline(
        **parts, controlnet=controlnets if multi else controlnets[0],
        scheduler=EulerDiscreteScheduler(**SD, prediction_type="epsilon", timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(sigmas=plan.sigmas.tolist())
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g) for g in gens])
    final = FinalLatents()
    pick = (lambda v: v) if multi else (lambda v: v[0])
    out = pipe([PROMPT] * len(seeds), image=pick(images), negative_prompt=[NEGATIVE] * len(seeds), height=SIZE,
               width=SIZE, guidance_scale=CFG, latents=noise * float(plan.sigmas[0]) / pipe.scheduler.init_noise_sigma,
               generator=gens, controlnet_conditioning_scale=pick(scales), guess_mode=guess,
               control_guidance_start=pick(starts), control_guidance_end=pick(ends), sigmas=plan.sigmas.tolist(),
               output_type="pil", callback_on_step_end=final)  # fmt: skip
    return final.latents, [np.asarray(im) for im in out.images]


def assert_close(latents, images, ref_latents, ref_images):
    assert torch.isfinite(ref_latents).all() and ref_latents.abs().max() > 0.5, "degenerate oracle output"
    scale = float(ref_latents.abs().max())
    err = float((latents - ref_latents).abs().max())
    assert err <= RTOL_LATENT * scale, f"latents differ by {err:.3g} (max |ref| {scale:.3g})"
    for a, b in zip(images, ref_images):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert (diff <= MAX_PIXEL_LEVELS).mean() >= PIXEL_SHARE, f"pixels differ by up to {diff.max()} levels"
        assert len(np.unique(b)) > 16, "degenerate oracle image"


CASES = [  # (weights, starts, ends, guess mode, seeds): one unit unless two weights
    ((0.5,), (0.2,), (0.7,), False, [3]),
    ((1.3,), (0.2,), (0.7,), True, [4]),
    ((1.0,), (0.0,), (1.0,), False, [5, 6]),
    ((0.8, 0.6), (0.0, 0.3), (0.5, 1.0), False, [7]),
]


@pytest.mark.parametrize("weights,starts,ends,guess,seeds", CASES,
                         ids=["w0.5-0.2..0.7", "guess-w1.3-0.2..0.7", "batch2", "two-units"])
def test_controlnet_matches_diffusers(weights, starts, ends, guess, seeds, nets, parts, sd1_models):  # noqa: F811
    images = [hint_image(20 + k) for k in range(len(weights))]
    units = [Unit(nets[k][0], images[k], w, s, e, guess) for k, (w, s, e) in enumerate(zip(weights, starts, ends))]
    plan, latents, pixels = ours(sd1_models, units, seeds)
    ref_latents, ref_pixels = theirs(parts, plan, [n[1] for n in nets[: len(weights)]], images, list(weights),
                                     list(starts), list(ends), guess, seeds)  # fmt: skip
    assert_close(latents, pixels, ref_latents, ref_pixels)


def test_weight_zero_is_no_controlnet_and_the_controlnet_changes_the_image(nets, sd1_models):  # noqa: F811
    _, plain, plain_pixels = ours(sd1_models, [], [9])
    _, zero, zero_pixels = ours(sd1_models, [Unit(nets[0][0], hint_image(1), weight=0.0)], [9])
    assert torch.equal(zero, plain)
    assert all(np.array_equal(a, b) for a, b in zip(zero_pixels, plain_pixels))
    _, steered, steered_pixels = ours(sd1_models, [Unit(nets[0][0], hint_image(1), weight=1.0)], [9])
    assert (steered - plain).abs().max() > 0.1
    assert np.abs(steered_pixels[0].astype(int) - plain_pixels[0].astype(int)).max() > 10


def test_batch_image_equals_single_run_with_controlnet(nets, sd1_models):  # noqa: F811
    """One hint for all images; image k of a batch is bit-identical to a single run with seed+k."""
    unit = Unit(nets[0][0], hint_image(2), weight=0.9, guess_mode=True)
    _, batch, _ = ours(sd1_models, [unit], [30, 31])
    for k, seed in enumerate((30, 31)):
        assert torch.equal(batch[k:k + 1], ours(sd1_models, [unit], [seed])[1])
