"""Random-weight Stable Diffusion checkpoints and every other kind of file sdcli reads, deterministic from a seed,
for tests and benchmarks.

    python scripts/make_checkpoint.py OUT --family sd1 --size full --dtype fp16 --layout single --seed 0
    python scripts/make_checkpoint.py flux.safetensors --family flux --components   # + ae, clip_l, clip_g, t5xxl

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


# --- SD3 / SD3.5 and FLUX.1 (issue 25): the flow transformers' files in their original layouts ---------------------

DIT_FAMILIES = ("sd3", "flux", "flux-schnell")
TINY_VAE16 = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16, embed_dim=16,
                       use_quant_conv=False)  # fmt: skip
# Tiny encoders keep the real structure: CLIP-L (quick GELU, pads with its end token), bigG (GELU, pads with 0, a
# non-square projection) whose contexts together (32 + 64) are narrower than T5's width (128), T5 with the real
# vocabulary and bucket count (the shipped tokenizer's ids must fit).
TINY_CLIP_L = TextConfig(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64, hidden_act="quick_gelu",
                         pad_id=49407)  # fmt: skip
TINY_CLIP_G = TextConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128, hidden_act="gelu",
                         pad_id=0, projection_dim=40)  # fmt: skip


def tiny_t5():
    from sdcli.models.t5 import T5Config

    return T5Config(d_model=128, d_kv=16, num_heads=2, d_ff=64, num_layers=2)


def dit_config(family: str, size: str = "tiny"):
    """The diffusion transformer of a preset: SD3.5-Medium-shaped MMDiT (dual attention in block 0, q/k RMS norm,
    2x2 patches, 64-channel heads as every release), or a FLUX DiT (dev: with guidance_in)."""
    from sdcli.models.flux import FluxConfig
    from sdcli.models.mmdit import MMDiTConfig

    if size != "tiny":
        # SD3.5 Medium: dual attention in blocks 0-12, q/k RMS norm, a 384 x 384 position table (SD3 Medium's: 192)
        return MMDiTConfig(dual_attention_layers=tuple(range(13)), qk_norm=True, pos_embed_max_size=384) \
            if family == "sd3" else \
            FluxConfig(guidance_embed=family == "flux")  # fmt: skip
    if family == "sd3":
        return MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8, mlp_hidden=512,
                           adm_in_channels=TINY_CLIP_L.hidden_size + TINY_CLIP_G.projection_dim,
                           context_dim=tiny_t5().d_model, dual_attention_layers=(0,), qk_norm=True)  # fmt: skip
    return FluxConfig(vec_in_dim=TINY_CLIP_L.hidden_size, context_in_dim=tiny_t5().d_model, hidden_size=32,
                      mlp_hidden_dim=128, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                      guidance_embed=family == "flux")  # fmt: skip


def _random_dit(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """As _random, and the RMS-norm scales (FLUX ``.scale``, SD3 ``ln_q``/``ln_k``) around 1."""
    t = _random(key, shape, gen)
    return t.mul_(0.0).add_(torch.randn(shape, generator=gen).mul_(0.1).add_(1.0)) if key.endswith(".scale") else t


def _state(modules: dict[str, torch.nn.Module], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """prefix -> module built on meta: every tensor random, in sorted key order from one seeded generator."""
    shapes = {}
    for prefix, module in modules.items():
        shapes.update(_meta_shapes(module, prefix))
    gen = torch.Generator().manual_seed(seed)
    return {k: _random_dit(k, shapes[k], gen).to(dtype) for k in sorted(shapes)}


def dit_state(family: str, size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """The diffusion transformer's tensors under their own names (Stability's after model.diffusion_model.,
    BFL's for FLUX)."""
    from sdcli.models.flux import FluxModel
    from sdcli.models.mmdit import MMDiT

    cfg = dit_config(family, size)
    with torch.device("meta"):
        net = MMDiT(cfg) if family == "sd3" else FluxModel(cfg)
    return _state({"": net}, seed, dtype)


