"""The networks (UNet, VAE, CLIP text encoders, ControlNet, TAESD; the DiTs and T5 next), in plain PyTorch;
attribute paths equal the original single-file checkpoint keys, so a file loads with no key mapping.

May import runtime and formats only. Must never import families or anything above: a network is built from a
config, and which family asks for it is not its business.
"""

from sdcli.models.text import TextConfig, TextEncoder
from sdcli.models.unet import UNetConfig, UNetModel, infer_unet_config, sdxl_vector
from sdcli.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "TextConfig", "TextEncoder", "UNetConfig", "UNetModel", "VAEConfig", "infer_unet_config",
           "sdxl_vector"]  # fmt: skip
