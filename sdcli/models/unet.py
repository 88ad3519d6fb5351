"""The LDM (CompVis) UNet of Stable Diffusion 1.x / 2.x in plain PyTorch.

Module attribute paths here ARE the checkpoint format: a parameter's name in this module equals its key in a
single-file checkpoint after the prefix ``model.diffusion_model.`` (``input_blocks.1.1.transformer_blocks.0.
attn2.to_k.weight``, ``output_blocks.2.1.conv.weight``, ...), so loading is a prefix split and a strict load.
Upstream definition: https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/openaimodel.py
and ldm/modules/attention.py. Dropout layers of the original are kept as ``nn.Identity`` so indices line up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_GROUPS = 32  # GroupNorm32 in LDM: every norm of the UNet uses 32 groups


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of an LDM UNet; SD1.5 defaults. ``checkpoint.py`` infers them from tensor shapes."""

    in_channels: int = 4  # 9 for inpainting (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # per level of channel_mult
    transformer_depth: int = 1
    context_dim: int = 768
    num_heads: int | None = 8  # SD1: fixed head count ...
    head_dim: int | None = None  # ... SD2: fixed 64 channels per head
    use_linear_in_transformer: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 conv

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of a transformer with `channels` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head attention on (B, N, heads*d) tensors; the one place to optimise later."""
    b, n, inner = q.shape
    d = inner // heads
    # (B, N, H*d) -> (B, H, N, d)
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
    return out.transpose(1, 2).reshape(b, n, inner)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, computed in float32.

    Upstream: openaimodel.py / util.py ``timestep_embedding`` (cos first, as in LDM).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """openaimodel.py ``ResBlock`` (no up/down sampling inside, as SD uses it)."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, out_channels),
            nn.SiLU(),
            nn.Identity(),  # Dropout in the original
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]  # time embedding added per channel
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """attention.py ``CrossAttention``: self-attention when context is None."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Identity())

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context  # (B, T, D_ctx)
        out = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads)  # (B, N, inner)
        return self.to_out(out)


class GEGLU(nn.Module):
    """attention.py ``GEGLU``: one projection to value and gate, value * gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """attention.py ``FeedForward`` with GEGLU (mult 4); ``net.1`` is the Dropout of the original."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attention.py ``BasicTransformerBlock``: self-attn, cross-attn on the text, feed-forward (pre-norm)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, HW, C)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """attention.py ``SpatialTransformer``; SD2 uses Linear proj_in/out applied after flattening."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        heads, head_dim = cfg.heads_for(channels)
        inner = heads * head_dim
        self.linear = cfg.use_linear_in_transformer
        self.norm = nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if self.linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, cfg.context_dim, heads, head_dim) for _ in range(cfg.transformer_depth)
        )
        self.proj_out = nn.Linear(inner, channels) if self.linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)  # (B, inner, H, W)
        y = y.flatten(2).transpose(1, 2)  # (B, HW, C or inner)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)  # (B, HW, inner)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)  # (B, C or inner, H, W)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    """openaimodel.py ``Downsample`` (conv, stride 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """openaimodel.py ``Upsample`` (nearest x2, then conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """openaimodel.py ``TimestepEmbedSequential``: passes emb to ResBlocks and context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _level_block(cfg: UNetConfig, ch_in: int, ch_out: int, level: int) -> TimestepEmbedSequential:
    layers: list[nn.Module] = [ResBlock(ch_in, cfg.time_embed_dim, ch_out)]
    if cfg.attention_levels[level]:
        layers.append(SpatialTransformer(ch_out, cfg))
    return TimestepEmbedSequential(layers)


def _input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """input_blocks and the channel count of every skip connection they leave behind."""
    mc = cfg.model_channels
    blocks = [TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])]
    skips, ch = [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            blocks.append(_level_block(cfg, ch, mult * mc, level))
            ch = mult * mc
            skips.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential([Downsample(ch)]))
            skips.append(ch)
    return nn.ModuleList(blocks), skips


def _output_blocks(cfg: UNetConfig, skips: list[int]) -> nn.ModuleList:
    mc = cfg.model_channels
    ch = cfg.channel_mult[-1] * mc
    blocks = []
    for level in reversed(range(len(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            block = _level_block(cfg, ch + skips.pop(), cfg.channel_mult[level] * mc, level)
            ch = cfg.channel_mult[level] * mc
            if level != 0 and i == cfg.num_res_blocks:
                block.append(Upsample(ch))
            blocks.append(block)
    return nn.ModuleList(blocks)


class UNetModel(nn.Module):
    """openaimodel.py ``UNetModel`` as SD 1.x/2.x configure it (spatial transformers, no class labels)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.input_blocks, skips = _input_blocks(cfg)
        ch = cfg.channel_mult[-1] * mc
        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, ted, ch), SpatialTransformer(ch, cfg), ResBlock(ch, ted, ch)]
        )
        self.output_blocks = _output_blocks(cfg, skips)
        self.out = nn.Sequential(
            nn.GroupNorm(NORM_GROUPS, mc), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """x (B, C_in, H, W), timesteps (B,) float, context (B, T, D) -> (B, C_out, H, W)."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))  # (B, 4mc)
        context = context.to(dtype)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_max, H/2^k, W/2^k)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)  # (B, C_out, H, W)
