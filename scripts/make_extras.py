"""Random files of the kinds sdcli reads beside a checkpoint, deterministic from a seed: LoRAs, textual-inversion
embeddings, TAESD files, VAE-only files. scripts/make_checkpoint.py writes them from the command line (--kind); the
tests import the builders from here (tests/_fixtures_embeddings.py re-exports the embedding writers).

Every builder takes its shapes from sdcli's own modules built on the meta device (no memory used) and draws the
values from one seeded generator, as make_checkpoint.py does for whole checkpoints, so no test oracle (diffusers,
transformers) is needed to make a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from make_checkpoint import (SDXL_FAMILIES, TINY_VAE, TINY_VAE16, _meta_shapes, _random, _state, preset,
                             sdxl_preset)  # fmt: skip
from sdcli.formats.diffusers import rename, unet_prefix_pairs
from sdcli.models import AutoencoderKL, TextEncoder, UNetModel, VAEConfig

# --- textual-inversion embeddings ------------------------------------------------------------------------------

EMBEDDING_FORMATS = ("a1111_pt", "old_pt", "emb_params", "diffusers_bin", "diffusers_st", "sdxl")


def random_vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_embedding(path: Path, fmt: str, vectors: dict[str, torch.Tensor]) -> Path:
    """`vectors` ({"*": (n, d)} or {"clip_l": ..., "clip_g": ...}) as: ``a1111_pt`` (A1111's dict with
    string_to_param), ``old_pt`` (the same with a torch.nn.ParameterDict, as very old files), ``emb_params`` (kohya
    .safetensors), ``diffusers_bin`` / ``diffusers_st`` (learned_embeds {token: tensor}, 1-D when n == 1), ``sdxl``
    (clip_l/clip_g .safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = vectors.get("*")
    if fmt == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(t.clone())},
                    "name": path.stem, "step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, path)
    elif fmt == "old_pt":
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(t.clone())})
        torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    elif fmt == "emb_params":
        save_file({"emb_params": t.contiguous()}, str(path))
    elif fmt in ("diffusers_bin", "diffusers_st"):
        value = t[0].clone() if t.shape[0] == 1 else t.clone()
        if fmt == "diffusers_bin":
            torch.save({"<my-token>": value}, path)
        else:
            save_file({"<my-token>": value.contiguous()}, str(path))
    elif fmt == "sdxl":
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(path))
    else:
        raise ValueError(fmt)
    return path


def text_widths(family: str, size: str) -> dict[str, int]:
    """The embedding keys and widths a preset's text encoders take (SDXL: clip_l and clip_g; else one)."""
    if family in SDXL_FAMILIES:
        _, _, text_l, text_g = sdxl_preset(family, size)
        return {**({"clip_l": text_l.hidden_size} if text_l is not None else {}), "clip_g": text_g.hidden_size}
    return {"*": preset(family, size)[2].hidden_size}


def make_embedding(out: str | Path, family: str = "sd1", size: str = "tiny", fmt: str | None = None,
                   vectors: int = 2, seed: int = 0) -> Path:  # fmt: skip
    """An embedding of `vectors` rows for a preset's text encoder(s): A1111's .pt by default, SDXL's clip_l/clip_g
    .safetensors for the SDXL families."""
    widths = text_widths(family, size)
    fmt = fmt or ("sdxl" if "clip_g" in widths else "emb_params" if str(out).endswith(".safetensors") else "a1111_pt")
    if (fmt == "sdxl") != ("clip_g" in widths):
        raise ValueError(f"format {fmt} does not fit the {family} text encoders")
    rows = {key: random_vectors(vectors, width, seed + n) for n, (key, width) in enumerate(widths.items())}
    return write_embedding(Path(out), fmt, rows)


# --- LoRA (kohya's format) ---------------------------------------------------------------------------------------

# kohya's default LoRA targets: the linear layers of the UNet's transformer blocks (attention, feed-forward,
# proj_in / proj_out) and of the text encoders' attention and MLP (sd-scripts networks/lora.py
# UNET_TARGET_REPLACE_MODULE = Transformer2DModel, TEXT_ENCODER_TARGET_REPLACE_MODULE = CLIPAttention, CLIPMLP)
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sdxl-refiner": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                  "sdxl": "stable-diffusion-xl-v1-base", "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}
DEFAULT_TAGS = {"mychar": 24, "1girl": 20, "smile": 7}


def _unet_config(family: str, size: str):
    return sdxl_preset(family, size)[0] if family in SDXL_FAMILIES else preset(family, size)[0]


def _text_configs(family: str, size: str) -> list:
    if family in SDXL_FAMILIES:
        return [c for c in sdxl_preset(family, size)[2:] if c is not None]
    return [preset(family, size)[2]]


