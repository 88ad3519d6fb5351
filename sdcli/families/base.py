"""What a model family is, as data: one frozen `Family` per family, declared in its own file (sd1.py, sd2.py, ...)
and walked by the registry (families/__init__.py). Shapes say the network sizes (families/shapes.py); a family says
what shapes cannot: how to recognise it, its text encoders, its latent space, its prediction type and how that is
settled, its native size, its training schedule, its diffusers components.

Shape taken from ComfyUI comfy/supported_models.py (one small class of data per model, detection walks the list).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


Shapes = dict[str, tuple[int, ...]]

# A1111's "Approx cheap" latent -> RGB factors for the SD 1.x/2.x VAE latent space, on the scaled latent
# (4 latent channels x 3 colours). Fitted by a community member:
# https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2
SD_LATENT_RGB = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family."""

    prefix: str  # where its weights sit in an LDM single file (OpenCLIP names under ``.model.``)
    pad_id: int  # the id that fills a 77-token window after the end token
    hidden_act: str  # "quick_gelu" (OpenAI CLIP) | "gelu" (OpenCLIP); unused for T5
    # "last": the last layer, final norm (clip skip counts back from it); "penultimate": the file's last layer is
    # dropped at load (SD2's conditioning); "penultimate-raw": every layer kept, the penultimate hidden state taken
    # WITHOUT the final norm (SDXL: sgm's layer="penultimate"/"hidden", and the pooled output needs the last layer)
    hidden_layer: str = "last"
    pooled: bool = False  # whether the UNet needs its pooled output (SDXL's vector y)
    # Which vectors of a textual-inversion file it takes: "clip_l" (OpenAI ViT-L), "clip_g" (OpenCLIP bigG) are
    # the keys of SDXL embedding files; a single-tensor file fits any one-encoder model of its width.
    embedding_key: str = "clip_l"
    # "clip" (CLIP / OpenCLIP text tower) | "t5" (T5 v1.1 encoder: its tokens are appended on the sequence axis,
    # after the CLIP contexts, which are then zero-padded to its width: SD3's rule)
    kind: str = "clip"
    context: bool = True  # its hidden states go into the context (FLUX's CLIP-L only gives the pooled vector)
    # the pooled vector goes through the file's text_projection (SDXL's and SD3's bigG); False: the final norm at
    # the end token as it is (SD3's and FLUX's CLIP-L: their files still carry a projection, left unused)
    projected: bool = True
    length: int = 77  # T5: the padded sequence length (the model cards': SD3 256, FLUX dev 512, schnell 256)
    # Absent from a file, it is refused unless optional: SD3 runs without T5 on zeros (diffusers' rule)
    optional: bool = False
    flag: str = ""  # the option that names a separate file for it ("--clip-l", "--t5"), for messages

    @property
    def prefixes(self) -> tuple[str, ...]:
        """Where to look for its weights: the single file's prefix, and the same place in transformers names
        (a diffusers folder's text encoders are mapped to ``...transformer.``: formats/diffusers.py)."""
        return tuple(dict.fromkeys((self.prefix, self.prefix.replace(".model.", ".transformer."))))


@dataclass(frozen=True)
class SizeCond:
    """SDXL's size and crop conditioning (sgm's original_size_as_tuple, crop_coords_top_left, target_size_as_tuple,
    aesthetic_score): what the run asked for, in (height, width) and (top, left) order."""

    original: tuple[int, int]
    crop: tuple[int, int] = (0, 0)
    target: tuple[int, int] | None = None  # None: the original size
    aesthetic: float = 6.0  # the refiner's, for the prompt ...
    negative_aesthetic: float = 2.5  # ... and for the negative prompt


@dataclass(frozen=True)
class LatentSpec:
    """The VAE latent space."""

    channels: int = 4
    # scaled latent = (VAE latent - shift_factor) * scale_factor: the space the denoiser works in
    scale_factor: float = 0.18215
    downscale: int = 8  # pixels per latent cell
    rgb_factors: tuple[tuple[float, ...], ...] = SD_LATENT_RGB  # (channels, 3): the cheap preview's map
    taesd: str = "taesd"  # which tiny autoencoder decodes this space: madebyollin's taesd_*, taesdxl_*, ... files
    shift_factor: float = 0.0  # the 16-channel VAEs of SD3 and FLUX center their latents (0 before them)
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added after the cheap preview's map


