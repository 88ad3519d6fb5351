"""Random-weight Stable Diffusion checkpoints, deterministic from a seed, for tests and benchmarks.

    python scripts/make_checkpoint.py OUT --family sd1 --size full --dtype fp16 --layout single --seed 0

Layouts: ``single`` = one LDM-named .safetensors file (SD1: cond_stage_model.transformer.text_model.*,
SD2: OpenCLIP cond_stage_model.model.*; SDXL: conditioner.embedders.0.transformer.text_model.* (CLIP-L) and
conditioner.embedders.1.model.* (OpenCLIP bigG, all layers, text_projection stored (width, proj)); the refiner
has bigG alone under conditioner.embedders.0.model.*), ``diffusers`` (SD1/SD2 only) = a folder with model_index.json, unet/, vae/,
text_encoder/, scheduler/ (names from sdcli.loading.checkpoint's rename table). Sizes: ``tiny`` (tests, a few MB)
and ``full`` (the real SD1.5 / SD2.1 / SDXL 1.0 base and refiner shapes). The key list comes from sdcli's own modules built on the
meta device; every tensor is drawn in sorted key order from one seeded generator, so the same seed gives
the same bytes. Scales keep activations finite at full size: weights N(0, 1/fan_in), biases N(0, 0.02^2),
norm weights 1 + N(0, 0.1^2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdcli.formats.clip_layouts import text_plan
from sdcli.formats.diffusers import is_vae_attn_matrix, rename, unet_prefix_pairs, vae_prefix_pairs
from sdcli.formats.ldm import OPENAI_TEXT, OPENCLIP_TEXT, UNET_PREFIX, VAE_PREFIX
from sdcli.models import AutoencoderKL, TextConfig, TextEncoder, UNetConfig, UNetModel, VAEConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)  # 4 levels: latent = image / 8
TINY_TEXT = dict(vocab_size=49408, hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
PRESETS = {
    ("sd1", "tiny"): (
        UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(True, False),
                   context_dim=64, num_heads=8),
        TINY_VAE, TextConfig(**TINY_TEXT)),
    ("sd2", "tiny"): (  # SD2 heads are 64 channels wide, so the tiny SD2 UNet starts at 64 channels
        UNetConfig(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_levels=(True, False),
                   context_dim=64, num_heads=None, head_dim=64, use_linear_in_transformer=True),
        TINY_VAE, TextConfig(pad_id=0, hidden_act="gelu", **TINY_TEXT)),
    ("sd1", "full"): (UNetConfig(), VAEConfig(), TextConfig()),
    ("sd2", "full"): (  # SD 2.1 (v2-inference-v.yaml): OpenCLIP ViT-H, 23 of its 24 layers used
        UNetConfig(context_dim=1024, num_heads=None, head_dim=64, use_linear_in_transformer=True),
        VAEConfig(), TextConfig(pad_id=0, hidden_size=1024, num_layers=23, num_heads=16,
                                intermediate_size=4096, hidden_act="gelu")),
}  # fmt: skip


SDXL_VAE_SCALE = 0.13025
SDXL_L = dict(hidden_act="quick_gelu", pad_id=49407)  # CLIP ViT-L: pads with EOS
SDXL_G = dict(hidden_act="gelu", pad_id=0)  # OpenCLIP bigG: pads with "!" (id 0)
# family, size -> (UNet, VAE, CLIP-L or None, bigG). The tiny ones keep the real structure: two encoders of
# different widths (context 64 + 128), a non-square projection (128 -> 96), no attention at level 0, depth 2
# on a level, 64-channel heads, y = pooled 96 + 6 (refiner 5) embeddings 8 wide.
SDXL_PRESETS = {
    ("sdxl", "tiny"): (
        UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_levels=(False, True, True),
                   transformer_depth=(0, 1, 2), middle_depth=2, context_dim=192, num_heads=None, head_dim=64,
                   use_linear_in_transformer=True, adm_in_channels=96 + 6 * 8),
        VAEConfig(**{**TINY_VAE.__dict__, "scale_factor": SDXL_VAE_SCALE}),
        TextConfig(hidden_size=64, num_layers=3, num_heads=1, intermediate_size=256, **SDXL_L),
        TextConfig(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=512, projection_dim=96, **SDXL_G)),
    ("sdxl-refiner", "tiny"): (
        UNetConfig(model_channels=64, channel_mult=(1, 2, 2, 2), attention_levels=(False, True, True, False),
                   transformer_depth=2, context_dim=128, num_heads=None, head_dim=64,
                   use_linear_in_transformer=True, adm_in_channels=96 + 5 * 8),
        VAEConfig(**{**TINY_VAE.__dict__, "scale_factor": SDXL_VAE_SCALE}), None,
        TextConfig(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=512, projection_dim=96, **SDXL_G)),
    ("sdxl", "full"): (  # sd_xl_base.yaml
        UNetConfig(channel_mult=(1, 2, 4), attention_levels=(False, True, True), transformer_depth=(0, 2, 10),
                   middle_depth=10, context_dim=2048, num_heads=None, head_dim=64, use_linear_in_transformer=True,
                   adm_in_channels=2816),
        VAEConfig(scale_factor=SDXL_VAE_SCALE),
        TextConfig(**SDXL_L),
        TextConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, projection_dim=1280,
                   **SDXL_G)),
    ("sdxl-refiner", "full"): (  # sd_xl_refiner.yaml
        UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), attention_levels=(False, True, True, False),
                   transformer_depth=4, context_dim=1280, num_heads=None, head_dim=64,
                   use_linear_in_transformer=True, adm_in_channels=2560),
        VAEConfig(scale_factor=SDXL_VAE_SCALE), None,
        TextConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, projection_dim=1280,
                   **SDXL_G)),
}  # fmt: skip
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
SDXL_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_G_PREFIX = {"sdxl": "conditioner.embedders.1.model.", "sdxl-refiner": "conditioner.embedders.0.model."}


def clip_config(text: TextConfig):
    """The transformers CLIPTextConfig equal to our TextConfig: for diffusers folders and the test oracles (sdcli
    itself never imports transformers)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads, intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_positions, hidden_act=text.hidden_act, layer_norm_eps=1e-5,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=text.pad_id,
        **({} if text.projection_dim is None else {"projection_dim": text.projection_dim}),
    )


