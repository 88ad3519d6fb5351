"""Random TAESD files for tests, written from a diffusers AutoencoderTiny (the oracle) in both layouts.

``write_taesd_files(folder, seed, width, latent_channels)`` returns the oracle and the paths of:
``diffusers`` (AutoencoderTiny's own state dict, ``encoder.layers.N`` / ``decoder.layers.N``), ``encoder`` and
``decoder`` (madebyollin's split files: decoder index = diffusers index + 1, the inverse of diffusers'
``convert_tiny_autoencoder_to_diffusers.py``), and ``.pth`` twins of the split files (plain torch.save).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_autoencoder(seed: int = 0, width: int = 16, latent_channels: int = 4):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tae = AutoencoderTiny(encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4,
                          latent_channels=latent_channels)
    with torch.no_grad():  # default init leaves biases tiny; make every tensor matter
        for p in tae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return tae.eval()


def original_layout(tae) -> tuple[dict, dict]:
    """(encoder state, decoder state) with madebyollin's key names."""
    enc, dec = {}, {}
    for key, t in tae.state_dict().items():
        part, _, index, rest = key.split(".", 3)
        if part == "encoder":
            enc[f"{index}.{rest}"] = t.clone().contiguous()
        else:
            dec[f"{int(index) + 1}.{rest}"] = t.clone().contiguous()
    return enc, dec


def write_taesd_files(folder: Path, seed: int = 0, width: int = 16, latent_channels: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    tae = tiny_autoencoder(seed, width, latent_channels)
    enc, dec = original_layout(tae)
    paths = {
        "diffusers": folder / "diffusion_pytorch_model.safetensors",
        "encoder": folder / "taesd_encoder.safetensors",
        "decoder": folder / "taesd_decoder.safetensors",
        "encoder_pth": folder / "taesd_encoder.pth",
        "decoder_pth": folder / "taesd_decoder.pth",
    }
    save_file({k: v.contiguous() for k, v in tae.state_dict().items()}, str(paths["diffusers"]))
    save_file(enc, str(paths["encoder"]))
    save_file(dec, str(paths["decoder"]))
    torch.save(enc, paths["encoder_pth"])
    torch.save(dec, paths["decoder_pth"])
    return tae, paths