@dataclass(frozen=True)
class FlowSpec:
    """A rectified-flow model's sigma schedule (sampling/flow.py): how diffusers' pipeline of the family spaces
    the steps, and the shift it applies."""

    spacing: str  # "table": SD3's scheduler spacing (its shifted table's minimum); "linspace": FLUX's 1 .. 1/N
    shift: float = 1.0  # the constant time shift sigma' = s t / (1 + (s - 1) t)
    dynamic: bool = False  # FLUX dev: the shift grows with the image's token count (mu, flow.flux_mu)
    timestep_scale: float = 1000.0  # the network is given t = sigma * this (SD3: 1000; FLUX scales inside: 1)


@dataclass(frozen=True)
class TrainingSchedule:
    """The DDPM noise schedule the UNet was trained on: "scaled linear" betas (sqrt-spaced), as LDM's configs
    (sampling.schedule.sigmas_of turns it into sigmas)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps: int = 1000



@dataclass(frozen=True)
class Family:
    name: str  # recorded in metadata and latent files ("sd1", "sd2", ...)
    title: str  # for people: "SD 1.x", "SDXL"
    a1111_name: str  # A1111's SdVersion name (extensions-builtin/Lora/network.py): SD1, SD2, SDXL
    matches: Callable[[Shapes], bool]  # recognises the family from header shapes (LDM names), in registry order
    text: tuple[TextEncoderSpec, ...]
    unet_heads: dict  # attention heads: dict(num_heads=8, head_dim=None) or dict(num_heads=None, head_dim=64)
    latent: LatentSpec = LatentSpec()
    schedule: TrainingSchedule = TrainingSchedule()
    prediction: str = "eps"  # of the base model when the file does not say
    # When set, `prediction` is only a guess (variants share every shape) settled by this probe forward:
    # unet -> "eps" | "v".
    settle_prediction: Callable | None = None
    inpaint_prediction: str = "eps"  # the inpainting variants' (in_channels = 2 * latent channels + 1)
    native_sizes: dict = field(default_factory=lambda: {"eps": 512, "v": 512})  # by prediction
    diffusers_components: tuple[str, ...] = ("unet", "vae", "text_encoder")
    diffusers_sharded: tuple[str, ...] = ()  # components fetched whole or in shards (hub_patterns)
    supported: bool = True  # False: recognised, then refused with exit 8 naming the family
    # SDXL: the numbers the vector y embeds besides the pooled text, (SizeCond, negative) -> values; None: no y
    size_values: Callable[[SizeCond, bool], tuple[float, ...]] | None = None
    # An empty negative prompt conditions on zeros (context and pooled), not on the encoded "" (A1111's
    # force_zero_negative_prompt, diffusers' force_zeros_for_empty_prompt)
    zero_empty_negative: bool = False
    # The VAE overflows in fp16 (SDXL's): on a GPU in fp16 it runs in this dtype instead, unless --vae is given
    vae_fp16_fallback: str | None = None
    # The denoising network: "unet" (models/unet.py), "mmdit" (models/mmdit.py), "flux_dit" (models/flux.py); its
    # sizes are read from the header shapes (families/shapes.py)
    denoiser: str = "unet"
    flow: FlowSpec | None = None  # set for rectified-flow families (prediction "flow")
    # "cfg": classifier-free guidance with the negative prompt; "distilled": the guidance strength is an input of
    # the network (FLUX dev: one call per step; a --cfg above 1 adds true CFG on top); "none": neither
    guidance: str = "cfg"
    default_cfg: float = 7.0  # --cfg when the run does not set it
    default_guidance: float | None = None  # "distilled": the strength when --guidance is not given
    skip_layer_guidance: bool = False  # the network can skip blocks on request (SD3.5's SLG: sampling/slg.py)
    size_multiple: int = 8  # image sides must be multiples of this (2x2 patches of 8-pixel cells: 16)

    @property
    def inpaint_in_channels(self) -> int:
        """An inpainting UNet sees the noisy latent, the mask and the masked image's latent."""
        return 2 * self.latent.channels + 1

    def native_size(self, prediction: str) -> int:
        return self.native_sizes[prediction]

    def hub_patterns(self) -> list[str]:
        """What a diffusers repo of this family must give us (safetensors only, full precision)."""
        files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
        out = [f"{c}/{files.get(c, 'model.safetensors')}" for c in self.diffusers_components]
        for c in self.diffusers_sharded:  # big parts come in shards named by an index (SD3's T5, FLUX's DiT)
            stem = "diffusion_pytorch_model" if c == "transformer" else "model"
            out += [f"{c}/{stem}.safetensors", f"{c}/{stem}.safetensors.index.json", f"{c}/{stem}-*-of-*.safetensors"]
        return out

    def default_prediction(self, inpaint: bool) -> tuple[str, str]:
        """(prediction, how we know) when neither the user nor the file says."""
        if inpaint:
            return self.inpaint_prediction, "family"
        return self.prediction, "guess" if self.settle_prediction is not None else "family"
