"""The pipeline stages as short functions: text -> conditioning (text_conditioning.py, re-exported here), noise ->
latents (txt2img / img2img), latents <-> images. The CLI's commands are thin layers over these; nothing here prints.

Nothing here branches on the model family: the latent space, the training schedule, the text encoder's padding and
the denoiser kind come from the family's declaration (`models.family`, families/).

Reproducibility contract: image k of a run draws only from its own generators (sampling/rng.py ImageNoise, A1111's
ImageRNG): by default a CPU `torch.Generator` seeded with its seed (seed+k), `gpu` / `nv` a Philox generator
emulating torch's CUDA one (A1111's GPU and NV noise), computed on the CPU. Its initial noise `randn((4, H/8, W/8))`
is drawn first (blended with its variation seed's, or drawn at the "resize seed from" size and pasted, as A1111),
every later stochastic draw (ancestral / SDE noise, churn) comes from the same generator in step order (or from one
seeded seed + ENSD), always in fp32 on the CPU, then moved to the run's device and dtype. So image k of a batch is
bit-identical to a single run with its seeds, and the same seed gives the same noise on every device. The hires
fix's second pass keeps drawing from the same generators with `cpu` noise, continuing their state after the first
pass (sdcli's rule, kept so that every render keeps its bytes); with `gpu` / `nv` it starts new ones at the second
pass's size, as A1111 does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from sdcli.runtime import cuda_graphs
from sdcli.quant.layers import holds_blocks, reused_buffers
from sdcli.runtime.device import sampling_heap

from sdcli.sampling import samplers

from sdcli.sampling import schedule
from sdcli.sampling.names import resolve_sampler_schedule  # torch-free (app/render.py checks with it)
from sdcli.sampling.conditioning import as_cond, conditioning, for_batch
from sdcli.sampling.denoise import DENOISERS, CFGDenoiser, guided
from sdcli.sampling.inpaint import MaskedDenoiser, blend
from sdcli.runtime.errors import NumericalError, OutOfMemoryError, UsageError
from sdcli.runtime.tiling import VaeTiling
from sdcli.families import DEFAULT, Family
from sdcli.models.packed_conv import packed_convs
from sdcli.models.tome import token_merging
from sdcli.text.editing import ScheduledCond, prompt_schedule
# The text stage and seamless tiling live in modules of their own; callers and tests keep using them as pipeline.X
# (and encode_scheduled below calls encode_text through this namespace).
from sdcli.seamless import seamless  # noqa: F401
from sdcli.text_conditioning import (  # noqa: F401
    embedding_widths, encode_text, with_embeddings, with_guidance, with_size_vector,
)


@dataclass(frozen=True)
class SamplingPlan:
    """What the sampler loop needs besides the model and the conditioning."""

    sampler: str  # canonical name from samplers.SAMPLERS
    sigmas: torch.Tensor  # descending, ends with 0
    cfg: float = 7.0
    guidance_rescale: float = 0.0
    token_merging: float = 0.0  # ToMe ratio of this pass (models/tome.py); 0: off
    options: tuple = ()  # the sampler's keyword parameters as (name, value) pairs: a1111_params.sampler_options
    slg: object = None  # sampling/slg.SkipLayerGuidance of an SD3.5 run that asks for it; None: off


@dataclass
class DecodeResult:
    images: torch.Tensor  # (B, 3, H, W) fp32 in [-1, 1]
    fallbacks: list[str] = field(default_factory=list)  # e.g. "vae-fp32-retry", "vae-tiled"


def make_plan(sampler: str, schedule_name: str, steps: int, custom_sigmas: str | None = None,
              cfg: float | None = None, guidance_rescale: float = 0.0, family: Family = DEFAULT,
              sampler_params: dict | None = None, size: tuple[int, int] | None = None,
              shift: float | None = None) -> SamplingPlan:
    """Resolve a sampler label (which may carry a schedule, 'DPM++ 2M Karras') into a sampling plan over the
    family's training schedule. `sampler_params`: eta / s_churn / s_tmin / s_tmax / s_noise as config values; the
    sampler gets those it takes (a1111_params.sampler_options). `cfg` None: the family's default. A flow family's
    sigmas are its own (`flow_plan`: `size` (H, W) in pixels and `shift` (--flow-shift) matter there only)."""
    from sdcli.sampling.a1111_params import sampler_options

    cfg = family.default_cfg if cfg is None else cfg
    if family.flow is not None:
        plan = flow_plan(sampler, schedule_name, steps, custom_sigmas, cfg, family, size, shift)
        if sampler_options(plan.sampler, **(sampler_params or {})):
            from sdcli.runtime.errors import UsageError

            raise UsageError(f"eta / sigma churn / noise settings have no rectified-flow form for {family.title} "
                             "yet: leave them at their defaults")
        return replace(plan, guidance_rescale=guidance_rescale)
    name, schedule_used = resolve_sampler_schedule(sampler, schedule_name)
    if custom_sigmas:
        sigmas = schedule.parse_sigmas(custom_sigmas)
    else:
        sigmas = schedule.get_sigmas(schedule_used, steps, schedule.sigmas_of(family.schedule))
    options = tuple(sampler_options(name, **(sampler_params or {})).items())
    return SamplingPlan(name, sigmas, cfg, guidance_rescale, options=options)


FLOW_SCHEDULES = ("auto", "simple")  # a flow family's sigmas are diffusers' pipeline's, named as Forge does


def flow_plan(sampler: str, schedule_name: str, steps: int, custom_sigmas: str | None, cfg: float, family: Family,
              size: tuple[int, int] | None, shift: float | None) -> SamplingPlan:  # fmt: skip
    """The plan of a rectified-flow family: sampling/flow.py's sigmas (SD3: diffusers' scheduler spacing; FLUX:
    1 .. 1/N, shifted by the image's token count on dev), `shift` replacing the family's (and dev's dynamic rule).
    Samplers that add noise run their flow variants; one without a variant is refused (exit 2)."""
    from sdcli.runtime.errors import UsageError
    from sdcli.sampling import flow

    name, label_schedule = samplers.resolve_sampler(sampler)
    if name in flow.NO_FLOW_VARIANT:
        usable = ", ".join(n for n in samplers.SAMPLERS if n not in flow.NO_FLOW_VARIANT)
        raise UsageError(f"sampler {name} has no rectified-flow form for {family.title}; use one of: {usable}")
    chosen = label_schedule or schedule_name
    if chosen not in FLOW_SCHEDULES and not custom_sigmas:
        raise UsageError(f"schedule {chosen!r}: {family.title} samples on its own flow sigmas "
                         "(--schedule auto or simple, or --sigmas)")
    if custom_sigmas:
        return SamplingPlan(name, schedule.parse_sigmas(custom_sigmas), cfg)
    spec = family.flow
    if spec.spacing == "table":
        return SamplingPlan(name, flow.sd3_sigmas(steps, spec.shift if shift is None else shift), cfg)
    height, width = size or (family.native_size("flow"),) * 2
    cell = family.size_multiple  # one packed token: a 2x2 patch of 8-pixel latent cells
    tokens = (height // cell) * (width // cell)  # diffusers' image_seq_len
    sigmas = flow.flux_sigmas(steps, tokens, dynamic=spec.dynamic and shift is None,
                              shift=spec.shift if shift is None else shift)  # fmt: skip
    return SamplingPlan(name, sigmas, cfg)


# --- text (the encoders themselves: text_conditioning.py) ---------------------------------------

def encode_scheduled(models, prompt: str, negative: str | None, steps: int, clip_skip: int = 1,
                     hires_steps: int | None = None, encoded: dict | None = None):
    """(cond, uncond) for a prompt and negative that may hold A1111 prompt editing: plain tensors when neither
    does, else ScheduledCond pairs with one entry per change. Each entry's cond and uncond are encoded (and
    padded to one chunk count) together, as encode_text does. `encoded` caches (text, negative) -> encoding,
    so a text is encoded once, also across calls (the first pass and the hires pass of one job). `negative`
    None (cfg <= 1): no uncond is encoded and None comes back in its place."""
    encoded = {} if encoded is None else encoded

    def encode(key: tuple[str, str]):
        if key not in encoded:
            encoded[key] = encode_text(models, *key, clip_skip)
        return encoded[key]

    texts = prompt_schedule(prompt, steps, hires_steps)
    negatives = prompt_schedule(negative, steps, hires_steps) if negative is not None else [(texts[-1][0], None)]
    if len(texts) == 1 and len(negatives) == 1:
        return encode((texts[0][1], negatives[0][1]))
    ends = sorted({end for end, _ in texts} | {end for end, _ in negatives})
    entries = [(end, encode((_text_at(texts, end), _text_at(negatives, end)))) for end in ends]
    uncond = ScheduledCond(tuple((end, u) for end, (_, u) in entries)) if negative is not None else None
    return ScheduledCond(tuple((end, c) for end, (c, _) in entries)), uncond


def _text_at(schedule: list[tuple[int, str]], step: int) -> str:
    return next(text for end, text in schedule if step <= end)


# --- latents -------------------------------------------------------------------------------------

def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@dataclass(frozen=True)
class NoiseSettings:
    """Where a run's noise comes from besides the seeds (A1111's, sampling/rng.py ImageNoise): the source, each
    image's variation seed and the strength, "resize seed from" (width, height) in pixels, ENSD."""

    source: str = "cpu"
    subseeds: tuple[int, ...] | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] = (0, 0)
    ensd: int = 0

    @property
    def fresh_hires_noise(self) -> bool:
        """Whether the hires fix's second pass starts new generators (A1111) rather than continuing the first
        pass's (sdcli's rule for `cpu` noise: see the module docstring)."""
        return self.source != "cpu"


