"""The whole pipeline (prompt -> CLIP -> sampler loop over the UNet -> VAE decode, and img2img's VAE encode)
against diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline built from the same tiny random
weights (the diffusers-folder fixture; ours loads the single file with identical weights) and a Hugging Face
CLIPTokenizer built from our shipped BPE vocabulary, so the text path is compared too. fp32, CPU, 64x64.

How the two conventions are lined up (each is a difference of convention, not of method):
- Initial latents. We start from x = noise * sigmas[0] (k-diffusion). diffusers multiplies the `latents` it
  is given by `scheduler.init_noise_sigma` (sqrt(sigma_max^2 + 1) for Euler "linspace", sigma_max for
  "leading", 1 for DPM-Solver/DDIM) and keeps DPM-Solver/DDIM latents in the variance-preserving space
  x / sqrt(sigma^2 + 1). So diffusers gets our same x, expressed in its space and divided by init_noise_sigma.
  The noise itself is the first draw of each image's generator, and diffusers is handed those generators
  after that draw, so every later draw (Euler a's ancestral noise, img2img's noise) comes from the same state.
- Schedules. Euler gets our sigmas (`sigmas=`), for which diffusers computes unrounded timesteps as we do.
  Euler a has no `sigmas=`: "leading" spacing with steps_offset=1 is exactly our ddim_uniform schedule.
  DPM-Solver++ computes its own Karras sigmas (checked equal to ours) but rounds the timestep it gives the
  UNet; we never round, so its UNet is handed the unrounded timestep of the current sigma (diffusers' own
  `_sigma_to_t`, without the rounding). DDIM "leading" + steps_offset=1 + set_alpha_to_one is ddim_uniform.
- img2img. We encode with the VAE posterior mean; diffusers samples the posterior with the generator first.
  DiagonalGaussianDistribution.sample is patched to return the mean without drawing, so diffusers' first draw
  from each generator is, as ours, the noise added at the strength's sigma.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers, tiny_sd2, tiny_sd2_diffusers  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread, sd1_models, sd2_models  # noqa: F401
from sdcli import pipeline as P
from sdcli.sampling import schedule
from sdcli.formats.images import pil_to_tensor, tensor_to_pil
from sdcli.runtime.device import prefers_channels_last
from sdcli.text.clip_tokenizer import get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PRED = {"sd1": "epsilon", "sd2": "v_prediction"}
SIZE = 64
CFG = 6.5
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, 4k", "blurry, low quality"
# fp32 latents: the two sides do the same math in a different order (and diffusers' schedule tables are
# float32 where ours are float64), so they agree to float rounding, relative to the latents' size.
# (The tiny random SD1 UNet drives latents to |x| ~ 60; SD2's v-model keeps them ~ 5.)
RTOL_LATENT = 2e-5
MAX_PIXEL_LEVELS = 1


# --- the oracle ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    family: str
    sampler: str  # ours
    schedule: str  # ours
    steps: int

    @property
    def vp(self) -> bool:
        """diffusers keeps this scheduler's latents in variance-preserving space."""
        return self.sampler in ("dpm++_2m", "ddim")

    def scheduler(self):
        pred = PRED[self.family]
        if self.sampler == "euler":
            return EulerDiscreteScheduler(**SD, prediction_type=pred, timestep_spacing="linspace")
        if self.sampler == "euler_a":
            return EulerAncestralDiscreteScheduler(**SD, prediction_type=pred, timestep_spacing="leading",
                                                   steps_offset=1)
        if self.sampler == "dpm++_2m":
            return DPMSolverMultistepScheduler(**SD, prediction_type=pred, algorithm_type="dpmsolver++",
                                               solver_order=2, use_karras_sigmas=True, final_sigmas_type="zero")
        if self.sampler == "ddim":
            return DDIMScheduler(**SD, prediction_type=pred, timestep_spacing="leading", steps_offset=1,
                                 clip_sample=False, set_alpha_to_one=True)
        raise AssertionError(self.sampler)

    def steps_kwargs(self, plan) -> dict:
        """How diffusers is told the schedule: our sigmas where it takes them, else the step count."""
        return {"sigmas": plan.sigmas.tolist()} if self.sampler == "euler" else {"num_inference_steps": self.steps}


