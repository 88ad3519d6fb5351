"""The LDM ``AutoencoderKL`` (the SD VAE) in plain PyTorch.

Module attribute paths here ARE the checkpoint format: a parameter's name equals its key in a single-file
checkpoint after the prefix ``first_stage_model.`` (``decoder.up.3.block.0.conv1.weight``, ``quant_conv.weight``),
and equals the keys of standalone VAE files such as vae-ft-mse-840000-ema-pruned.safetensors.
Upstream definition: https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/model.py
(Encoder, Decoder, ResnetBlock, AttnBlock) and ldm/models/autoencoder.py (AutoencoderKL).
The latent scale factor lives in VAEConfig, not in the modules: encode/decode work on UNSCALED latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.models import cpu_attention
from sdcli.models.invariant import GroupNorm, PointwiseConv, silu
from sdcli.models.layout import run_layout

# LDM's model.py ``Upsample`` (with conv) is the same block as the UNet's: nearest x2, then a 3x3 conv ``.conv``.
from sdcli.models.unet import Upsample


@dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of the LDM AutoencoderKL; SD1/SD2 defaults. Inferred from shapes by loading/checkpoint.py."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4  # latent channels
    embed_dim: int = 4  # channels around quant_conv / post_quant_conv
    scale_factor: float = 0.18215  # SD1/SD2; the pipeline multiplies latents by this before the UNet
    use_quant_conv: bool = True  # False for the 16-channel VAEs of SD3 and FLUX.1: no quant_conv/post_quant_conv

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


def normalize(channels: int) -> nn.GroupNorm:
    """model.py ``Normalize``: 32 groups, eps 1e-6 (thread-count invariant: invariant.py)."""
    return GroupNorm(32, channels, eps=1e-6)


def spatial_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Single-head attention over the pixels of (B, C, H, W) maps; the one place to optimise later."""
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (q, k, v))  # (B, 1, HW, C)
    out = cpu_attention.scaled_dot_product(q, k, v)  # (B, 1, HW, C)
    return out.transpose(2, 3).reshape(b, c, h, w)


class ResnetBlock(nn.Module):
    """model.py ``ResnetBlock`` without time embedding (temb_channels=0 in the VAE)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = PointwiseConv(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # SiLU and the residual add in place on fresh tensors (same values): at 512px+ each map of the last levels
        # is 67-134 MB in bf16, and one fewer alive at the peak is what a decode's working memory is made of.
        h = self.conv1(silu(self.norm1(x), inplace=True))  # (B, C_out, H, W)
        h = self.conv2(silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """model.py ``AttnBlock``: q/k/v/proj_out are 1x1 convs (as stored in the checkpoints)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = normalize(channels)
        self.q = PointwiseConv(channels, channels)
        self.k = PointwiseConv(channels, channels)
        self.v = PointwiseConv(channels, channels)
        self.proj_out = PointwiseConv(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)  # (B, C, H, W)
        return x + self.proj_out(spatial_attention(self.q(h), self.k(h), self.v(h)))


class Downsample(nn.Module):
    """model.py ``Downsample`` with conv: pad right/bottom by one, then a stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Mid(nn.Module):
    """The ``mid`` of Encoder/Decoder: block_1, attn_1, block_2."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[nn.Module], resample_name: str | None, resample: nn.Module | None) -> nn.Module:
    """One ``down.i`` / ``up.i`` entry: ``block`` list plus optional ``downsample``/``upsample``."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    if resample_name is not None:
        setattr(level, resample_name, resample)
    return level


class Encoder(nn.Module):
    """model.py ``Encoder`` (double_z: outputs mean and logvar channels)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        mults = (1, *cfg.ch_mult)
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            ch_in, ch_out = cfg.ch * mults[i], cfg.ch * mult
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out) for j in range(cfg.num_res_blocks)]
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_level(blocks, None if last else "downsample", None if last else Downsample(ch_out)))
        ch = cfg.ch * cfg.ch_mult[-1]
        self.mid = Mid(ch)
        self.norm_out = normalize(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)  # (B, ch*mult[-1], H/f, W/f)
        return self.conv_out(silu(self.norm_out(h), inplace=True))  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    """model.py ``Decoder``; ``up`` is indexed by resolution level (up.0 is the full-resolution level)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            ch_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(ch if j == 0 else ch_out, ch_out) for j in range(cfg.num_res_blocks + 1)]
            ch = ch_out
            levels.insert(0, _level(blocks, "upsample" if i else None, Upsample(ch) if i else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch*mult[-1], h, w)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(silu(self.norm_out(h), inplace=True))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    """autoencoder.py ``AutoencoderKL``: encoder + quant_conv, post_quant_conv + decoder (the 1x1 quant convs
    absent in the 16-channel VAEs of SD3 and FLUX.1: sgm's ``use_quant_conv=False``)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = PointwiseConv(2 * cfg.z_channels, 2 * cfg.embed_dim)
            self.post_quant_conv = PointwiseConv(cfg.embed_dim, cfg.z_channels)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x in [-1, 1] (B, 3, H, W) -> (mean, logvar), each (B, z, H/f, W/f), unscaled."""
        x = run_layout(self, x.to(self.encoder.conv_in.weight.dtype))  # channels_last on a bf16 CPU (layout.py)
        moments = self.encoder(x)  # (B, 2z, H/f, W/f)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.contiguous().chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # the clamp of DiagonalGaussianDistribution

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent (B, z, h, w) -> image in about [-1, 1] (B, 3, h*f, w*f)."""
        z = run_layout(self, z.to(self.decoder.conv_in.weight.dtype))  # channels_last on a bf16 CPU (layout.py)
        if self.config.use_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).contiguous()