def lora_targets(family: str, size: str) -> dict[str, tuple[int, ...]]:
    """kohya name -> the adapted weight's shape: UNet modules under their diffusers path (kohya trains on the
    diffusers UNet), text modules under transformers' CLIPTextModel path (lora_te_, SDXL lora_te1_ / lora_te2_)."""
    cfg = _unet_config(family, size)
    to_diffusers = {ldm: d for d, ldm in unet_prefix_pairs(len(cfg.channel_mult), cfg.num_res_blocks,
                                                           cfg.attention_levels)}  # fmt: skip
    out = {}
    with torch.device("meta"):
        unet = UNetModel(cfg)
        for name, module in unet.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (
                    "transformer_blocks" in name or name.endswith(("proj_in", "proj_out"))):
                path = rename(name + ".weight", to_diffusers).removesuffix(".weight")
                out["lora_unet_" + path.replace(".", "_")] = tuple(module.weight.shape)
        texts = _text_configs(family, size)
        for n, text_cfg in enumerate(texts):
            prefix = "lora_te_" if len(texts) == 1 else f"lora_te{n + 1}_"
            for name, module in TextEncoder(text_cfg).transformer.named_modules():
                if isinstance(module, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
                    out[prefix + "text_model_" + name.replace(".", "_")] = tuple(module.weight.shape)
    return out


def lora_state(family: str, size: str, rank: int = 4, alpha: float | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """lora_down (rank, in[, 1, 1]), lora_up (out, rank[, 1, 1]) and alpha per target; both factors random (kohya
    starts lora_up at zero, which would make the LoRA a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(lora_targets(family, size).items()):
        kernel = shape[2:]
        out[f"{key}.lora_down.weight"] = _random("w", (rank, shape[1], *kernel), gen).to(dtype)
        out[f"{key}.lora_up.weight"] = (_random("w", (shape[0], rank, *kernel), gen) * 0.5).to(dtype)
        out[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank / 2), dtype=dtype)
    return out


def lora_metadata(family: str, name: str, rank: int, alpha: float, tags: dict[str, int]) -> dict[str, str]:
    """The training metadata kohya's sd-scripts write (ss_*), and the modelspec keys of its newer versions."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": BASE_MODEL_VERSION[family], "ss_v2": str(family == "sd2"),
            "ss_output_name": name, "ss_sd_model_name": "model.safetensors", "ss_resolution": "(512, 512)",
            "ss_num_train_images": str(sum(tags.values())), "ss_num_epochs": "10", "ss_epoch": "10",
            "ss_learning_rate": "0.0001", "ss_clip_skip": "1", "ss_training_comment": f"trigger: {name}",
            "ss_tag_frequency": json.dumps({f"10_{name}": tags}),
            "modelspec.architecture": f"{MODELSPEC_ARCH[family]}/lora", "modelspec.title": name}  # fmt: skip


def make_lora(out: str | Path, family: str = "sd1", size: str = "tiny", rank: int = 4, seed: int = 0,
              dtype: torch.dtype = torch.float32, tags: dict[str, int] | None = None,
              metadata: bool = True) -> Path:  # fmt: skip
    """A kohya LoRA for a preset's UNet and text encoder(s), with kohya's training metadata unless `metadata` is
    False (A1111 then knows the family from nothing but the shapes)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    alpha = rank / 2
    meta = lora_metadata(family, out.stem, rank, alpha, tags or DEFAULT_TAGS) if metadata else {}
    save_file(lora_state(family, size, rank, alpha, seed, dtype), str(out), metadata=meta)
    return out


# --- TAESD (madebyollin's files) and VAE-only files ------------------------------------------------------------

TAESD_NAMES = {4: "taesd", 16: "taesd3"}  # the 16-channel one: taesd3 (SD3); FLUX's is taef1, SDXL's taesdxl


def taesd_states(latent_channels: int = 4, width: int = 16, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> dict[str, dict]:  # fmt: skip
    """{"encoder": ..., "decoder": ...} under madebyollin's keys (our modules' attribute paths are his)."""
    from sdcli.models.taesd import TinyDecoder, TinyEncoder

    with torch.device("meta"):
        parts = {"encoder": TinyEncoder(latent_channels, width), "decoder": TinyDecoder(latent_channels, width)}
    return {part: _state({"": module}, seed + n, dtype) for n, (part, module) in enumerate(parts.items())}


def make_taesd(folder: str | Path, name: str = "taesd", latent_channels: int = 4, width: int = 16, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> dict[str, Path]:  # fmt: skip
    """NAME_encoder.safetensors and NAME_decoder.safetensors in `folder` (the name tells sdcli which latent space:
    taesd, taesdxl, taesd3, taef1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, state in taesd_states(latent_channels, width, seed, dtype).items():
        paths[part] = folder / f"{name}_{part}.safetensors"
        save_file(state, str(paths[part]))
    return paths


def vae_config(family: str, size: str) -> VAEConfig:
    if family in ("sd3", "flux", "flux-schnell"):
        return TINY_VAE16 if size == "tiny" else VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False)
    return (sdxl_preset(family, size) if family in SDXL_FAMILIES else preset(family, size))[1]


def make_vae(out: str | Path, family: str = "sd1", size: str = "tiny", seed: int = 0,
             dtype: torch.dtype = torch.float32) -> Path:  # fmt: skip
    """A standalone VAE as vae-ft-mse-840000 / sdxl_vae / ae.safetensors: LDM names without first_stage_model."""
    with torch.device("meta"):
        shapes = _meta_shapes(AutoencoderKL(vae_config(family, size)), "")
    gen = torch.Generator().manual_seed(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: _random(k, shapes[k], gen).to(dtype) for k in sorted(shapes)}, str(out), metadata={"format": "pt"})
    return out


__all__ = ["EMBEDDING_FORMATS", "TINY_VAE", "make_embedding", "make_lora", "make_taesd", "make_vae", "random_vectors",
           "write_embedding"]
