"""The MMDiT of Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo) in plain PyTorch.

Attribute paths ARE Stability's single-file keys after ``model.diffusion_model.``: ``x_embedder.proj``, ``pos_embed``
(a buffer stored in the file), ``t_embedder.mlp.0/2``, ``y_embedder.mlp.0/2``, ``context_embedder``,
``joint_blocks.N.{x_block,context_block}.{attn.qkv,attn.proj,attn.ln_q,attn.ln_k,adaLN_modulation.1,mlp.fc1,
mlp.fc2}``, ``joint_blocks.N.x_block.attn2.*`` (SD3.5 Medium's dual-attention blocks), ``final_layer.linear``,
``final_layer.adaLN_modulation.1``.
Upstream definition: Stability-AI/sd3.5 ``mmditx.py`` (MMDiTX, JointBlock, DismantledBlock, SelfAttention,
FinalLayer, block_mixing); ComfyUI ``comfy/ldm/modules/diffusionmodules/mmdit.py`` is the same network.

Numerics follow diffusers' SD3Transformer2DModel (the parity oracle), which differs from mmditx.py only in the
order of floating-point operations: the joint attention concatenates [image, text] tokens (mmditx: [text, image];
the same function, other rounding), and the q/k RMS norm takes its mean of squares in fp32.
Modulations are stored as (shift, scale, gate, ...) chunks; the last context block (``pre_only``: attention
inputs only, no proj/mlp) and the final layer store (shift, scale), where diffusers' modules use (scale, shift).

Forward: (x (B, C, H, W) latent, t (B,) = sigma * 1000, context (B, L, 4096), y (B, 2048)) -> (B, C, H, W).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.models import cpu_attention, fused_linear
from sdcli.models.invariant import SiLU, gelu
from sdcli.runtime.errors import BadInputError, UnsupportedModelError

PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class MMDiTConfig:
    """MMDiT hyperparameters; defaults are SD3 Medium (2B). Read them from a header with `config_from_shapes`."""

    depth: int = 24  # joint blocks
    hidden_size: int = 1536  # 64 * depth in every Stability release
    num_heads: int = 24  # hidden / 64
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int = 192  # the stored table covers max x max patches; each image crops its centre
    adm_in_channels: int = 2048  # pooled text vector y: CLIP-L pooled (768) + CLIP-G pooled (1280)
    context_dim: int = 4096  # T5-XXL width; CLIP features are zero-padded up to it
    mlp_hidden: int = 6144  # 4 * hidden
    frequency_embedding_size: int = 256
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 Medium: blocks 0..12 have a second image self-attention
    qk_norm: bool = False  # SD3.5: RMS norm on q and k per head (ln_q/ln_k)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str = PREFIX, head_dim: int = 64) -> MMDiTConfig:
    """MMDiTConfig from a header's {name: shape} (no tensor data). Heads are hidden / `head_dim` (64 in every
    Stability release: mmditx.py sets hidden = 64 * depth, heads = depth); pass another head_dim only for test
    models. Refuses the options of mmditx.py that no released SD3 uses (registers, SwiGLU, LayerNorm q/k norm)."""

    def need(name: str) -> tuple[int, ...]:
        if prefix + name not in shapes:
            raise BadInputError(f"cannot read the SD3 MMDiT: tensor {prefix + name!r} is missing")
        return tuple(shapes[prefix + name])

    names = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    unsupported = [n for n in names if n == "register" or ".mlp.w1." in n or re.search(r"\.ln_[qk]\.bias$", n)]
    if unsupported:
        raise UnsupportedModelError(f"this MMDiT uses options no SD3 release has ({unsupported[0]})")
    hidden, in_channels, patch, _ = need("x_embedder.proj.weight")
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"joint_blocks\.(\d+)\.", n))}
    max_size = math.isqrt(need("pos_embed")[1])
    if not blocks or hidden % head_dim or max_size**2 != need("pos_embed")[1]:
        raise BadInputError(f"cannot read the SD3 MMDiT: no joint_blocks, a width {hidden} that is not a multiple "
                            f"of {head_dim}, or a pos_embed that is not a square grid")  # fmt: skip
    dual_blocks = (re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", n) for n in names)
    dual = tuple(sorted({int(m.group(1)) for m in dual_blocks if m}))
    return MMDiTConfig(
        depth=max(blocks) + 1, hidden_size=hidden, num_heads=hidden // head_dim, patch_size=patch,
        in_channels=in_channels, out_channels=need("final_layer.linear.weight")[0] // (patch * patch),
        pos_embed_max_size=max_size, adm_in_channels=need("y_embedder.mlp.0.weight")[1],
        context_dim=need("context_embedder.weight")[1], mlp_hidden=need("joint_blocks.0.x_block.mlp.fc1.weight")[0],
        frequency_embedding_size=need("t_embedder.mlp.0.weight")[1], dual_attention_layers=dual,
        qk_norm=prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
    )  # fmt: skip


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """mmditx.py ``modulate``: x (B, T, D) * (1 + scale) + shift, per batch row."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm(x: Tensor) -> Tensor:
    """The blocks' norm1/norm2/norm_final: LayerNorm without affine weights, eps 1e-6 (no parameters to store)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """mmditx.py TimestepEmbedder.timestep_embedding: (B,) fractional timesteps -> (B, dim) [cos | sin], in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """mmditx.py RMSNorm (eps 1e-6, learned scale) for q and k per head; mean of squares in fp32 as diffusers does."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return h * self.weight


class Embedder(nn.Module):
    """mmditx.py TimestepEmbedder / VectorEmbedder body: ``mlp`` = Linear, SiLU, Linear (indices 0 and 2 stored)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class PatchEmbed(nn.Module):
    """mmditx.py PatchEmbed: a p x p stride-p conv, then (B, C, H, W) -> (B, H/p * W/p, D) tokens."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, T, D)


class SelfAttention(nn.Module):
    """mmditx.py SelfAttention: fused ``qkv`` (with bias), optional ``proj`` (absent when pre_only), optional
    per-head RMS norms ``ln_q``/``ln_k``. The attention itself runs jointly over both streams (JointBlock)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        if not pre_only:
            self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        if cfg.qk_norm:
            self.ln_q, self.ln_k = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)

    def pre_attention(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) -> q, k, v, each (B, heads, T, head_dim), q and k normed when the model has ln_q/ln_k."""
        b, t, d = x.shape
        q, k, v = (u.transpose(1, 2) for u in self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2))
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, heads, T, d) each -> (B, T, heads * d); softmax scale 1/sqrt(d), no mask."""
    b, h, t, d = q.shape
    return cpu_attention.scaled_dot_product(q, k, v).transpose(1, 2).reshape(b, t, h * d)