def text_state(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny text encoder as ComfyUI's separate files hold it: CLIP in transformers names (``text_model.*``, a
    ``text_projection.weight`` even where the family does not use it, and ``logit_scale``); T5 with both names of
    its embedding (``shared.weight``, ``encoder.embed_tokens.weight``), as real files."""
    from sdcli.models.t5 import T5Encoder

    if kind == "t5":
        with torch.device("meta"):
            module = T5Encoder(tiny_t5())
        state = _state({"": module}, seed, dtype)
        state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()
        return state
    cfg = TINY_CLIP_L if kind == "clip_l" else TINY_CLIP_G
    with torch.device("meta"):
        module = TextEncoder(TextConfig(**{**cfg.__dict__, "projection_dim": cfg.projection_dim or cfg.hidden_size}))
    state = _state({"": module}, seed, dtype)
    state = {k.replace("transformer.text_model.", "text_model.").replace("transformer.", "text_model."): v
             for k, v in state.items()}
    state["logit_scale"] = torch.tensor(4.6052, dtype=dtype)
    return state


def vae16_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The 16-channel VAE (no quant convs) under its own names, as BFL's ae.safetensors."""
    with torch.device("meta"):
        module = AutoencoderKL(TINY_VAE16)
    return _state({"": module}, seed, dtype)


def _save(state: dict, out: Path, seed: int) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={"format": "pt", "sdcli.random_seed": str(seed)})  # fmt: skip
    return out


def make_dit_checkpoint(out: str | Path, family: str = "sd3", size: str = "tiny", dtype: torch.dtype = torch.float32,
                        seed: int = 0, encoders: tuple[str, ...] = ("clip_l", "clip_g", "t5"),
                        vae: bool = True) -> Path:  # fmt: skip
    """SD3: a Stability single file (model.diffusion_model.*, text_encoders.{clip_l,clip_g,t5xxl}.transformer.* for
    each of `encoders`, first_stage_model.* when `vae`). FLUX: BFL's file, the DiT alone without a prefix (its
    companions: make_dit_components)."""
    out = Path(out)
    dit = dit_state(family, size, seed, dtype)
    if family != "sd3":
        return _save(dit, out, seed)
    state = {"model.diffusion_model." + k: v for k, v in dit.items()}
    for n, kind in enumerate(encoders):
        place = "t5xxl" if kind == "t5" else kind
        state.update({f"text_encoders.{place}.transformer.{k}": v
                      for k, v in text_state(kind, seed + 1 + n, dtype).items()})  # fmt: skip
    if vae:
        state.update({"first_stage_model." + k: v for k, v in vae16_state(seed + 9, dtype).items()})
    return _save(state, out, seed)


def make_dit_components(folder: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                        t5_dtype: torch.dtype | None = None) -> dict[str, Path]:
    """ae.safetensors (VAE, no prefix), clip_l.safetensors, clip_g.safetensors and t5xxl.safetensors (ComfyUI's
    text encoder files) in `folder`; `t5_dtype`: the T5 file's own (torch.float8_e4m3fn for an fp8 file)."""
    folder = Path(folder)
    files = {"vae": _save(vae16_state(seed + 9, dtype), folder / "ae.safetensors", seed)}
    for n, kind in enumerate(("clip_l", "clip_g", "t5")):
        state = text_state(kind, seed + 1 + n, dtype)
        if kind == "t5" and t5_dtype is not None:
            state = {k: v.to(t5_dtype) for k, v in state.items()}
        files[kind] = _save(state, folder / f"{'t5xxl' if kind == 't5' else kind}.safetensors", seed)
    return files