def preset(family: str, size: str, inpaint: bool = False) -> tuple[UNetConfig, VAEConfig, TextConfig]:
    unet, vae, text = PRESETS[(family, size)]
    if inpaint:
        unet = UNetConfig(**{**unet.__dict__, "in_channels": 9})
    return unet, vae, text


def _meta_shapes(module: torch.nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def openclip_shapes(text: TextConfig, prefix: str = OPENCLIP_TEXT, layers: int | None = None,
                    proj: int | None = None) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """OpenCLIP text-tower names. SD2 (the defaults): one layer more than the model uses, a square projection.
    SDXL's bigG: `layers` = all of them, text_projection stored (width, proj), used as x @ P."""
    d, p = text.hidden_size, prefix
    out = {p + "token_embedding.weight": (text.vocab_size, d), p + "positional_embedding": (text.max_positions, d),
           p + "ln_final.weight": (d,), p + "ln_final.bias": (d,), p + "text_projection": (d, proj or d),
           p + "logit_scale": ()}  # fmt: skip
    for i in range(text.num_layers + 1 if layers is None else layers):
        r = f"{p}transformer.resblocks.{i}."
        out.update({r + "ln_1.weight": (d,), r + "ln_1.bias": (d,), r + "ln_2.weight": (d,), r + "ln_2.bias": (d,),
                    r + "attn.in_proj_weight": (3 * d, d), r + "attn.in_proj_bias": (3 * d,),
                    r + "attn.out_proj.weight": (d, d), r + "attn.out_proj.bias": (d,),
                    r + "mlp.c_fc.weight": (text.intermediate_size, d), r + "mlp.c_fc.bias": (text.intermediate_size,),
                    r + "mlp.c_proj.weight": (d, text.intermediate_size), r + "mlp.c_proj.bias": (d,)})  # fmt: skip
    return out


def sdxl_preset(family: str, size: str, inpaint: bool = False):
    """(UNet, VAE, CLIP-L or None, bigG) configs of an SDXL preset; `inpaint`: the 9-channel UNet."""
    unet, vae, text_l, text_g = SDXL_PRESETS[(family, size)]
    if inpaint:
        unet = UNetConfig(**{**unet.__dict__, "in_channels": 9})
    return unet, vae, text_l, text_g


def sdxl_shapes(family: str, size: str, inpaint: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an SDXL single file (sgm layout), from our modules built on meta."""
    unet_cfg, vae_cfg, text_l, text_g = sdxl_preset(family, size, inpaint)
    with torch.device("meta"):
        shapes = _meta_shapes(UNetModel(unet_cfg), UNET_PREFIX)
        shapes.update(_meta_shapes(AutoencoderKL(vae_cfg), VAE_PREFIX))
        if text_l is not None:
            state = TextEncoder(text_l).state_dict()
            shapes.update({SDXL_L_PREFIX + k.removeprefix("transformer.").removeprefix("text_model."): tuple(v.shape)
                           for k, v in state.items()})  # fmt: skip
            shapes[SDXL_L_PREFIX + "embeddings.position_ids"] = (1, text_l.max_positions)  # real files carry it
    shapes.update(openclip_shapes(text_g, SDXL_G_PREFIX[family], text_g.num_layers, text_g.projection_dim))
    return shapes


def ldm_shapes(family: str, size: str, inpaint: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the single-file LDM layout, from our modules built on meta (no memory used)."""
    if family in SDXL_FAMILIES:
        return sdxl_shapes(family, size, inpaint)
    unet_cfg, vae_cfg, text_cfg = preset(family, size, inpaint)
    with torch.device("meta"):
        shapes = _meta_shapes(UNetModel(unet_cfg), UNET_PREFIX)
        shapes.update(_meta_shapes(AutoencoderKL(vae_cfg), VAE_PREFIX))
        if family == "sd2":
            shapes.update(openclip_shapes(text_cfg))
        else:
            text = TextEncoder(text_cfg)
            shapes.update({OPENAI_TEXT + "text_model." + k.removeprefix("transformer.").removeprefix("text_model."): tuple(v.shape)
                           for k, v in text.state_dict().items()})  # fmt: skip
    return shapes


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()  # int64, as real files store it
    if key.endswith("logit_scale"):
        return t.mul_(0.0).add_(4.6052)  # log(100), as trained CLIP models have
    if len(shape) == 1 and leaf == "weight":  # GroupNorm / LayerNorm scales
        return t.mul_(0.1).add_(1.0)
    if len(shape) == 1 or leaf == "bias":
        return t.mul_(0.02)
    if "embedding" in key:
        return t.mul_(0.02)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return t.mul_(fan_in**-0.5)


def ldm_state_dict(family: str, size: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                   inpaint: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    shapes = ldm_shapes(family, size, inpaint)
    out = {k: _random(k, shapes[k], gen) for k in sorted(shapes)}
    return {k: t if k.endswith("position_ids") else t.to(dtype) for k, t in out.items()}


def _invert(pairs: list[tuple[str, str]]) -> dict[str, str]:
    return {ldm: diff for diff, ldm in pairs}


def _openclip_to_hf(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD2 OpenCLIP text weights -> CLIPTextModel names, dropping the unused last layer (as diffusers does)."""
    plan, _ = text_plan(list(state), "openclip", layers, "")
    out = {}
    for name, (key, chunk) in plan.items():
        t = state[key]
        out[name] = t if chunk is None else t.chunk(3, dim=0)[chunk].clone()
    return out


def to_diffusers(state: dict[str, torch.Tensor], family: str, size: str, inpaint: bool = False) -> dict[str, dict]:
    """Split an LDM state dict into diffusers component state dicts with sdcli's rename table (inverted)."""
    unet_cfg, vae_cfg, text_cfg = preset(family, size, inpaint)
    unet_table = _invert(unet_prefix_pairs(len(unet_cfg.channel_mult), unet_cfg.num_res_blocks,
                                              unet_cfg.attention_levels))  # fmt: skip
    vae_table = _invert(vae_prefix_pairs(len(vae_cfg.ch_mult), vae_cfg.num_res_blocks))
    comps: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for k, t in state.items():
        if k.startswith(UNET_PREFIX):
            comps["unet"][rename(k[len(UNET_PREFIX):], unet_table)] = t
        elif k.startswith(VAE_PREFIX):
            name = k[len(VAE_PREFIX):]
            comps["vae"][rename(name, vae_table)] = t.flatten(1) if is_vae_attn_matrix(name) else t
        elif k.startswith(OPENAI_TEXT):
            comps["text_encoder"][k[len(OPENAI_TEXT):].removeprefix("text_model.")] = t
    if family == "sd2":
        comps["text_encoder"] = _openclip_to_hf(state, text_cfg.num_layers)
    assert None not in comps["unet"] and None not in comps["vae"], "rename table does not cover every key"
    return comps


def unet_diffusers_config(cfg: UNetConfig, family: str, pooled_dim: int | None = None) -> dict:
    """diffusers' UNet2DConditionModel config for `cfg`. SDXL (family sdxl / sdxl-refiner) needs the pooled
    width to split y into diffusers' addition_time_embed_dim."""
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    # diffusers' `attention_head_dim` is really the number of heads (a known misnomer in SD configs)
    heads = 8 if family == "sd1" else [c // 64 for c in chans]
    depth = cfg.transformer_depth
    if isinstance(depth, tuple):  # diffusers' middle block takes the last level's depth; no-attention levels: any
        assert depth[-1] == cfg.mid_depth, "diffusers cannot express a middle depth unlike the last level's"
        depth = [max(d, 1) for d in depth]
    full = cfg.model_channels in (320, 384)
    sample = (128 if family in SDXL_FAMILIES else 64) if full else 8  # latent side of the native image size
    out = {"_class_name": "UNet2DConditionModel", "sample_size": sample,
           "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "block_out_channels": chans,
           "layers_per_block": cfg.num_res_blocks, "cross_attention_dim": cfg.context_dim,
           "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
           "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)],
           "attention_head_dim": heads, "use_linear_projection": cfg.use_linear_in_transformer,
           "transformer_layers_per_block": depth, "norm_num_groups": 32, "norm_eps": 1e-5,
           "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "downsample_padding": 1}  # fmt: skip
    if cfg.adm_in_channels is not None:  # SDXL: y = pooled + one sinusoidal embedding per size/crop value
        assert pooled_dim is not None
        n_values = 5 if family == "sdxl-refiner" else 6
        out.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=cfg.adm_in_channels,
                   addition_time_embed_dim=(cfg.adm_in_channels - pooled_dim) // n_values)
    return out


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "latent_channels": cfg.z_channels, "norm_num_groups": 32, "act_fn": "silu",
            "sample_size": 512 if cfg.ch == 128 else 64, "scaling_factor": cfg.scale_factor}  # fmt: skip


SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}  # fmt: skip


def write_diffusers(out: Path, comps: dict[str, dict], family: str, size: str, prediction: str | None,
                    inpaint: bool = False) -> None:  # fmt: skip
    unet_cfg, vae_cfg, text_cfg = preset(family, size, inpaint)
    configs = {"unet": unet_diffusers_config(unet_cfg, family), "vae": vae_diffusers_config(vae_cfg)}
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors"}  # fmt: skip
    for name, sd in comps.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / name / files[name]), metadata={"format": "pt"})
        if name in configs:
            (out / name / "config.json").write_text(json.dumps(configs[name], indent=2))
    clip = clip_config(text_cfg)
    clip.architectures = ["CLIPTextModel"]
    clip.to_json_file(str(out / "text_encoder" / "config.json"))
    (out / "scheduler").mkdir(exist_ok=True)
    pred = {"v": "v_prediction", "eps": "epsilon", None: "v_prediction" if family == "sd2" else "epsilon"}[prediction]
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER, "prediction_type": pred}))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def make_checkpoint(out: str | Path, family: str = "sd1", size: str = "tiny", dtype: torch.dtype = torch.float32,
                    layout: str = "single", seed: int = 0, prediction: str | None = None,
                    inpaint: bool = False) -> Path:  # fmt: skip
    """Write a random checkpoint to `out` (a .safetensors path or a folder) and return the path."""
    out = Path(out)
    state = ldm_state_dict(family, size, seed, dtype, inpaint)
    if layout == "single":
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "pt", "sdcli.random_seed": str(seed)}
        if prediction is not None:
            meta["modelspec.prediction_type"] = {"v": "v", "eps": "epsilon"}[prediction]
        save_file(state, str(out), metadata=meta)
    elif family in SDXL_FAMILIES:
        raise ValueError("SDXL presets are written in the single-file layout only")
    elif layout == "diffusers":
        write_diffusers(out, to_diffusers(state, family, size, inpaint), family, size, prediction, inpaint)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return out