class Mlp(nn.Module):
    """timm Mlp as mmditx.py uses it: fc1, GELU (tanh approximation), fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        if fused_linear.fusable(x, self.fc1):  # a bf16 CPU: the GELU inside fc1's GEMM
            return self.fc2(fused_linear.linear_gelu(x, self.fc1, approximate="tanh"))
        # thread-count invariant GELU (invariant.py), in place on fc1's fresh output
        return self.fc2(gelu(self.fc1(x), inplace=True, approximate="tanh"))


class DismantledBlock(nn.Module):
    """mmditx.py DismantledBlock: one stream's half of a joint block, adaLN-modulated.

    Modulation chunks: (shift, scale, gate) for attention, (shift, scale, gate) for the MLP, and for dual
    attention (SD3.5 Medium x blocks) a third (shift, scale, gate) for ``attn2``; a pre_only block (the last
    context block) has just (shift, scale) and ends after computing its q/k/v."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.attn = SelfAttention(cfg, pre_only)
        if dual:
            self.attn2 = SelfAttention(cfg, pre_only=False)
        self.n_mods = 9 if dual else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(SiLU(), nn.Linear(cfg.hidden_size, self.n_mods * cfg.hidden_size))
        if not pre_only:
            self.mlp = Mlp(cfg.hidden_size, cfg.mlp_hidden)

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple, tuple | None, tuple[Tensor, ...]]:
        """x (B, T, D), c (B, D) -> (q, k, v), the attn2 (q, k, v) or None, the modulation chunks."""
        mods = self.adaLN_modulation(c).chunk(self.n_mods, dim=1)  # n_mods x (B, D)
        h = layer_norm(x)
        qkv = self.attn.pre_attention(modulate(h, mods[0], mods[1]))
        qkv2 = self.attn2.pre_attention(modulate(h, mods[6], mods[7])) if self.dual else None
        return qkv, qkv2, mods

    def post_attention(self, x: Tensor, attn: Tensor, attn2: Tensor | None, mods: tuple[Tensor, ...]) -> Tensor:
        """Gated residual of the attention output(s), then the gated, modulated MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[2:6]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)  # (B, T, D)
        if attn2 is not None:
            x = x + mods[8].unsqueeze(1) * self.attn2.proj(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """mmditx.py JointBlock + block_mixing: both streams' q/k/v attend jointly, then each stream goes on alone."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        ctx_qkv, _, ctx_mods = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mods = self.x_block.pre_attention(x, c)
        # [image, text] as diffusers' JointAttnProcessor2_0 concatenates (mmditx.py: [text, image]; same result
        # up to rounding, and the parity tests compare bits with diffusers).
        q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(x_qkv, ctx_qkv))  # (B, heads, T + L, d)
        joint = attention(q, k, v)  # (B, T + L, D)
        x_attn, ctx_attn = joint[:, : x.shape[1]], joint[:, x.shape[1] :]
        x_attn2 = attention(*x_qkv2) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, x_attn, x_attn2, x_mods)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, ctx_attn, None, ctx_mods), x