KINDS = {
    "checkpoint": "a whole model (--family, --size, --layout single|diffusers, --inpaint, --prediction); SD3/FLUX: "
                  "--components also writes ae, clip_l, clip_g and t5xxl .safetensors beside it",
    "controlnet": "a ControlNet for the preset's UNet (sd1, sd2, sdxl; --layout " + "|".join(CONTROLNET_LAYOUTS) + ")",
    "lora": "a kohya LoRA for a UNet family (sd1, sd2, sdxl, sdxl-refiner; --rank, --tags; --no-metadata leaves "
            "out kohya's ss_* training metadata)",
    "embedding": "a textual-inversion embedding for the family's text encoder(s) (--vectors; --layout a1111_pt "
                 "(.pt), old_pt, emb_params (.safetensors), diffusers_bin, diffusers_st; SDXL: sdxl)",
    "taesd": "madebyollin's TAESD pair, OUT is a folder: NAME_encoder/NAME_decoder.safetensors (taesd; "
             "sd3/flux: 16 latent channels, taesd3 / taef1)",
    "vae": "a VAE-only file (vae-ft-mse / ae.safetensors style: LDM names without first_stage_model.)",
    "upscaler": "an ESRGAN upscaler (--arch rrdb|compact, --scale, --layout basicsr|old|2019 for rrdb)",
    "clip-l": "a separate CLIP-L text encoder file (ComfyUI's clip_l.safetensors)",
    "clip-g": "a separate OpenCLIP bigG text encoder file (clip_g.safetensors)",
    "t5": "a separate T5 encoder file (t5xxl.safetensors)",
}
LAYOUTS = {"checkpoint": ("single", "diffusers"), "controlnet": CONTROLNET_LAYOUTS,
           "embedding": ("a1111_pt", "old_pt", "emb_params", "diffusers_bin", "diffusers_st", "sdxl"),
           "upscaler": ("basicsr", "old", "2019")}  # fmt: skip
UNET_FAMILIES = ("sd1", "sd2", *SDXL_FAMILIES)


def _parser() -> argparse.ArgumentParser:
    kinds = "\n".join(f"  {k:<11} {v}" for k, v in KINDS.items())
    ap = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"kinds (--kind):\n{kinds}\n\nexamples:\n"
               "  python scripts/make_checkpoint.py tiny.safetensors                      # tiny SD1 checkpoint\n"
               "  python scripts/make_checkpoint.py xl.safetensors --family sdxl\n"
               "  python scripts/make_checkpoint.py flux/flux1.safetensors --family flux --components\n"
               "  python scripts/make_checkpoint.py lora/mychar.safetensors --kind lora --rank 8\n"
               "  python scripts/make_checkpoint.py emb/myemb.pt --kind embedding --vectors 4\n"
               "  python scripts/make_checkpoint.py vae/ --kind taesd\n"
               "  python scripts/make_checkpoint.py 4x-tiny.pth --kind upscaler --arch compact")  # fmt: skip
    ap.add_argument("out", type=Path, help="the file to write (a folder for --layout diffusers, "
                    "--layout diffusers-folder and --kind taesd)")
    ap.add_argument("--kind", choices=list(KINDS), default="checkpoint", help="what to write (below; default "
                    "checkpoint)")
    ap.add_argument("--family", choices=["sd1", "sd2", *SDXL_FAMILIES, *DIT_FAMILIES], default="sd1",
                    help="the model family the file is made for (default sd1)")
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny", help="tiny: test shapes, a few MB (default); "
                    "full: the released models' shapes (GBs for a checkpoint)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="tensor dtype (default fp32)")
    ap.add_argument("--layout", default=None, help="key layout; by kind: " + "; ".join(
        f"{k}: {', '.join(v)}" for k, v in LAYOUTS.items()) + " (default: the first)")
    ap.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default 0)")
    ap.add_argument("--prediction", choices=["eps", "v"], default=None, help="checkpoint: recorded in the file "
                    "(modelspec.prediction_type; diffusers: the scheduler config)")
    ap.add_argument("--inpaint", action="store_true", help="checkpoint: a 9-channel inpainting UNet")
    ap.add_argument("--components", action="store_true", help="SD3/FLUX checkpoint: also write ae.safetensors, "
                    "clip_l, clip_g and t5xxl .safetensors beside OUT (FLUX's file holds the DiT alone)")
    ap.add_argument("--rank", type=int, default=4, help="lora: the rank (alpha is half of it; default 4)")
    ap.add_argument("--tags", default=None, help="lora: training tags and counts for ss_tag_frequency, "
                    "'mychar:24,smile:7' (default: mychar, 1girl, smile)")
    ap.add_argument("--no-metadata", action="store_true", help="lora: write no training metadata")
    ap.add_argument("--vectors", type=int, default=2, help="embedding: vectors per encoder (default 2)")
    ap.add_argument("--arch", choices=["rrdb", "compact"], default="rrdb", help="upscaler: RRDBNet (ESRGAN) or "
                    "Real-ESRGAN Compact (default rrdb)")
    ap.add_argument("--scale", type=int, choices=[1, 2, 4], default=4, help="upscaler: the factor (default 4)")
    return ap