# --- ControlNet files (issue 15): random ControlNets in every layout sdcli reads -------------------------

CONTROLNET_SDXL_UNETS = {  # SDXL encoders; tiny keeps the real structure (SDXL_CONTROLNET_TI_TAESD.md App. 2)
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_levels=(False, True, True),
                       transformer_depth=(0, 2, 3), middle_depth=3, context_dim=80, num_heads=None, head_dim=16,
                       use_linear_in_transformer=True, adm_in_channels=88),
    "full": UNetConfig(channel_mult=(1, 2, 4), attention_levels=(False, True, True), transformer_depth=(0, 2, 10),
                       middle_depth=10, context_dim=2048, num_heads=None, head_dim=64,
                       use_linear_in_transformer=True, adm_in_channels=2816),
}  # fmt: skip
CONTROLNET_LAYOUTS = ("original", "original-bare", "diffusers", "diffusers-folder", "pth")


def controlnet_config(family: str = "sd1", size: str = "tiny"):
    """The ControlNet that fits preset(family, size)'s UNet (SDXL: CONTROLNET_SDXL_UNETS); tiny hint widths."""
    from sdcli.models.controlnet import HINT_WIDTHS, ControlNetConfig

    unet = CONTROLNET_SDXL_UNETS[size] if family == "sdxl" else PRESETS[(family, size)][0]
    return ControlNetConfig(unet=unet, hint_widths=(8, 8, 16, 16) if size == "tiny" else HINT_WIDTHS)