def in_our_layout(*modules: torch.nn.Module) -> None:
    """diffusers' convolutional parts in the memory layout ours run in on this CPU (models/layout.py: channels_last
    in fp32 on x86-64), so that both sides run the same convolution kernels and a comparison sees the pipelines'
    differences, not two kernels' summation orders (a few ulp per convolution, compounding over steps)."""
    if prefers_channels_last(torch.device("cpu"), torch.float32):
        for m in modules:
            m.to(memory_format=torch.channels_last)


@pytest.fixture(scope="session")
def diffusers_parts(tiny_sd1_diffusers, tiny_sd2_diffusers, clip_tokenizer_dir):  # noqa: F811
    """Components per family, loaded once; a pipeline is cheap to assemble around them."""
    parts = {}
    for family, folder in (("sd1", tiny_sd1_diffusers), ("sd2", tiny_sd2_diffusers)):
        # SD1 pads with <|endoftext|>; SD2's OpenCLIP tokenizer pads with id 0 ("!"), as diffusers' SD2 repos do
        pad = "<|endoftext|>" if family == "sd1" else "!"
        tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir, pad_token=pad, model_max_length=77)
        parts[family] = dict(
            unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
            vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
            tokenizer=tokenizer)
        in_our_layout(parts[family]["unet"], parts[family]["vae"])
    return parts