def image_noise(models, seeds: list[int], shape: tuple[int, ...], settings: NoiseSettings | None = None):
    """noise() of a batch with these seeds at one image's latent shape (C, h, w): sampling/rng.py ImageNoise,
    fp32 on the run's device. Its first call is the initial noise, later calls the sampler's draws."""
    from sdcli.sampling.rng import ImageNoise

    s = settings or NoiseSettings()
    return ImageNoise(shape, seeds, s.source, subseeds=s.subseeds, subseed_strength=s.subseed_strength,
                      seed_resize_from=s.seed_resize_from, ensd=s.ensd, downscale=models.family.latent.downscale,
                      device=models.device, dtype=torch.float32)


def txt2img(models, plan: SamplingPlan, cond: torch.Tensor, uncond: torch.Tensor,
            seeds: list[int] | list[torch.Generator], height: int, width: int, callback: Callable | None = None,
            extra: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one latent per seed from pure noise. Returns the final latents (B, 4, H/8, W/8), fp32, scaled.
    `cond`, `uncond`: context tensors, conditioning.Cond, or prompt-editing schedules of them.
    `seeds`: one seed or one CPU generator per image (a generator is drawn from in place, continuing its state), or
    an `image_noise` made at this shape (not drawn from yet: its first call is the initial noise).
    `extra`: channels the UNet sees after the latent (inpainting: see inpaint_conditioning), for callers that do
    not carry them in a Cond already."""
    latent = models.family.latent
    noise = _noise_source(seeds, (latent.channels, height // latent.downscale, width // latent.downscale), models)
    x = noise() * plan.sigmas[0]
    return _sample(models, plan, x, cond, uncond, noise, callback, extra)


def img2img(models, plan: SamplingPlan, init_latent: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
            seeds: list[int] | list[torch.Generator], strength: float, callback: Callable | None = None,
            extra: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Noise `init_latent` (1 or B scaled latents) to the strength's sigma and run the rest of the schedule.
    `seeds`: as for txt2img (generators continue their state: the hires fix's second pass; an `image_noise` already
    drawn from goes on at this shape).
    `keep` (1 or B, 1, h, w; 1 = keep): inpainting with any model (sampling/inpaint.py): every x0, and the result,
    is `init_latent` where it keeps (A1111 blends with the latent it started from, its latent fills included).
    A flow family noises as x = sigma noise + (1 - sigma) x0 and runs diffusers' get_timesteps' steps."""
    flow = models.family.flow is not None
    sigmas = _flow_tail(plan.sigmas, strength) if flow else schedule.img2img_sigmas(plan.sigmas, strength)
    plan = replace(plan, sigmas=sigmas)
    noise = _noise_source(seeds, tuple(init_latent.shape[1:]), models)
    first = noise()
    x0 = init_latent.to(first).expand_as(first)
    if len(sigmas) < 2:  # strength 0 (or too few steps): nothing to run
        return x0.clone()
    x = _flow_noised(x0, first, sigmas[0]) if flow else x0 + first * sigmas[0]
    pin = None if keep is None else (x0, keep.to(first))
    return _sample(models, plan, x, cond, uncond, noise, callback, extra, pin)


def _flow_tail(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The steps a flow img2img runs: diffusers' SD3/FLUX get_timesteps (sampling/flow.img2img_start)."""
    from sdcli.sampling.flow import img2img_start

    return sigmas[img2img_start(len(sigmas) - 1, strength):]


def _flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow forward process x = sigma noise + (1 - sigma) x0 (diffusers' scale_noise)."""
    from sdcli.sampling.flow import noise_latent

    return noise_latent(x0, noise, sigma)


def split_at_switch(plan: SamplingPlan, switch: float, family: Family) -> tuple[SamplingPlan, SamplingPlan | None]:
    """The base model's and the refiner's parts of one schedule (SDXL's ensemble of experts): the base keeps the
    steps whose timestep t >= round(1000 * (1 - switch)), as diffusers' denoising_end and A1111's "Refiner switch
    at" (completed_ratio = (999 - t) / 1000); the refiner runs the rest from the sigma the base stopped at (the
    latent is handed over still noisy, not denoised). The base always takes the first step (A1111 checks the switch
    after a step); the refiner's part is None when no step is left to it."""
    steps = len(plan.sigmas) - 1
    timesteps = schedule.sigma_to_t(plan.sigmas[:-1], schedule.sigmas_of(family.schedule))  # unrounded, as k-diffusion's
    cutoff = int(round(family.schedule.steps * (1 - switch)))
    keep = max(1, int((timesteps >= cutoff).sum()))
    if keep >= steps:
        return plan, None
    return replace(plan, sigmas=plan.sigmas[: keep + 1]), replace(plan, sigmas=plan.sigmas[keep:])


def continue_sampling(models, plan: SamplingPlan, latents: torch.Tensor, cond, uncond,
                      gens, callback: Callable | None = None) -> torch.Tensor:
    """Run `plan` on scaled latents already at its first sigma (the refiner taking over from the base), drawing any
    noise from the same per-image generators (or `image_noise`), which continue their state."""
    noise = _noise_source(gens, tuple(latents.shape[1:]), models)
    return _sample(models, plan, latents.to(models.device), cond, uncond, noise, callback)


def inpaint_conditioning(models, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The 5 channels an inpainting UNet (in_channels 9) sees after the latent: (1, 5, H/8, W/8) fp32 =
    cat([mask at latent size, VAE latent of the image with the repainted area zeroed]), neither scaled by c_in.
    As diffusers StableDiffusionInpaintPipeline (prepare_mask_latents; masked_image = image * (mask < 0.5)):
    https://github.com/huggingface/diffusers/blob/main/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py
    image: (1, 3, H, W) in [-1, 1]; mask: (1, 1, H, W) of 0/1, 1 = repaint."""
    _, _, h, w = image.shape
    down = models.family.latent.downscale
    masked = image * (mask < 0.5)  # (1, 3, H, W): the kept pixels, 0 (mid grey) where it repaints
    masked_latent = encode_image(models, masked)  # (1, 4, H/8, W/8), scaled
    small = torch.nn.functional.interpolate(mask.float(), size=(h // down, w // down))  # nearest, as diffusers
    return torch.cat([small.to(masked_latent), masked_latent], dim=1)


def hires_size(height: int, width: int, scale: float, downscale: int = DEFAULT.latent.downscale) -> tuple[int, int]:
    """(height, width) of the hires fix's second pass: the size scaled and rounded to a multiple of `downscale`:
    the VAE's 8 (A1111 floors the pixel size, then divides by 8), or the family's size multiple (16 for the
    transformers' 2x2 patches)."""
    return round(height / downscale * scale) * downscale, round(width / downscale * scale) * downscale


def hires_fix(models, plan: SamplingPlan, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
              gens, strength: float, size: tuple[int, int], callback: Callable | None = None,
              upscaler=None) -> torch.Tensor:
    """A1111's "Hires. fix" second pass: the pass-1 latents (B, 4, h, w) brought to `size` (H, W) in pixels by
    `upscaler` (hires_latents), then img2img at `strength` on them, drawing noise from `gens`: the pass-1
    generators (or its `image_noise`), continuing, or a new `image_noise` at the second pass's size.
    A1111: processing.py StableDiffusionProcessingTxt2Img.sample_hr_pass:
    https://github.com/AUTOMATIC1111/stable-diffusion-webui"""
    big = hires_latents(models, latents, size, upscaler)  # (B, 4, H/8, W/8)
    return img2img(models, plan, big, cond, uncond, gens, strength, callback)


def hires_latents(models, latents: torch.Tensor, size: tuple[int, int], upscaler=None) -> torch.Tensor:
    """The pass-1 latents at the second pass's size. `upscaler` (upscale.resize.HiresUpscaler): None or a latent
    mode interpolates the latents (None: "Latent", bilinear without antialias); anything else goes through
    pixels as A1111 does (hires_through_pixels)."""
    if upscaler is not None and upscaler.in_pixels:
        return hires_through_pixels(models, latents, size, upscaler)
    mode, antialias = ("bilinear", False) if upscaler is None else (upscaler.choice.mode, upscaler.choice.antialias)
    down = models.family.latent.downscale
    target = (size[0] // down, size[1] // down)

    def upscale(z):  # (1, 4, h, w) -> (1, 4, H/8, W/8); one image at a time, as every batched CPU kernel here
        return torch.nn.functional.interpolate(z, size=target, mode=mode, antialias=antialias)

    return _per_image(upscale, latents)


def hires_through_pixels(models, latents: torch.Tensor, size: tuple[int, int], upscaler) -> torch.Tensor:
    """A1111's sample_hr_pass with an upscaler that is not a latent mode: decode, clamp to [0, 1], to 8 bits
    by truncation (numpy astype(uint8), as A1111), resize to `size` with the upscaler (images.resize_image),
    back to [-1, 1] and VAE-encode (the posterior mean, as every encode here; A1111 samples the posterior)."""
    import numpy as np
    from PIL import Image

    from sdcli.formats.images import pil_to_tensor

    decoded = decode_latents(models, latents).images  # (B, 3, h, w) in [-1, 1]
    out = []
    for x in decoded:
        low = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0)  # (3, h, w)
        pixels = (255.0 * np.moveaxis(low.cpu().numpy(), 0, 2)).astype(np.uint8)  # (h, w, 3), truncated
        big = upscaler.resize(Image.fromarray(pixels), (size[1], size[0]))
        out.append(encode_image(models, pil_to_tensor(big)))  # (1, 4, H/8, W/8)
    return torch.cat(out)


def _noise_source(seeds, shape: tuple[int, ...], models):
    from sdcli.sampling.rng import ImageNoise

    if isinstance(seeds, ImageNoise):
        return seeds if seeds.shape == tuple(shape) else seeds.continued(shape)
    device = models.device
    gens = [s if isinstance(s, torch.Generator) else generators([s])[0] for s in seeds]
    return samplers.make_noise_source(gens, shape, device, torch.float32)


def _denoiser(models, plan, unet):
    """x0 = D(x, sigma, cond) over the network: a flow family's FlowDenoiser, else by prediction type. An
    LCM-distilled checkpoint's x0 carries the consistency boundary condition; the LCM sampler asks for that
    denoiser too, as it always has (LCM-LoRA merged models do not say what they are)."""
    flow = models.family.flow
    if flow is not None:
        from sdcli.sampling.flow import FlowDenoiser

        def velocity(x, t, cond):  # (B, C, h, w) at t = sigma * timestep_scale
            cond = as_cond(cond)
            return unet(x, t, cond.context, **cond.unet_kwargs())

        return FlowDenoiser(velocity, flow.timestep_scale)
    kind = DENOISERS["lcm" if plan.sampler == "lcm" else models.info.denoiser]
    return kind(unet, schedule.alphas_cumprod_of(models.family.schedule), models.info.prediction)


def _run_sampler(models, plan, model, x, sigmas, noise, callback):
    """The plan's sampler; a flow family runs the flow variant of a sampler that adds noise (sampling/flow.py)."""
    if models.family.flow is not None:
        from sdcli.sampling.flow import FLOW_VARIANTS

        name = samplers.resolve_sampler(plan.sampler)[0]
        if name in FLOW_VARIANTS:
            return FLOW_VARIANTS[name](model, x, sigmas, noise, callback)
    return samplers.sample(plan.sampler, model, x, sigmas, noise, callback=callback, **dict(plan.options))


def check_token_merging(models, *ratios: float) -> None:
    """Token merging (models/tome.py) merges tokens in a UNet's transformer blocks: on SD3/FLUX it would do
    nothing while the image's infotext said it was applied."""
    if any(ratios) and models.family.denoiser != DEFAULT.denoiser:
        raise UsageError(f"--tome-ratio: token merging applies to UNet models (SD 1.x/2.x/SDXL); {models.name} "
                         f"is a {models.family.denoiser} model")


def _sample(models, plan, x, cond, uncond, noise, callback, extra=None, pin=None):
    """`pin`: (original, keep) for inpainting with any model (sampling/inpaint.MaskedDenoiser)."""
    from sdcli.families.shapes import network_call

    check_token_merging(models, plan.token_merging)  # a sweep or prompts file can set it per job
    batch = x.shape[0]
    net = models.stage("unet")
    kind = models.family.denoiser
    unet = _UNetAdapter(net, images=batch, call=network_call(kind, net), graphs=kind == DEFAULT.denoiser)
    denoiser = _denoiser(models, plan, unet)
    cond_b = for_batch(conditioning(cond, extra), batch, x.device, plan.sigmas)
    uncond_b = for_batch(conditioning(uncond, extra), batch, x.device, plan.sigmas) if guided(plan.cfg) else None
    if plan.slg is not None and uncond_b is not None:
        model = _skip_layer_cfg(models, plan, net, batch, denoiser, cond_b, uncond_b)
    else:
        model = CFGDenoiser(denoiser, cond_b, uncond_b, plan.cfg, plan.guidance_rescale)
    if pin is not None:
        model = MaskedDenoiser(model, *pin)
    sigmas = plan.sigmas.to(x.device)

    def on_step(i, total, x_i, denoised):
        if not torch.isfinite(denoised).all():
            raise NumericalError(f"the UNet produced NaN/Inf at step {i + 1} of {total} "
                                 "(try --dtype fp32, a lower --cfg, or check the checkpoint)")
        if callback is not None:
            callback(i, total, x_i, denoised)

    # the part is built by now (under the pinned heap thresholds); its steps then reuse one held heap, unless the
    # run chose memory (device.sampling_heap): GGUF blocks, which dequantize into one reused buffer instead, and
    # --offload. A DiT's heap is then trimmed after each block (a FLUX.1 block at 1024 px left up to 0.24 GiB), and
    # under --offload a UNet's too (SDXL at 1024 px: the held heap grew 0.5 GB over a call whose largest live set
    # is ~0.3 GB); a GGUF UNet's blocks alone leave little (SD1.5 Q8_0 at 512 px: 0.06 GB less, at +5% per step)
    offload = models.parts.policy == "offload"
    quantized = any(holds_blocks(m) for m in net.modules())
    trim = offload or (quantized and kind != DEFAULT.denoiser)
    heap = sampling_heap(x.device, hold=not (offload or quantized), blocks=_blocks(net) if trim else ())
    # CPU: the large 3x3 convolutions (fp32: of small maps) run on weights packed once, unpacked on the way out,
    # after the heap is pinned again (the plain weights then get mappings of their own, as at the load)
    with torch.inference_mode(), token_merging(net, plan.token_merging), packed_convs(x.device), heap, \
            reused_buffers():
        out = _run_sampler(models, plan, model, x, sigmas, noise, on_step)
        return out if pin is None else blend(out, *pin)  # A1111 blends the sampler's result once more


def _blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The members of the network's outermost ModuleLists: FLUX's double and single blocks, SD3's joint blocks (a
    UNet's input, middle and output blocks), where sampling_heap trims a GGUF DiT's heap."""
    blocks, inside = [], set()
    for m in net.modules():  # pre-order: an outer list comes before the lists inside its members
        if isinstance(m, torch.nn.ModuleList) and id(m) not in inside:
            blocks.extend(m)
            inside.update(id(sub) for block in m for sub in block.modules())
    return blocks


def _skip_layer_cfg(models, plan, net, batch, denoiser, cond_b, uncond_b):
    """CFG with SD3.5's skip-layer pass (sampling/slg.py): the same network called with its blocks skipped."""
    from functools import partial

    from sdcli.families.shapes import network_call
    from sdcli.sampling.slg import SkipLayerCFG

    call = partial(network_call(models.family.denoiser, net), skip_layers=plan.slg.layers)
    skipping = _denoiser(models, plan, _UNetAdapter(net, images=batch, call=call, graphs=False))
    return SkipLayerCFG(denoiser, cond_b, uncond_b, plan.cfg, plan.guidance_rescale, skipping, plan.slg,
                        plan.sigmas)


class _UNetAdapter:
    """The sampler keeps its state in fp32; the UNet runs in its own dtype and hands fp32 back. Optional
    conditioning tensors (the vector y) are cast and split per image like the context. A ControlNet step
    (control.ControlStep) computes its residuals on each image's own rows, right before the UNet takes them."""

    def __init__(self, unet, images: int, call=None, graphs: bool = True):
        param = next(unet.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.eager = call or unet  # `call`: the network as (x, t, context, **cond) when its own call differs
        graphed = graphs and cuda_graphs.enabled(self.device)  # CUDA graphs are captured for the UNet only
        self.unet = cuda_graphs.graphed(unet) if graphed else self.eager
        self.images = images

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **optional) -> torch.Tensor:
        # x: (R, C, h, w), t: (R,), context: (R, T, D) -> (R, 4, h, w) fp32; R = images x (1 or 2 with CFG)
        control = optional.pop("control", None)
        names = list(optional)

        def unet(x_r, t_r, context_r, *rest):
            kwargs = dict(zip(names, rest))
            if control is None:
                return self.unet(x_r, t_r, context_r, **kwargs)
            residuals = control.residuals(x_r, t_r, context_r, kwargs.get("y"))
            return self.eager(x_r, t_r, context_r, **kwargs, control=residuals)  # graphs take no residuals

        rest = [v.to(self.dtype) for v in optional.values()]
        out = _per_image(unet, x.to(self.dtype), t.to(torch.float32), context.to(self.dtype), *rest,
                         images=self.images)
        return out.float()


def _per_image(fn: Callable[..., torch.Tensor], *batched: torch.Tensor, images: int | None = None) -> torch.Tensor:
    """fn over the batch, one image at a time on the CPU. CPU GEMM/conv kernels (MKL, oneDNN) split their work by
    the batch size, so a row's result moves in the last bits with the rest of the batch (a plain nn.Linear
    already does). One call per image cannot, which is what makes image k of a batch bit-identical to a single
    run with seed+k. The rows of one image stay together: with CFG, [uncond; cond] lays out image k's rows at
    k and images+k, and they run as one batch-2 call, exactly as in a single-image run. Other devices keep the
    batched call, for throughput."""
    rows = batched[0].shape[0]
    images = images or rows
    if batched[0].device.type != "cpu" or images == 1:
        return fn(*batched)
    groups = [torch.arange(k, rows, images) for k in range(images)]  # rows of image k: k, k+images, ...
    outs = [fn(*(b[g] for b in batched)) for g in groups]
    out = outs[0].new_empty((rows, *outs[0].shape[1:]))
    for g, o in zip(groups, outs):
        out[g] = o
    return out


# --- VAE -----------------------------------------------------------------------------------------

def scale_factor(models) -> float:
    """The family's VAE latent scale (never visible in a header: SDXL's VAE has SD1's shapes)."""
    return models.family.latent.scale_factor


def shift_factor(models) -> float:
    """The family's VAE latent shift (0 but for the 16-channel VAEs: scaled = (z - shift) * scale)."""
    return models.family.latent.shift_factor


def encode_image(models, image: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [-1,1] -> scaled latents (B,4,H/8,W/8), fp32. Uses the posterior mean: deterministic, and the
    posterior's std is tiny for SD's VAE, so sampling it would only spend random draws. A TAESD encoder gives
    scaled latents itself."""
    from sdcli.loading.vae import is_tiny, latent_scale, latent_shift

    vae = models.stage("vae")
    param = next(vae.parameters())
    encode = vae.encode if is_tiny(vae) else (lambda x: vae.encode(x)[0])  # the full VAE: the posterior mean
    with torch.inference_mode():
        latent = _per_image(encode, image.to(param.device, param.dtype))  # (B, C, H/8, W/8)
    return (latent.float() - latent_shift(vae, models.family)) * latent_scale(vae, models.family)


def decode_latents(models, latents: torch.Tensor, tiling: VaeTiling | None = None) -> DecodeResult:
    """Scaled latents -> images in [-1,1] through the models' VAE (full, or TAESD on the scaled latents)."""
    from sdcli.loading.vae import latent_scale, latent_shift

    vae = models.stage("vae")
    return decode_with(vae, latents / latent_scale(vae, models.family) + latent_shift(vae, models.family), tiling)


def vae_tiling(cfg) -> VaeTiling:
    """The run config's VAE tiling (keys vae_tiling, vae_tile_size)."""
    return VaeTiling(cfg.vae_tiling, cfg.vae_tile_size)


def decode_with(vae, z: torch.Tensor, tiling: VaeTiling | None = None) -> DecodeResult:
    """The VAE's own latents -> images in [-1,1], tiled as `tiling` says (default auto: whole, and out of memory
    retried tiled). A non-finite result (fp16 VAE overflow) is retried once in fp32. NumericalError when the image
    still is not finite: never a silent black image."""
    tiling = tiling or VaeTiling()
    fallbacks: list[str] = []
    if tiling.mode == "on":
        images = _vae_decode_tiled(vae, z, tiling)
    else:
        try:
            images = _vae_decode(vae, z)
        except torch.OutOfMemoryError:
            if tiling.mode == "off":
                raise OutOfMemoryError("out of memory in the VAE decoder with --vae-tiling off: use --vae-tiling "
                                       "auto or on, a smaller size, or --dtype bf16/fp16") from None
            fallbacks.append("vae-tiled")
            images = _vae_decode_tiled(vae, z, tiling)
    if not torch.isfinite(images).all() and next(vae.parameters()).dtype != torch.float32:
        fallbacks.append("vae-fp32-retry")
        fp32 = _fp32_copy(vae)
        images = _vae_decode_tiled(fp32, z, tiling) if tiling.mode == "on" else _vae_decode(fp32, z)
    if not torch.isfinite(images).all():
        raise NumericalError("the VAE decoder produced NaN/Inf even in fp32; nothing was saved")
    return DecodeResult(images.clamp(-1, 1), fallbacks)


def _vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    param = next(vae.parameters())
    with torch.inference_mode():
        return _per_image(vae.decode, z.to(param.device, param.dtype)).float()  # (B, 3, H, W)


def _fp32_copy(vae):
    import copy

    return copy.deepcopy(vae).float()


def _vae_decode_tiled(vae, z: torch.Tensor, tiling: VaeTiling) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps, so there are no seams."""
    from sdcli.runtime.tiling import decode_tiled

    try:
        return decode_tiled(lambda t: _vae_decode(vae, t), z, tiling.tile, tiling.overlap)
    except torch.OutOfMemoryError:
        raise OutOfMemoryError("out of memory in the VAE decoder even tiled: use a smaller size, "
                               "--dtype bf16/fp16 or --device cpu") from None