def _tags(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    pairs = [item.rpartition(":") for item in text.split(",") if item.strip()]
    return {tag.strip(): int(count) for tag, _, count in pairs}


def _make_upscaler(a: argparse.Namespace) -> Path:
    from make_upscaler import write_compact, write_rrdb

    from sdcli.models.esrgan import CompactConfig, RRDBConfig

    tiny = a.size == "tiny"
    if a.arch == "compact":
        return write_compact(a.out, CompactConfig(num_features=8 if tiny else 64, num_convs=2 if tiny else 16,
                                                  scale=a.scale), a.seed)  # fmt: skip
    unshuffle = 4 // a.scale
    cfg = RRDBConfig(in_channels=3 * unshuffle**2, num_features=8 if tiny else 64, num_blocks=1 if tiny else 23,
                     growth=4 if tiny else 32, unshuffle=unshuffle)  # fmt: skip
    return write_rrdb(a.out, cfg, a.layout or "basicsr", a.seed)


def make(a: argparse.Namespace) -> Path:
    """The file (or folder) --kind asks for."""
    import make_extras as extras

    dtype = DTYPES[a.dtype]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.kind == "checkpoint" and a.family in DIT_FAMILIES:
        out = make_dit_checkpoint(a.out, a.family, a.size, dtype, a.seed)
        if a.components:
            make_dit_components(Path(a.out).parent, a.seed, dtype)
        return out
    if a.kind == "checkpoint":
        return make_checkpoint(a.out, a.family, a.size, dtype, a.layout or "single", a.seed, a.prediction, a.inpaint)
    if a.kind == "controlnet":
        return make_controlnet(a.out, a.family, a.size, a.layout or "original", a.seed, dtype)
    if a.kind == "lora":
        return extras.make_lora(a.out, a.family, a.size, a.rank, a.seed, dtype, _tags(a.tags), not a.no_metadata)
    if a.kind == "embedding":
        return extras.make_embedding(a.out, a.family, a.size, a.layout, a.vectors, a.seed)
    if a.kind == "taesd":
        channels = 16 if a.family in DIT_FAMILIES else 4
        name = {"sd3": "taesd3", "flux": "taef1", "flux-schnell": "taef1"}.get(a.family, "taesdxl" if a.family in
                                                                               SDXL_FAMILIES else "taesd")  # fmt: skip
        extras.make_taesd(a.out, name, channels, 16 if a.size == "tiny" else 64, a.seed, dtype)
        return a.out
    if a.kind == "vae":
        return extras.make_vae(a.out, a.family, a.size, a.seed, dtype)
    if a.kind == "upscaler":
        return _make_upscaler(a)
    kind = a.kind.replace("-", "_")
    return _save(text_state(kind, a.seed, dtype), Path(a.out), a.seed)


def _check(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """The combinations a kind refuses, as usage errors (exit 2) rather than a traceback."""
    if a.layout is not None and a.layout not in LAYOUTS.get(a.kind, ()):
        ap.error(f"--layout {a.layout} is not one of {a.kind}'s: {', '.join(LAYOUTS.get(a.kind, ())) or 'none'}")
    if a.kind in ("lora", "embedding") and a.family not in UNET_FAMILIES:
        ap.error(f"--kind {a.kind} is made for the UNet families ({', '.join(UNET_FAMILIES)})")
    if a.kind == "controlnet" and a.family not in ("sd1", "sd2", "sdxl"):
        ap.error("--kind controlnet is made for sd1, sd2 and sdxl")
    if a.kind in ("clip-l", "clip-g", "t5") and a.size != "tiny":
        ap.error(f"--kind {a.kind} is made in the tiny size only")
    if a.kind == "checkpoint" and a.family in SDXL_FAMILIES + DIT_FAMILIES and (a.layout or "single") != "single":
        ap.error(f"{a.family} checkpoints are written in the single-file layout only")
    if a.tags is not None:
        try:
            _tags(a.tags)
        except ValueError:
            ap.error(f"--tags must be TAG:COUNT,..., got {a.tags!r}")


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    a = ap.parse_args(argv)
    _check(ap, a)
    print(make(a))


if __name__ == "__main__":
    main()