def make_pipe(parts, case: Case, cls=StableDiffusionPipeline):
    pipe = cls(**parts[case.family], scheduler=case.scheduler(), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unround_timesteps(monkeypatch, pipe) -> None:
    """Hand the UNet the unrounded timestep of the scheduler's current sigma (DPM-Solver rounds it)."""
    sched, forward = pipe.scheduler, pipe.unet.forward
    log_sigmas = np.log((((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy())

    def unet_forward(sample, timestep, *args, **kwargs):
        i = sched.step_index if sched.step_index is not None else (sched.begin_index or 0)
        t = sched._sigma_to_t(sched.sigmas[i].numpy(), log_sigmas)
        return forward(sample, torch.tensor(float(t)), *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", unet_forward)


def first_draws(seeds: list[int]) -> tuple[list[torch.Generator], torch.Tensor]:
    """Each image's generator after its first draw, and those draws (B, 4, H/8, W/8): our pipeline's order."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=g) for g in gens])
    return gens, noise


class FinalLatents:
    """callback_on_step_end that keeps the latents after the last step (what diffusers then decodes)."""

    def __call__(self, pipe, i, t, kwargs):
        self.latents = kwargs["latents"].clone()
        return kwargs


def diffusers_txt2img(parts, case: Case, plan, seeds, monkeypatch):
    pipe = make_pipe(parts, case)
    if case.sampler == "dpm++_2m":
        unround_timesteps(monkeypatch, pipe)
    pipe.scheduler.set_timesteps(**case.steps_kwargs(plan))  # to read init_noise_sigma for this schedule
    gens, noise = first_draws(seeds)
    sigma0 = float(plan.sigmas[0])
    x = noise * sigma0  # our start
    start = x / (sigma0**2 + 1) ** 0.5 if case.vp else x
    final = FinalLatents()
    out = pipe([PROMPT] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), height=SIZE, width=SIZE,
               guidance_scale=CFG, latents=start / pipe.scheduler.init_noise_sigma,
               generator=gens if len(gens) > 1 else gens[0], output_type="pil", callback_on_step_end=final,
               **case.steps_kwargs(plan))
    return final.latents, [np.asarray(im) for im in out.images]


def ours_txt2img(models, case: Case, seeds):
    plan = our_plan(case)
    cond, uncond = P.encode_text(models, PROMPT, NEGATIVE)
    latents = P.txt2img(models, plan, cond, uncond, seeds, SIZE, SIZE)
    return plan, latents, pixels(models, latents)


def pixels(models, latents) -> list[np.ndarray]:
    images = P.decode_latents(models, latents).images
    return [np.asarray(tensor_to_pil(images[k])) for k in range(images.shape[0])]


def assert_latents_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.5, "degenerate oracle output"
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, rtol=0, atol=RTOL_LATENT * scale)


def assert_pixels_close(got: list[np.ndarray], ref: list[np.ndarray]) -> None:
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape == (SIZE, SIZE, 3)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= MAX_PIXEL_LEVELS, f"pixels differ by up to {diff.max()} levels"
        assert len(np.unique(b)) > 16, "degenerate oracle image (flat or saturated)"


def assert_same_schedule(case: Case, plan) -> torch.Tensor:
    """diffusers' sigmas for this scheduler are ours; returns them. Its training table is float32 (ours float64),
    which moves sigma_min, and so the Karras sigmas, by up to ~3e-5 relative: from diffusers' table ours agree
    to 2e-7."""
    sched = case.scheduler()
    sched.set_timesteps(case.steps)
    if case.sampler == "ddim":  # DDIM keeps alphas, not sigmas
        ac = sched.alphas_cumprod[sched.timesteps]
        ref = torch.cat([((1 - ac) / ac) ** 0.5, torch.zeros(1)]).float()
    else:
        ref = sched.sigmas.float()
    from_f32_table = schedule.get_sigmas(case.schedule, case.steps, schedule.model_sigmas(sched.alphas_cumprod))
    torch.testing.assert_close(from_f32_table, ref, rtol=2e-7, atol=0)
    torch.testing.assert_close(plan.sigmas, ref, rtol=3e-5, atol=0)
    return ref


def our_plan(case: Case):
    """Our plan for this case. diffusers builds its own schedule for all but Euler: it must be ours. For Karras
    the two then sample on diffusers' sigmas: the 3e-5 table difference at sigma_min, amplified by the random
    UNet, alone moves the latents by ~5e-5 relative (measured; 2e-6 on the same sigmas)."""
    plan = P.make_plan(case.sampler, case.schedule, case.steps, cfg=CFG)
    if case.sampler != "euler":
        ref = assert_same_schedule(case, plan)
        if case.schedule == "karras":
            plan = dataclasses.replace(plan, sigmas=ref)
    return plan


def models_for(family, sd1_models, sd2_models):  # noqa: F811
    return sd1_models if family == "sd1" else sd2_models


# --- text ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_text_conditioning_matches_diffusers_encode_prompt(family, diffusers_parts, sd1_models, sd2_models):  # noqa: F811
    pipe = make_pipe(diffusers_parts, Case(family, "euler", "normal", 1))
    tok = diffusers_parts[family]["tokenizer"]
    assert tok(PROMPT).input_ids == [49406, *get_tokenizer().encode(PROMPT), 49407]
    cond, uncond = P.encode_text(models_for(family, sd1_models, sd2_models), PROMPT, NEGATIVE)
    with torch.no_grad():
        ref_cond, ref_uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    assert cond.shape == ref_cond.shape == (1, 77, 64)
    torch.testing.assert_close(cond, ref_cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncond, ref_uncond, rtol=0, atol=1e-5)


# --- txt2img -------------------------------------------------------------------------------------

TXT2IMG = [
    Case("sd1", "euler", "normal", 6),
    Case("sd1", "euler_a", "ddim_uniform", 6),
    Case("sd1", "dpm++_2m", "karras", 7),
    Case("sd1", "ddim", "ddim_uniform", 6),
    Case("sd2", "euler", "normal", 6),
    Case("sd2", "dpm++_2m", "karras", 7),
    Case("sd2", "ddim", "ddim_uniform", 5),
]


@pytest.mark.parametrize("case", TXT2IMG, ids=lambda c: f"{c.family}-{c.sampler}-{c.schedule}-{c.steps}")
def test_txt2img_matches_diffusers(case, diffusers_parts, sd1_models, sd2_models, monkeypatch):  # noqa: F811
    models = models_for(case.family, sd1_models, sd2_models)
    plan, latents, images = ours_txt2img(models, case, [1234])
    ref_latents, ref_images = diffusers_txt2img(diffusers_parts, case, plan, [1234], monkeypatch)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(images, ref_images)


def test_batch_with_generator_list_equals_single_runs(diffusers_parts, sd1_models, monkeypatch):  # noqa: F811
    """Euler a draws noise at every step: a batch of 2 with one generator per image (diffusers' generator
    list) equals the two single runs, in both implementations, and ours is bit-exact."""
    case = Case("sd1", "euler_a", "ddim_uniform", 5)
    plan, batch, batch_pixels = ours_txt2img(sd1_models, case, [21, 22])
    singles = [ours_txt2img(sd1_models, case, [s]) for s in (21, 22)]
    assert torch.equal(batch, torch.cat([s[1] for s in singles]))
    assert all(np.array_equal(p, s[2][0]) for p, s in zip(batch_pixels, singles))

    ref_batch, ref_pixels = diffusers_txt2img(diffusers_parts, case, plan, [21, 22], monkeypatch)
    assert_latents_close(batch, ref_batch)
    assert_pixels_close(batch_pixels, ref_pixels)
    ref_single, _ = diffusers_txt2img(diffusers_parts, case, plan, [22], monkeypatch)
    assert_latents_close(ref_batch[1:], ref_single)
    assert (batch[0] - batch[1]).abs().max() > 0.1  # the seeds matter


@pytest.mark.parametrize("sampler,schedule", [("euler", "normal"), ("dpm++_2m", "karras")])
def test_batch_invariance_bit_exact(sampler, schedule, sd2_models):
    """Image k of a batch is bit-identical to a single run with seed+k (CPU, fp32, through the UNet)."""
    case = Case("sd2", sampler, schedule, 4)
    _, batch, _ = ours_txt2img(sd2_models, case, [7, 8, 9])
    for k, seed in enumerate((7, 8, 9)):
        assert torch.equal(batch[k:k + 1], ours_txt2img(sd2_models, case, [seed])[1])


# --- img2img -------------------------------------------------------------------------------------

def init_image() -> Image.Image:
    """A smooth deterministic 64x64 RGB picture (gradients and a disc), so the VAE sees structure."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float32)
    rgb = np.stack([x, y * (1 - disc) + disc, 0.5 + 0.4 * np.sin(6 * x * y)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' img2img samples the VAE posterior with the generator; make it use the mean, without
    drawing, as we do (so the generator's first draw is the img2img noise on both sides)."""
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def diffusers_img2img(parts, case: Case, plan, seeds, strength, monkeypatch):
    pipe = make_pipe(parts, case, StableDiffusionImg2ImgPipeline)
    if case.sampler == "dpm++_2m":
        unround_timesteps(monkeypatch, pipe)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    final = FinalLatents()
    out = pipe([PROMPT] * len(seeds), image=init_image(), strength=strength, negative_prompt=[NEGATIVE] * len(seeds),
               guidance_scale=CFG, generator=gens if len(gens) > 1 else gens[0], output_type="pil",
               callback_on_step_end=final, **case.steps_kwargs(plan))
    return final.latents, [np.asarray(im) for im in out.images]


IMG2IMG = [
    (Case("sd1", "euler", "normal", 8), 0.5, [5]),
    (Case("sd1", "euler", "normal", 8), 0.8, [5, 6]),
    (Case("sd1", "dpm++_2m", "karras", 8), 0.6, [9]),
    (Case("sd2", "ddim", "ddim_uniform", 8), 0.75, [3]),
]


@pytest.mark.parametrize("case,strength,seeds", IMG2IMG,
                         ids=lambda v: f"{v.family}-{v.sampler}" if isinstance(v, Case) else str(v))
def test_img2img_matches_diffusers(case, strength, seeds, diffusers_parts, sd1_models, sd2_models, posterior_mean,
                                   monkeypatch):  # noqa: F811
    models = models_for(case.family, sd1_models, sd2_models)
    plan = our_plan(case)
    cond, uncond = P.encode_text(models, PROMPT, NEGATIVE)
    init = P.encode_image(models, pil_to_tensor(init_image()))
    latents = P.img2img(models, plan, init, cond, uncond, seeds, strength)
    ref_latents, ref_images = diffusers_img2img(diffusers_parts, case, plan, seeds, strength, monkeypatch)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)
