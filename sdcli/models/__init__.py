"""The three networks of Stable Diffusion; attribute paths equal the LDM single-file checkpoint keys."""

from sdcli.models.text import TextConfig, TextEncoder
from sdcli.models.unet import UNetConfig, UNetModel, infer_unet_config, sdxl_vector
from sdcli.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "TextConfig", "TextEncoder", "UNetConfig", "UNetModel", "VAEConfig", "infer_unet_config",
           "sdxl_vector"]  # fmt: skip
