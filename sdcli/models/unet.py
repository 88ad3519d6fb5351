"""The LDM (CompVis) UNet of Stable Diffusion 1.x / 2.x and SDXL (base, refiner) in plain PyTorch.

Module attribute paths here ARE the checkpoint format: a parameter's name in this module equals its key in a
single-file checkpoint after the prefix ``model.diffusion_model.`` (``input_blocks.1.1.transformer_blocks.0.
attn2.to_k.weight``, ``output_blocks.2.1.conv.weight``, ...), so loading is a prefix split and a strict load.
Upstream definition: https://github.com/CompVis/stable-diffusion/blob/main/ldm/modules/diffusionmodules/openaimodel.py
and ldm/modules/attention.py; SDXL: https://github.com/Stability-AI/generative-models sgm/modules/
diffusionmodules/openaimodel.py (per-level transformer depth, ``label_emb`` for the size/crop vector ``y``).
Dropout layers of the original are kept as ``nn.Identity`` so indices line up.
Latent sides need not be powers of two: each upsampler resizes to its skip connection's size (diffusers'
``forward_upsample_size``), so a 768x432 image (latent 96x54) runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.models import cpu_attention, fused_linear
from sdcli.models.invariant import GroupNorm, PointwiseConv, SiLU, gelu
from sdcli.runtime.errors import BadInputError
from sdcli.models.layout import run_layout, same_layout
from sdcli.models.packed_conv import PackedConv2d

NORM_GROUPS = 32  # GroupNorm32 in LDM: every norm of the UNet uses 32 groups


@dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of an LDM UNet; SD1.5 defaults. ``loading/checkpoint.py`` infers them from tensor shapes."""

    in_channels: int = 4  # 9 for inpainting (latent + mask + masked-image latent)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # per level of channel_mult
    transformer_depth: int | tuple[int, ...] = 1  # blocks per transformer: one for all, or per level (SDXL)
    middle_depth: int | None = None  # middle transformer; None: the same as an int transformer_depth
    context_dim: int = 768
    num_heads: int | None = 8  # SD1: fixed head count ...
    head_dim: int | None = None  # ... SD2/SDXL: fixed 64 channels per head
    use_linear_in_transformer: bool = False  # SD2/SDXL: Linear proj_in/proj_out instead of 1x1 conv
    adm_in_channels: int | None = None  # SDXL: width of the vector y fed to label_emb (2816 base, 2560 refiner)

    def __post_init__(self) -> None:
        if isinstance(self.transformer_depth, tuple):
            if len(self.transformer_depth) != len(self.channel_mult) or self.middle_depth is None:
                raise ValueError("a per-level transformer_depth needs one entry per level and a middle_depth")

    def depth_at(self, level: int) -> int:
        """Transformer blocks in each attention block of `level`."""
        d = self.transformer_depth
        return d[level] if isinstance(d, tuple) else d

    @property
    def mid_depth(self) -> int:
        if self.middle_depth is not None:
            return self.middle_depth
        assert isinstance(self.transformer_depth, int)
        return self.transformer_depth

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
    q, k, v = (t.reshape(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d) views
    if cpu_attention.applies(q, k):
        out = cpu_attention.blocked(q, k, v)  # (B, H, N, d); it copies the heads into its own layout
    else:
        # the CPU flash kernel runs its small-K (d = 40..64) GEMMs ~20% faster on packed heads than on strided
        # views, and the three copies cost ~1% of the kernel
        out = F.scaled_dot_product_attention(*(t.contiguous() for t in (q, k, v)))
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
    """openaimodel.py ``ResBlock`` (no up/down sampling inside, as SD uses it). Norms, SiLUs and the 1x1 skip are
    the thread-count invariant ones of invariant.py; the SiLUs after a norm run in place on its fresh output."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(NORM_GROUPS, channels), SiLU(inplace=True), PackedConv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(SiLU(), nn.Linear(emb_dim, out_channels))  # emb is shared: not in place
        self.out_layers = nn.Sequential(
            GroupNorm(NORM_GROUPS, out_channels),
            SiLU(inplace=True),
            nn.Identity(),  # Dropout in the original
            PackedConv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else PointwiseConv(channels, out_channels)

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

    def forward(self, x: Tensor, context: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        """The attention's output, plus `residual` when given (the add fused into the projection on a bf16 CPU)."""
        ctx = x if context is None else context  # (B, T, D_ctx)
        out = attention(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads)  # (B, N, inner)
        return fused_linear.linear_add(out, self.to_out[0], residual)


class GEGLU(nn.Module):
    """attention.py ``GEGLU``: one projection to value and gate, value * gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        if fused_linear.fusable(x, self.proj):  # a bf16 CPU: the GELU and the product inside the GEMMs
            return fused_linear.geglu(x, self.proj)
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, inner) strided views of one projection
        # the gate made dense once and kept so: gelu on it in place, then the product written into it (a strided
        # gate would be copied for gelu, copied back, and multiplied in torch's slower strided loop); the same bytes
        gate = gelu(gate.contiguous(), inplace=True)
        return value * gate if gate.requires_grad else torch.mul(value, gate, out=gate)


class FeedForward(nn.Module):
    """attention.py ``FeedForward`` with GEGLU (mult 4); ``net.1`` is the Dropout of the original."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The feed-forward's output, plus `residual` when given (fused as in CrossAttention)."""
        return fused_linear.linear_add(self.net[0](x), self.net[2], residual)  # net[1] is the Dropout's Identity


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

    token_merging = None  # models/tome.TokenMerging shared with the UNet when --tome-ratio is set

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        plan = self.token_merging.plan(x) if self.token_merging is not None else None
        if plan is None:
            x = self.attn1(self.norm1(x), residual=x)  # x + attn1(...), (B, HW, C)
        else:  # self-attention over merged tokens, its output copied back to each merged token (models/tome.py)
            merge, unmerge = plan
            x = x + unmerge(self.attn1(merge(self.norm1(x))))
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class SpatialTransformer(nn.Module):
    """attention.py ``SpatialTransformer``; SD2 uses Linear proj_in/out applied after flattening."""

    def __init__(self, channels: int, cfg: UNetConfig, depth: int):
        super().__init__()
        heads, head_dim = cfg.heads_for(channels)
        inner = heads * head_dim
        self.linear = cfg.use_linear_in_transformer
        self.norm = GroupNorm(NORM_GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if self.linear else PointwiseConv(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, cfg.context_dim, heads, head_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if self.linear else PointwiseConv(inner, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)  # (B, inner, H, W)
        # (B, HW, C or inner), contiguous: a transposed view would make each LayerNorm copy it and each residual
        # add run strided (3 copies per block); from a channels_last map this is free
        y = y.flatten(2).transpose(1, 2).contiguous()
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)  # (B, HW, inner)
        if self.linear:
            y = self.proj_out(y)
        y = same_layout(y.transpose(1, 2).reshape(b, -1, h, w), x)  # (B, C or inner, H, W)
        if not self.linear:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    """openaimodel.py ``Downsample`` (conv, stride 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = PackedConv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """openaimodel.py ``Upsample`` (nearest x2, then conv).

    `size` (H, W) replaces the x2 when an odd side was rounded up on the way down (9 -> 5 -> 9, not 10); for
    an exact x2 size nearest interpolation picks the same pixels either way (diffusers' Upsample2D does this).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = PackedConv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """openaimodel.py ``TimestepEmbedSequential``: passes emb to ResBlocks and context to transformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """`size`: the (H, W) an Upsample in this block must produce (the next skip connection's)."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def _level_block(cfg: UNetConfig, ch_in: int, ch_out: int, level: int) -> TimestepEmbedSequential:
    layers: list[nn.Module] = [ResBlock(ch_in, cfg.time_embed_dim, ch_out)]
    if cfg.attention_levels[level]:
        layers.append(SpatialTransformer(ch_out, cfg, cfg.depth_at(level)))
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
    """openaimodel.py ``UNetModel`` as SD 1.x/2.x and SDXL configure it (spatial transformers; SDXL adds
    ``label_emb``, sgm's ``num_classes="sequential"``: Linear-SiLU-Linear on the vector y)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), SiLU(), nn.Linear(ted, ted))
            )
        self.input_blocks, skips = _input_blocks(cfg)
        ch = cfg.channel_mult[-1] * mc
        self.middle_block = TimestepEmbedSequential(
            [ResBlock(ch, ted, ch), SpatialTransformer(ch, cfg, cfg.mid_depth), ResBlock(ch, ted, ch)]
        )
        self.output_blocks = _output_blocks(cfg, skips)
        self.out = nn.Sequential(
            GroupNorm(NORM_GROUPS, mc), SiLU(inplace=True), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                control: tuple[list[Tensor], Tensor] | None = None) -> Tensor:  # fmt: skip
        """x (B, C_in, H, W), timesteps (B,) float, context (B, T, D), SDXL's y (B, adm_in) -> (B, C_out, H, W).

        H and W may be any size: an upsampler meets its skip connection at that skip's size.
        control: ControlNet residuals (one per skip connection, in push order; one for the middle output),
        added as cldm's ControlledUnetModel and diffusers' *_additional_residuals do (models/controlnet.py)."""
        dtype = self.out[0].weight.dtype  # a norm: never quantized (a GGUF's time_embed may hold GGML blocks)
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))  # (B, 4mc)
        if (y is None) != (self.config.adm_in_channels is None):
            raise ValueError("an SDXL UNet needs the vector y, and only an SDXL UNet takes one")
        if y is not None:
            emb = emb + self.label_emb(y.to(dtype))  # size/crop (and pooled text) conditioning
        context = context.to(dtype)
        h = run_layout(self, x.to(dtype))  # channels_last on a bf16 CPU (layout.py)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)  # (B, C_max, ~H/2^k, ~W/2^k)
        if control is not None:
            down, mid = control
            skips = [s + r.to(dtype) for s, r in zip(skips, down, strict=True)]
            h = h + mid.to(dtype)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h).contiguous()  # (B, C_out, H, W)


# --- SDXL's vector y ------------------------------------------------------------------------------

def sdxl_vector(pooled: Tensor, values: Sequence[float] | Tensor, adm_in_channels: int) -> Tensor:
    """SDXL's y: pooled text (B, P), then a [cos | sin] embedding of each value, as sgm's
    ConcatTimestepEmbedderND and diffusers' add_time_proj make it (256 wide in the real models).

    values: base (orig h, orig w, crop top, crop left, target h, target w); refiner (orig h, orig w, crop top,
    crop left, aesthetic score); a sequence for the whole batch or a (B, n) tensor. The embedding width is
    what is left of adm_in_channels after the pooled vector, split evenly between the values.
    """
    b, pooled_dim = pooled.shape
    ids = torch.as_tensor(values, dtype=torch.float32, device=pooled.device)
    ids = ids.expand(b, -1) if ids.ndim == 1 else ids  # (B, n)
    width, rest = divmod(adm_in_channels - pooled_dim, ids.shape[1])
    if rest or width <= 0 or width % 2:
        raise ValueError(f"y of {adm_in_channels} does not split into pooled {pooled_dim} + {ids.shape[1]} embeddings")
    emb = timestep_embedding(ids.flatten(), width).reshape(b, -1)  # (B, n * width), value by value
    return torch.cat([pooled, emb.to(pooled.dtype)], dim=-1)  # pooled first, as diffusers' get_aug_embed


def base_size_values(original_hw: Sequence[int], crop_top_left: Sequence[int],
                     target_hw: Sequence[int]) -> tuple[float, ...]:  # fmt: skip
    """The six numbers the base model conditions on, in sgm's (height, width) and (top, left) order."""
    return (*map(float, original_hw), *map(float, crop_top_left), *map(float, target_hw))


def refiner_size_values(original_hw: Sequence[int], crop_top_left: Sequence[int],
                        aesthetic: float) -> tuple[float, ...]:  # fmt: skip
    """The refiner's five: the aesthetic score replaces the target size."""
    return (*map(float, original_hw), *map(float, crop_top_left), float(aesthetic))


# --- hyperparameters from tensor shapes -----------------------------------------------------------

def _depth(shapes: Mapping[str, tuple[int, ...]], block: str) -> int:
    """Transformer blocks under `block` (``...input_blocks.4.1.``); 0 when it has no transformer."""
    pattern = re.compile(re.escape(block) + r"transformer_blocks\.(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _level_depths(shapes: Mapping[str, tuple[int, ...]], p: str, levels: int, res: int) -> list[int]:
    """Each level's depth, checked equal over its input and output blocks (SSD-1B-style prunes differ: refused)."""
    depths = []
    for level in range(levels):
        blocks = [f"{p}input_blocks.{1 + level * (res + 1) + i}.1." for i in range(res)]
        blocks += [f"{p}output_blocks.{(levels - 1 - level) * (res + 1) + i}.1." for i in range(res + 1)]
        found = {_depth(shapes, b) for b in blocks}
        if len(found) != 1:
            raise BadInputError(f"UNet level {level} has transformers of different depths {sorted(found)} "
                                "(a pruned SDXL such as SSD-1B?): not supported")  # fmt: skip
        depths.append(found.pop())
    return depths


def _need(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the UNet: tensor {key!r} is missing")
    return tuple(shapes[key])


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]], prefix: str = "", *, num_heads: int | None = None,
                      head_dim: int | None = 64) -> UNetConfig:  # fmt: skip
    """Every UNet hyperparameter of an LDM-named state dict (SD1, SD2, SDXL base/refiner/inpaint) from shapes.

    Only the head split is invisible in shapes: pass the family's rule (SD1 num_heads=8; SD2 and SDXL
    head_dim=64). `prefix` is ``model.diffusion_model.`` for a single file, "" for bare UNet names.
    """
    p, keys = prefix, list(shapes)
    conv_in = _need(shapes, p + "input_blocks.0.0.weight")
    mc = conv_in[0]
    down = re.compile(re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight$")
    downs = sorted(int(m.group(1)) for k in keys if (m := down.match(k)))
    block = re.compile(re.escape(p) + r"input_blocks\.(\d+)\.")
    n_in = max(int(m.group(1)) for k in keys if (m := block.match(k))) + 1
    res = downs[0] - 1 if downs else n_in - 1
    levels = len(downs) + 1
    first = [1 + i * (res + 1) for i in range(levels)]
    mult = tuple(_need(shapes, f"{p}input_blocks.{n}.0.out_layers.3.weight")[0] // mc for n in first)
    depths = _level_depths(shapes, p, levels, res)
    mid = p + "middle_block.1."
    if mid + "proj_in.weight" not in shapes:
        raise BadInputError("the UNet has no middle transformer (a pruned SDXL such as Segmind Vega?): not supported")
    attn_depths = {d for d in depths if d} | {_depth(shapes, mid)}
    uniform = len(attn_depths) == 1
    adm = shapes.get(p + "label_emb.0.0.weight")
    cfg = UNetConfig(
        in_channels=conv_in[1], out_channels=_need(shapes, p + "out.2.weight")[0], model_channels=mc,
        channel_mult=mult, num_res_blocks=res, attention_levels=tuple(d > 0 for d in depths),
        transformer_depth=attn_depths.pop() if uniform else tuple(depths),
        middle_depth=None if uniform else _depth(shapes, mid),
        context_dim=_need(shapes, mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        num_heads=num_heads, head_dim=head_dim,
        use_linear_in_transformer=len(_need(shapes, mid + "proj_in.weight")) == 2,
        adm_in_channels=None if adm is None else adm[1],
    )  # fmt: skip
    for m, a in zip((*mult, mult[-1]), (*cfg.attention_levels, True)):
        heads, width = cfg.heads_for(m * mc)
        if a and (heads * width != m * mc or heads == 0):
            raise BadInputError(f"UNet transformer width {m * mc} does not split into heads of {width}")
    return cfg
