"""ControlNet (SD 1.x / 2.x / SDXL) in plain PyTorch, with the original (lllyasviel ``cldm.py``) module tree.

Module attribute paths ARE the original file format after its ``control_model.`` prefix (SD2.1 files by
thibaud carry none): ``input_blocks`` / ``middle_block`` / ``time_embed`` / SDXL ``label_emb`` are the UNet
encoder (built with the UNet's own blocks), plus ``input_hint_block`` (the hint image to latent size, x8 down),
``zero_convs.N.0`` (one 1x1 conv per encoder block) and ``middle_block_out.0``.
Upstream: https://github.com/lllyasviel/ControlNet/blob/main/cldm/cldm.py (``ControlNet``,
``ControlledUnetModel``); diffusers ``models/controlnets/controlnet.py`` (``ControlNetModel``).

How the UNet takes the result: ``UNetModel.forward(..., control=(down, mid))`` adds ``down[i]`` to the i-th
skip connection (in the order the input blocks push them) and ``mid`` to the middle block's output, exactly
diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual`` and cldm's
``ControlledUnetModel``. Several units: ``sum_residuals``. Weight and guess mode: ``scale_residuals``. Which
steps a unit runs: ``unit_active`` (diffusers' start/end rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sdcli.models.invariant import PointwiseConv, SiLU
from sdcli.models.unet import (
    ResBlock,
    SpatialTransformer,
    TimestepEmbedSequential,
    UNetConfig,
    _input_blocks,
    timestep_embedding,
)

Residuals = tuple[list[Tensor], Tensor]  # (one per UNet skip connection, shallow first; the middle one)

HINT_WIDTHS = (16, 32, 96, 256)  # input_hint_block channels in every released ControlNet (x8 down: 3 strides)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the encoder of a UNet with config `unet` (its decoder fields are unused), the hint block's
    widths, and shuffle's global average pooling of the residuals (diffusers ``global_pool_conditions``)."""

    unet: UNetConfig
    hint_channels: int = 3
    hint_widths: tuple[int, ...] = HINT_WIDTHS
    global_pool: bool = False

    def __post_init__(self) -> None:
        if len(self.hint_widths) != 4:
            raise ValueError("the hint block needs 4 widths (3 stride-2 convolutions: pixels to latent, x8)")


def hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """cldm's ``input_hint_block``: conv, then per width (conv, strided conv), then a conv to model_channels,
    SiLU between them, all 3x3. Indices 0, 2, ..., 14 hold the convolutions, as in the files."""
    w = cfg.hint_widths
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_channels, w[0], 3, padding=1), SiLU(inplace=True)]
    for a, b in zip(w, w[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), SiLU(inplace=True), nn.Conv2d(a, b, 3, padding=1, stride=2),
                   SiLU(inplace=True)]  # fmt: skip
    layers.append(nn.Conv2d(w[-1], cfg.unet.model_channels, 3, padding=1))  # a zero conv when trained from scratch
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """cldm.py ``ControlNet``: the UNet encoder whose every block output passes a 1x1 "zero" convolution."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        u = cfg.unet
        mc, ted = u.model_channels, u.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), SiLU(), nn.Linear(ted, ted))
        if u.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(u.adm_in_channels, ted), SiLU(), nn.Linear(ted, ted))
            )
        self.input_hint_block = hint_block(cfg)
        self.input_blocks, skips = _input_blocks(u)
        self.zero_convs = nn.ModuleList(nn.Sequential(PointwiseConv(c, c)) for c in skips)
        ch = u.channel_mult[-1] * mc
        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, ted, ch), SpatialTransformer(ch, u, u.mid_depth), ResBlock(ch, ted, ch)]
        )
        self.middle_block_out = nn.Sequential(PointwiseConv(ch, ch))

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor,
                y: Tensor | None = None) -> Residuals:  # fmt: skip
        """x (B, C, h, w) the UNet's latent input, hint (B, hint_ch, 8h, 8w) RGB in [0, 1], timesteps (B,),
        context (B, T, D), SDXL's y (B, adm) -> (down residuals, one per UNet skip; mid residual), unscaled."""
        u = self.config.unet
        if hint.shape[-2:] != (8 * x.shape[-2], 8 * x.shape[-1]):
            raise ValueError(f"the hint must be 8x the latent: {tuple(hint.shape[-2:])} for latent {tuple(x.shape[-2:])}")
        if (y is None) != (u.adm_in_channels is None):
            raise ValueError("an SDXL ControlNet needs the vector y, and only an SDXL ControlNet takes one")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, u.model_channels).to(dtype))  # (B, 4mc)
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype))  # (B, mc, h, w)
        h, down = x.to(dtype), []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided  # the hint joins once, after conv_in (cldm: `h += guided_hint; guided_hint = None`)
            down.append(zero_conv(h))
        mid = self.middle_block_out(self.middle_block(h, emb, context))
        if self.config.global_pool:  # shuffle models: diffusers' global_pool_conditions
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


# --- what a sampler does with residuals -------------------------------------------------------------------

def scale_residuals(res: Residuals, weight: float, guess_mode: bool = False, global_pool: bool = False) -> Residuals:
    """Residuals times the unit's weight (diffusers ``controlnet_conditioning_scale``). Guess mode scales the
    down residuals from 0.1 (shallow) up to 1.0 (mid) as ``torch.logspace(-1, 0, n + 1)``, like diffusers,
    except for global-pool (shuffle) models, which diffusers scales plainly even in guess mode."""
    down, mid = res
    if not guess_mode or global_pool:
        return [d * weight for d in down], mid * weight
    scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * weight  # float32, as diffusers
    return [d * s for d, s in zip(down, scales)], mid * scales[-1]


def sum_residuals(a: Residuals | None, b: Residuals) -> Residuals:
    """Several ControlNet units: their residuals add up (diffusers ``MultiControlNetModel``)."""
    if a is None:
        return b
    return [x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1]


def unit_active(step: int, steps: int, start: float, end: float) -> bool:
    """diffusers' start/end rule: step i of N runs the unit when ``i/N >= start`` and ``(i+1)/N <= end``.

    (A1111's sd-webui-controlnet instead stops when ``i/N > end``, one step more at the end: N=20, end=0.5
    runs 10 steps here and 11 there.)"""
    return not (step / steps < start or (step + 1) / steps > end)


def uncond_zeros(res: Residuals) -> Residuals:
    """Guess mode under CFG: the ControlNet ran on the conditional half only; the unconditional half of the
    batch gets zeros (diffusers concatenates ``zeros_like`` before the conditional residuals)."""
    down, mid = res
    return [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
