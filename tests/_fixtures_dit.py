"""Tiny random SD3.5-Medium-shaped and FLUX.1 dev/schnell files in their original layouts (scripts/make_checkpoint.py),
and diffusers pipelines built from the SAME tensors: the parity oracles of tests/test_sd3_pipeline.py and
tests/test_flux_pipeline.py.

- ``tiny_sd3``: a Stability single file: model.diffusion_model.* (MMDiT, dual attention in block 0, q/k RMS norm,
  2x2 patches), text_encoders.clip_l/clip_g/t5xxl.transformer.*, first_stage_model.* (16-channel VAE).
- ``tiny_flux`` / ``tiny_schnell``: BFL files (the DiT alone, no prefix), and ``dit_components``: ae.safetensors,
  clip_l.safetensors, clip_g.safetensors, t5xxl.safetensors as ComfyUI users keep them.
The diffusers side: SD3Transformer2DModel from sdcli/formats/sd3_layouts.to_diffusers, FluxTransformer2DModel from
tests/test_flux_model.bfl_to_diffusers, the VAE through diffusers' own LDM converter, CLIP / T5 as transformers
models holding the files' tensors; tokenizers from sdcli's own vocabularies (CLIP BPE as _fixtures_pipeline builds
it, T5's shipped JSON), so the pipelines tokenize the prompts themselves. SD3's CLIP-L gets an identity projection,
as diffusers' single-file loader gives it (its pooled output is used unprojected).
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import pytest
import torch
from make_checkpoint import (TINY_CLIP_G, TINY_CLIP_L, TINY_VAE16, clip_config, dit_config, make_dit_checkpoint,
                             make_dit_components, tiny_t5)  # fmt: skip
from safetensors.torch import load_file

SD3_SHIFT = 3.0


@pytest.fixture(scope="session")
def dit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_dit")


@pytest.fixture(scope="session")
def tiny_sd3(dit_dir: Path) -> Path:
    return make_dit_checkpoint(dit_dir / "sd35.safetensors", "sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux(dit_dir: Path) -> Path:
    return make_dit_checkpoint(dit_dir / "flux1-dev.safetensors", "flux", seed=1)


@pytest.fixture(scope="session")
def tiny_schnell(dit_dir: Path) -> Path:
    return make_dit_checkpoint(dit_dir / "flux1-schnell.safetensors", "flux-schnell", seed=2)


@pytest.fixture(scope="session")
def dit_components(dit_dir: Path) -> dict[str, Path]:
    return make_dit_components(dit_dir / "components", seed=5)


# --- transformers / diffusers modules from the files' tensors ------------------------------------------------------

def _under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    """`state` (transformers names, ``text_model.`` or not) into `module`, every parameter filled."""
    wanted = module.state_dict()
    if not any(k.startswith("text_model.") for k in wanted):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in wanted}
    missing = [k for k in wanted if k not in state and not k.endswith("position_ids")]
    assert not missing, missing[:5]
    module.load_state_dict(state, strict=False)
    return module.eval()


def clip_model(state: dict, cfg, projected: bool, identity: bool = False):
    """CLIPTextModelWithProjection (`projected`; `identity`: its projection replaced by the identity, as diffusers
    loads SD3's CLIP-L) or CLIPTextModel."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_config(cfg)
    if projected:
        config.projection_dim = cfg.hidden_size if identity else cfg.projection_dim
        state = dict(state, **({"text_projection.weight": torch.eye(cfg.hidden_size)} if identity else {}))
        return _load(CLIPTextModelWithProjection(config), state)
    return _load(CLIPTextModel(config), {k: v for k, v in state.items() if k != "text_projection.weight"})


def t5_model(state: dict):
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    cfg = tiny_t5()
    hf = HFT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, num_heads=cfg.num_heads,
                    d_ff=cfg.d_ff, num_layers=cfg.num_layers, feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                    relative_attention_max_distance=cfg.relative_attention_max_distance)  # fmt: skip
    return _load(T5EncoderModel(hf), state)


def vae16(state: dict, scale: float, shift: float):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(TINY_VAE16.ch_mult)
    config = dict(in_channels=3, out_channels=3, block_out_channels=[TINY_VAE16.ch * m for m in TINY_VAE16.ch_mult],
                  layers_per_block=TINY_VAE16.num_res_blocks, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, latent_channels=16, norm_num_groups=32,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scale, shift_factor=shift)
    vae = AutoencoderKL(**config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    return vae


def clip_tokenizer(folder: Path, pad: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


def t5_tokenizer():
    import tokenizers
    from transformers import T5TokenizerFast

    with resources.files("sdcli.data").joinpath("t5_tokenizer.json.gz").open("rb") as f:
        spec = gzip.decompress(f.read()).decode("utf-8")
    return T5TokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(spec))


def sd3_pipeline(path: Path, tokenizer_dir: Path):
    """diffusers' StableDiffusion3Pipeline holding the single file's tensors."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from sdcli.formats.sd3_layouts import to_diffusers

    state = load_file(str(path))
    cfg = dit_config("sd3")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=cfg.patch_size, in_channels=cfg.in_channels, num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.adm_in_channels,
        out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.dual_attention_layers, qk_norm="rms_norm").eval()  # fmt: skip
    transformer.load_state_dict(to_diffusers(_under(state, "model.diffusion_model."), cfg.depth), strict=True)
    text = "text_encoders.{}.transformer."
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT),
        vae=vae16(_under(state, "first_stage_model."), 1.5305, 0.0609),
        text_encoder=clip_model(_under(state, text.format("clip_l")), TINY_CLIP_L, True, identity=True),
        text_encoder_2=clip_model(_under(state, text.format("clip_g")), TINY_CLIP_G, True),
        text_encoder_3=t5_model(_under(state, text.format("t5xxl"))),
        tokenizer=clip_tokenizer(tokenizer_dir, "<|endoftext|>"), tokenizer_2=clip_tokenizer(tokenizer_dir, "!"),
        tokenizer_3=t5_tokenizer())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_scheduler(dev: bool):
    """The schedulers of FLUX.1 dev (dynamic shift) and schnell (shift 1) as their scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dev:
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def flux_pipeline(path: Path, components: dict[str, Path], tokenizer_dir: Path, dev: bool):
    """diffusers' FluxPipeline holding the BFL file's and the component files' tensors."""
    from diffusers import FluxPipeline
    from test_flux_model import bfl_to_diffusers, diffusers_model

    cfg = dit_config("flux" if dev else "flux-schnell")
    transformer = diffusers_model(cfg)
    transformer.load_state_dict(bfl_to_diffusers(load_file(str(path)), cfg), strict=True)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=flux_scheduler(dev),
        vae=vae16(load_file(str(components["vae"])), 0.3611, 0.1159),
        text_encoder=clip_model(load_file(str(components["clip_l"])), TINY_CLIP_L, False),
        text_encoder_2=t5_model(load_file(str(components["t5"]))),
        tokenizer=clip_tokenizer(tokenizer_dir, "<|endoftext|>"), tokenizer_2=t5_tokenizer())  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