class FinalLayer(nn.Module):
    """mmditx.py FinalLayer: modulated LayerNorm with (shift, scale), then a linear to p*p*C per token."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm(x), shift, scale))  # (B, T, p*p*C)


class MMDiT(nn.Module):
    """mmditx.py MMDiTX as SD3/SD3.5 configure it: x (B, C, H, W), t (B,) = sigma * 1000, context (B, L, ctx),
    y (B, adm) -> the flow prediction (B, C, H, W). `skip_layers`: block indices to skip (SD3.5 skip-layer
    guidance's extra pass)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg)
        self.register_buffer("pos_embed", torch.zeros(1, cfg.pos_embed_max_size**2, d))
        self.t_embedder = Embedder(cfg.frequency_embedding_size, d)
        self.y_embedder = Embedder(cfg.adm_in_channels, d)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """mmditx.py cropped_pos_embed: the centre h x w patches of the stored max x max table, (1, h*w, D)."""
        m = self.config.pos_embed_max_size
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(1, m, m, -1)[:, top : top + h, left : left + w, :]
        return table.reshape(1, h * w, -1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor, skip_layers: tuple[int, ...] = ()) -> Tensor:
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        _, _, height, width = x.shape
        h, w = height // p, width // p
        if h * p != height or w * p != width or h > m or w > m:
            raise BadInputError(f"SD3 latent {height}x{width} must be a multiple of {p} and at most {m * p} a side")
        dtype = self.x_embedder.proj.bias.dtype  # a bias: never quantized (GGUF files may quantize the rest)
        tokens = (self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h, w)).contiguous()  # (B, T, D)
        c = self.t_embedder(timestep_embedding(t, self.config.frequency_embedding_size).to(dtype))  # (B, D)
        c = c + self.y_embedder(y.to(dtype))
        ctx = self.context_embedder(context.to(dtype))  # (B, L, D)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip_layers:
                ctx, tokens = block(ctx, tokens, c)
        out = self.final_layer(tokens, c)  # (B, T, p*p*C)
        return unpatchify(out, h, w, p)


def unpatchify(x: Tensor, h: int, w: int, p: int) -> Tensor:
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p); each token holds its patch as (row, column, channel)."""
    b = x.shape[0]
    x = x.reshape(b, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(b, -1, h * p, w * p)