def controlnet_state_dict(cfg, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor random (zero convolutions included: zeros would hide the ControlNet), original names."""
    from sdcli.models.controlnet import ControlNet

    with torch.device("meta"):
        shapes = _meta_shapes(ControlNet(cfg), "")
    gen = torch.Generator().manual_seed(seed)
    return {k: _random(k, shapes[k], gen).to(dtype) for k in sorted(shapes)}


def controlnet_to_diffusers(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    from sdcli.control.files import controlnet_prefix_pairs

    u = cfg.unet
    table = _invert(controlnet_prefix_pairs(len(u.channel_mult), u.num_res_blocks, u.attention_levels))
    out = {rename(k, table): t for k, t in state.items()}
    assert None not in out, "ControlNet rename table does not cover every key"
    return out


def controlnet_diffusers_config(cfg) -> dict:
    """config.json of the diffusers ControlNetModel equal to `cfg`."""
    u = cfg.unet
    chans = [u.model_channels * m for m in u.channel_mult]
    depth = u.transformer_depth if isinstance(u.transformer_depth, int) else [max(1, d) for d in u.transformer_depth]
    heads = u.num_heads if u.num_heads is not None else [max(1, c // u.head_dim) for c in chans]
    out = {"_class_name": "ControlNetModel", "in_channels": u.in_channels, "conditioning_channels": cfg.hint_channels,
           "flip_sin_to_cos": True, "freq_shift": 0, "block_out_channels": chans, "layers_per_block": u.num_res_blocks,
           "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels],
           "cross_attention_dim": u.context_dim, "attention_head_dim": heads, "transformer_layers_per_block": depth,
           "use_linear_projection": u.use_linear_in_transformer, "norm_num_groups": 32, "norm_eps": 1e-5,
           "downsample_padding": 1, "act_fn": "silu", "conditioning_embedding_out_channels": list(cfg.hint_widths),
           "global_pool_conditions": cfg.global_pool, "controlnet_conditioning_channel_order": "rgb"}  # fmt: skip
    if u.adm_in_channels is not None:  # SDXL: 6 size values embedded 256 wide (8 in the tiny one) after pooled text
        time_dim = 256 if u.adm_in_channels == 2816 else 8
        out.update(addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                   projection_class_embeddings_input_dim=u.adm_in_channels)  # fmt: skip
    return out


def make_controlnet(out: str | Path, family: str = "sd1", size: str = "tiny", layout: str = "original",
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """Write a random ControlNet: ``original`` (control_model.*), ``original-bare`` (no prefix), ``pth``
    (original names in a torch.save pickle), ``diffusers`` (one file), ``diffusers-folder`` (with config.json)."""
    out = Path(out)
    cfg = controlnet_config(family, size)
    state = controlnet_state_dict(cfg, seed, dtype)
    if layout.startswith("diffusers"):
        state = controlnet_to_diffusers(state, cfg)
    elif layout in ("original", "pth"):
        state = {"control_model." + k: t for k, t in state.items()}
    elif layout != "original-bare":
        raise ValueError(f"unknown ControlNet layout {layout!r}")
    if layout == "diffusers-folder":
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(controlnet_diffusers_config(cfg), indent=2))
        save_file(state, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if layout == "pth":
        torch.save({"state_dict": state}, out)
    else:
        save_file(state, str(out), metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=["sd1", "sd2", *SDXL_FAMILIES], default="sd1")
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--layout", choices=["single", "diffusers"], default="single")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prediction", choices=["eps", "v"], default=None)
    ap.add_argument("--inpaint", action="store_true")
    a = ap.parse_args(argv)
    make_checkpoint(a.out, a.family, a.size, DTYPES[a.dtype], a.layout, a.seed, a.prediction, a.inpaint)
    print(a.out)


if __name__ == "__main__":
    main()
