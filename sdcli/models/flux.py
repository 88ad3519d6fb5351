"""The FLUX.1 DiT (dev, schnell, Fill/Depth/Canny variants) in plain PyTorch.

Attribute paths here ARE Black Forest Labs' file keys (``double_blocks.3.img_attn.qkv.weight``,
``single_blocks.7.linear1.weight``, ``final_layer.adaLN_modulation.1.weight``, ...): a BFL ``flux1-*.safetensors``
loads with a strict load and no renaming; ComfyUI-style single files put ``model.diffusion_model.`` in front.
Upstream definition: https://github.com/black-forest-labs/flux src/flux/model.py, modules/layers.py, math.py
(ComfyUI comfy/ldm/flux/ is the same network). Attention is fused as in the files: one ``qkv`` matrix per stream,
and in the single-stream blocks one ``linear1`` for q, k, v and the MLP input.

The image enters as packed tokens: each 2x2 patch of the 16-channel latent becomes one 64-feature token (`pack`),
positions are 3-axis ids (0, row, col) for image tokens and zeros for text tokens (`image_ids`, `text_ids`), and
rotary embeddings over those ids are the only positional signal. The model is called with t = sigma in [0, 1]
and multiplies t (and the dev model's distilled guidance) by 1000 itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.models import cpu_attention, fused_linear
from sdcli.models.invariant import GELU, SiLU, gelu, silu
from sdcli.quant.layers import linear_pieces, linear_rows, row_pieces
from sdcli.runtime.errors import BadInputError, UnsupportedModelError, UsageError

REAL_AXES_DIM = (16, 56, 56)  # RoPE channels per id axis (time/index, row, col) of every released FLUX.1
TIME_FACTOR = 1000.0  # BFL timestep_embedding(t, 256, time_factor=1000): the model sees t * 1000
FREQ_DIM = 256  # width of the sinusoidal time / guidance embedding
EPS = 1e-6  # LayerNorm and q/k RMSNorm epsilon


@dataclass(frozen=True)
class FluxConfig:
    """Hyperparameters of a Flux DiT; FLUX.1-dev defaults (BFL `FluxParams`). `config_from_shapes` reads them."""

    in_channels: int = 64  # packed 2x2 x 16 latent; 384 for Fill (latent + masked image + 8x8 mask), 128 Depth/Canny
    out_channels: int = 64
    vec_in_dim: int = 768  # pooled CLIP-L
    context_in_dim: int = 4096  # T5-XXL hidden states
    hidden_size: int = 3072
    mlp_hidden_dim: int = 12288  # BFL mlp_ratio 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = REAL_AXES_DIM
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: distilled guidance embedding; schnell: False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise BadInputError(f"Flux width {self.hidden_size} does not split into {self.num_heads} heads")
        if sum(self.axes_dim) != self.head_dim or any(a % 2 for a in self.axes_dim):
            raise BadInputError(f"Flux RoPE axes {self.axes_dim} must be even and sum to the head width "
                                f"{self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per id axis for a head width. Shapes do not store it: 128 is every released FLUX.1,
    (16, 56, 56). Any other width (only test-sized models) scales that split: about 1/8 to the first axis,
    the rest shared equally by row and column, every part even (16 -> (4, 6, 6), 64 -> (8, 28, 28))."""
    if head_dim == 128:
        return REAL_AXES_DIM
    if head_dim % 2 or head_dim < 6:
        raise BadInputError(f"Flux head width {head_dim} cannot carry 3-axis rotary embeddings")
    side = (head_dim - max(2, head_dim // 8)) // 4 * 2
    return head_dim - 2 * side, side, side


def _need(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the Flux DiT: tensor {key!r} is missing")
    return tuple(shapes[key])


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str, blocks: str) -> int:
    pattern = re.compile(re.escape(prefix + blocks) + r"\.(\d+)\.")
    return max((int(m.group(1)) + 1 for k in shapes if (m := pattern.match(k))), default=0)


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "", *,
                       axes_dim: tuple[int, ...] | None = None) -> FluxConfig:  # fmt: skip
    """Every Flux hyperparameter from a BFL-named header (`prefix` "" for BFL files, ``model.diffusion_model.``
    for ComfyUI-style single files). The head count comes from the q/k norm length (= head width); the RoPE
    split is invisible in shapes: `axes_dim`, else `default_axes_dim`."""
    p = prefix
    if p + "img_in.weight" in shapes and p + "vector_in.in_layer.weight" not in shapes:
        raise UnsupportedModelError("a Flux-like DiT without vector_in (Chroma?) is not supported")
    hidden, in_ch = _need(shapes, p + "img_in.weight")
    head_dim = _need(shapes, p + "double_blocks.0.img_attn.norm.query_norm.scale")[0]
    depth, single = _count(shapes, p, "double_blocks"), _count(shapes, p, "single_blocks")
    if single == 0:
        raise BadInputError("cannot read the Flux DiT: it has no single_blocks")
    return FluxConfig(
        in_channels=in_ch, out_channels=_need(shapes, p + "final_layer.linear.weight")[0],
        vec_in_dim=_need(shapes, p + "vector_in.in_layer.weight")[1],
        context_in_dim=_need(shapes, p + "txt_in.weight")[1], hidden_size=hidden,
        mlp_hidden_dim=_need(shapes, p + "double_blocks.0.img_mlp.0.weight")[0], num_heads=hidden // head_dim,
        depth=depth, depth_single_blocks=single,
        axes_dim=tuple(axes_dim) if axes_dim is not None else default_axes_dim(head_dim),
        qkv_bias=p + "double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed=p + "guidance_in.in_layer.weight" in shapes,
    )  # fmt: skip


# ----------------------------------------------------------------------------- packing and position ids

def pack(latent: Tensor) -> Tensor:
    """(B, C, H, W) latent -> (B, H/2 * W/2, 4C) tokens, channel-first inside each 2x2 patch (feature index
    c*4 + dy*2 + dx), rows of patches in raster order: diffusers `_pack_latents`, BFL's
    ``rearrange("b c (h ph) (w pw) -> b (h w) (c ph pw)")``."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise UsageError(f"Flux latents need even sides (images a multiple of 16 px), got {h}x{w}")
    x = latent.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """(B, H/2 * W/2, 4C) tokens -> (B, C, H, W) latent; `height`, `width` are the latent's (pixels / 8)."""
    b, n, f = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or f % 4:
        raise UsageError(f"{n} tokens of {f} features do not unpack to a {height}x{width} latent")
    x = tokens.reshape(b, height // 2, width // 2, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, f // 4, height, width)


def image_ids(height: int, width: int, device=None) -> Tensor:
    """(H/2 * W/2, 3) float32 ids (0, patch row, patch col) of a packed (H, W) latent, in `pack`'s token order
    (diffusers `_prepare_latent_image_ids(batch, H // 2, W // 2)`, BFL `prepare`)."""
    rows = torch.arange(height // 2, dtype=torch.float32, device=device)
    cols = torch.arange(width // 2, dtype=torch.float32, device=device)
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None) -> Tensor:
    """(T, 3) zeros: every text token sits at position 0 on all three axes."""
    return torch.zeros(length, 3, device=device)


# ----------------------------------------------------------------------------- embeddings and attention

def timestep_embedding(t: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """BFL layers.py `timestep_embedding(t, dim, time_factor=1000)`: [cos | sin] of t * 1000, in float32
    whatever the model's dtype (ComfyUI keeps the timestep in float32 too; BFL's sampler rounds t to bf16 first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * TIME_FACTOR)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (B, 1, N, head_dim / 2), of the rotary angles for (B, N, n_axes) ids: axis i owns
    axes_dim[i] channels. Angles are computed in float64 and rounded once (diffusers FluxPosEmbed, ComfyUI rope;
    BFL's math.py rope works in the ids' dtype). MPS has no float64: there the angles are made on the CPU."""
    where = torch.device("cpu") if ids.device.type == "mps" else ids.device
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=where) / dim)  # (dim/2,)
        angles.append(ids[..., i].to(where, torch.float64)[..., None] * omega)  # (B, N, dim/2)
    a = torch.cat(angles, dim=-1)[:, None]  # (B, 1, N, head_dim/2)
    return a.cos().float().to(ids.device), a.sin().float().to(ids.device)


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate each channel pair (2i, 2i+1) of x: (B, H, N, D) by its angle (BFL math.py apply_rope), in float32."""
    cos, sin = pe
    xf = x.float().unflatten(-1, (-1, 2))  # (B, H, N, D/2, 2)
    even, odd = xf[..., 0], xf[..., 1]
    out = torch.empty_like(xf)
    # written into its halves with one temporary at a time, not four and a stack (a single block's peak at 1024 px);
    # the same operations, so the same bits
    torch.mul(even, cos, out=out[..., 0]).sub_(odd * sin)
    torch.mul(odd, cos, out=out[..., 1]).add_(even * sin)
    return out.flatten(-2).type_as(x)


def attention(qkv: list[Tensor]) -> Tensor:
    """[q, k, v], each (B, H, N, D), q and k rotated (apply_rope) -> (B, N, H*D): softmax attention (BFL math.py).
    The list is emptied: q, k and v are freed before the heads are interleaved into the output's layout."""
    out = cpu_attention.scaled_dot_product(*qkv)  # (B, H, N, D)
    qkv.clear()
    return out.transpose(1, 2).flatten(2)


def heads_of(qkv: nn.Linear, x: Tensor, part: int, heads: int) -> Tensor:
    """Part `part` (0 q, 1 k, 2 v) of a fused q, k, v projection of x (B, N, D) as (B, H, N, D/H), from that part's
    rows of the weight alone (linear_rows): the three are made and freed one by one, never the whole fused output."""
    d = qkv.in_features
    return linear_rows(qkv, x, part * d, (part + 1) * d).unflatten(-1, (heads, -1)).transpose(1, 2)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: LayerNorm without affine weights, then (1 + scale) * x + shift with (B, 1, D) modulation."""
    return (1 + scale) * F.layer_norm(x, x.shape[-1:], eps=EPS) + shift


def _fp16_safe(x: Tensor) -> Tensor:
    # Flux activations outgrow fp16 in the residual stream: diffusers clips to the fp16 range there too
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# ----------------------------------------------------------------------------- blocks

class MLPEmbedder(nn.Module):
    """layers.py `MLPEmbedder`: Linear, SiLU, Linear (time_in, vector_in, guidance_in)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(silu(self.in_layer(x), inplace=True))


class RMSNorm(nn.Module):
    """layers.py `RMSNorm` over the head width, weight named ``scale``; torch's rms_norm (computes in float32)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.scale.shape, self.scale, EPS)


class QKNorm(nn.Module):
    """layers.py `QKNorm`: separate RMS norms for queries and keys."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, x: Tensor, part: int) -> Tensor:
        """q (part 0) or k (part 1), (B, H, N, Dh), normed in the projection's dtype."""
        return (self.query_norm, self.key_norm)[part](x).to(x)


class SelfAttention(nn.Module):
    """layers.py `SelfAttention`'s weights (fused qkv, q/k norms, output proj); the double block drives them."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def head(self, x: Tensor, part: int) -> Tensor:
        # x: (B, N, D) -> q, k (normed) or v (part 0, 1, 2), (B, H, N, D/H)
        t = heads_of(self.qkv, x, part, self.heads)
        return t if part == 2 else self.norm(t, part)


class Modulation(nn.Module):
    """layers.py `Modulation`: SiLU(vec) -> (shift, scale, gate) once (single) or twice (double), each (B, 1, D)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.lin = nn.Linear(dim, (6 if double else 3) * dim)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        # in row pieces: a quantized weight of up to 18432 x 3072 is never dequantized whole (226 MB in fp32)
        chunks = linear_pieces(self.lin, silu(vec))[:, None, :].chunk(self.lin.out_features // vec.shape[-1], dim=-1)
        return [tuple(chunks[i : i + 3]) for i in range(0, len(chunks), 3)]


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """layers.py `DoubleStreamBlock`: image and text keep their own weights and attend jointly over [txt, img]."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d = cfg.hidden_size
        self.img_mod, self.txt_mod = Modulation(d, double=True), Modulation(d, double=True)
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp, self.txt_mlp = _mlp(d, cfg.mlp_hidden_dim), _mlp(d, cfg.mlp_hidden_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
        # img: (B, L, D), txt: (B, T, D), vec: (B, D)
        (img_shift1, img_scale1, img_gate1), img_mod2 = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), txt_mod2 = self.txt_mod(vec)
        img_h, txt_h = modulate(img, img_shift1, img_scale1), modulate(txt, txt_shift1, txt_scale1)
        def joint(part: int) -> Tensor:  # q, k or v over [txt, img]: (B, H, T + L, Dh), one at a time
            return torch.cat([self.txt_attn.head(txt_h, part), self.img_attn.head(img_h, part)], dim=2)

        qkv = [apply_rope(joint(0), pe), apply_rope(joint(1), pe), joint(2)]
        del img_h, txt_h
        attn = attention(qkv)  # (B, T + L, D)
        # each stream's rows made contiguous: a strided (B, L, D) input takes another GEMM path (other rounding)
        projs, lengths = (self.txt_attn.proj, self.img_attn.proj), [txt.shape[1], img.shape[1]]
        txt_out, img_out = (proj(part.contiguous()) for proj, part in zip(projs, attn.split(lengths, dim=1)))
        del attn
        img = img + img_gate1 * img_out  # each stream's gated attention residual, its projection freed before the MLP
        txt = txt + txt_gate1 * txt_out
        del img_out, txt_out
        return _mlp_residual(img, self.img_mlp, img_mod2), _mlp_residual(txt, self.txt_mlp, txt_mod2)


def gelu_rows(layer: nn.Linear, x: Tensor, start: int, stop: int) -> Tensor:
    """tanh-GELU of output features [start, stop) of layer(x): on a bf16 CPU the GELU runs inside the GEMM, as
    SD3's MLP does (models/fused_linear.py); elsewhere after it, in place. Pieces are whole SIMD loops
    (quant/layers.ROW_ALIGN), so GELU'ing each piece gives the bits of GELU'ing the whole."""
    if fused_linear.fusable(x, layer):
        return fused_linear.linear_gelu(x, layer, "tanh", start, stop)
    return gelu(linear_rows(layer, x, start, stop), inplace=True, approximate="tanh")


def _mlp_residual(x: Tensor, mlp: nn.Module, mod2) -> Tensor:
    """One stream's gated, modulated MLP residual."""
    shift, scale, gate2 = mod2
    hidden = linear_pieces(mlp[0], modulate(x, shift, scale), rows=gelu_rows)
    return _fp16_safe(x + gate2 * linear_pieces(mlp[2], hidden))


class SingleStreamBlock(nn.Module):
    """layers.py `SingleStreamBlock`: one stream over [txt, img]; attention and MLP run in parallel from one
    fused input projection (``linear1`` = q, k, v, mlp_in) into one fused output (``linear2`` = proj, mlp_out)."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        d, self.heads, self.mlp_hidden = cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden_dim
        self.linear1 = nn.Linear(d, 3 * d + self.mlp_hidden)
        self.linear2 = nn.Linear(d + self.mlp_hidden, d)
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(d, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe) -> Tensor:
        # x: (B, T + L, D), vec: (B, D)
        [(shift, scale, gate)] = self.modulation(vec)
        h = modulate(x, shift, scale)
        fused = self._fused(h, self._attention(h, pe))  # (B, N, D + mlp_hidden)
        del h
        return _fp16_safe(x + gate * linear_pieces(self.linear2, fused))

    def _attention(self, h: Tensor, pe) -> Tensor:
        """(B, N, D) -> (B, N, D): q, k, v from their own rows of linear1, one at a time."""
        qkv = [apply_rope(self.norm(heads_of(self.linear1, h, i, self.heads), i), pe) for i in range(2)]
        qkv.append(heads_of(self.linear1, h, 2, self.heads))
        return attention(qkv)

    def _fused(self, h: Tensor, attn: Tensor) -> Tensor:
        """linear2's input [attention | GELU(linear1's MLP rows)], written piece by piece into one buffer: at 1024 px
        (4608 tokens, fp32) neither the MLP's whole output (226 MB) beside its concatenation (283 MB) nor,
        quantized, its whole dequantized weight (151 MB) is ever held."""
        d = h.shape[-1]
        fused = h.new_empty(*h.shape[:-1], d + self.mlp_hidden)
        fused[..., :d] = attn
        del attn
        for start, stop in row_pieces(self.linear1, h, 3 * d, 3 * d + self.mlp_hidden):
            fused[..., start - 2 * d : stop - 2 * d] = gelu_rows(self.linear1, h, start, stop)
        return fused


class LastLayer(nn.Module):
    """layers.py `LastLayer`: adaLN (stored as shift, scale) then the projection to the output features."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        # row pieces: a quantized 6144 x 3072 weight (75 MB in fp32) is never dequantized whole, so the buffer a
        # sampling loop reuses for dequantized weights stays at one block weight's size (quant.layers.reused_buffers)
        shift, scale = linear_pieces(self.adaLN_modulation[1], silu(vec)).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(x, shift[:, None], scale[:, None]))


# ----------------------------------------------------------------------------- the model

class FluxModel(nn.Module):
    """model.py `Flux`: embed image tokens, text tokens and the (t, guidance, pooled text) vector; 19 double-stream
    blocks, then 38 single-stream blocks over [txt, img]; the last layer maps image tokens to the velocity."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(FREQ_DIM, d)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(FREQ_DIM, d)
        self.txt_in = nn.Linear(cfg.context_in_dim, d)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(d, cfg.out_channels)

    def vector(self, t: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """(B, D) conditioning vector: time embedding (+ guidance embedding on dev) + pooled text."""
        dtype = self.img_in.bias.dtype  # a bias: never quantized (a GGUF's img_in may hold GGML blocks)
        vec = self.time_in(timestep_embedding(t).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise UsageError("this Flux model is guidance-distilled (dev): it needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        return vec + self.vector_in(y.to(dtype))  # schnell ignores a guidance value, as BFL's model does

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, t: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:  # fmt: skip
        # img: (B, L, C) packed latent tokens; txt: (B, T, 4096); ids: (B, N, 3) or (N, 3); t: (B,) sigma in [0, 1];
        # y: (B, 768) pooled CLIP-L; guidance: (B,) (dev)
        dtype = self.img_in.bias.dtype  # a bias: never quantized (a GGUF's img_in may hold GGML blocks)
        vec = self.vector(t, y, guidance)  # (B, D)
        x = self.img_in(img.to(dtype))  # (B, L, D)
        ctx = linear_pieces(self.txt_in, txt.to(dtype))  # (B, T, D); 3072 x 4096 in pieces, as LastLayer's adaLN
        ids = torch.cat([_batched(txt_ids, ctx.shape[0]), _batched(img_ids, x.shape[0])], dim=1)  # (B, T + L, 3)
        pe = rope(ids, self.config.axes_dim, self.config.theta)
        for block in self.double_blocks:
            x, ctx = block(x, ctx, vec, pe)
        x = torch.cat([ctx, x], dim=1)  # (B, T + L, D)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, ctx.shape[1] :], vec)  # (B, L, C_out)

    def latent_velocity(self, latent: Tensor, t: Tensor, txt: Tensor, y: Tensor,
                        guidance: Tensor | None = None) -> Tensor:  # fmt: skip
        """The model on an unpacked (B, 16, H, W) latent, as a denoiser calls it: pack, image and text ids,
        forward, unpack -> (B, 16, H, W) velocity. (Fill / Depth / Canny models take extra packed channels after
        the latent's: build `img` yourself and call the model.)"""
        h, w = latent.shape[-2:]
        img_id, txt_id = image_ids(h, w, latent.device), text_ids(txt.shape[1], latent.device)
        return unpack(self(pack(latent), img_id, txt, txt_id, t, y, guidance), h, w)


def _batched(ids: Tensor, batch: int) -> Tensor:
    """(N, 3) or (B, N, 3) ids as (B, N, 3)."""
    return ids.expand(batch, *ids.shape) if ids.ndim == 2 else ids
