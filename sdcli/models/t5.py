"""The T5 v1.1 encoder (T5-XXL, the third text encoder of SD3/SD3.5 and the only sequence encoder of FLUX.1).

Attribute paths are the keys of the real files: ``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q/k/v/o``,
``encoder.block.0.layer.0.SelfAttention.relative_attention_bias``, ``encoder.block.N.layer.1.DenseReluDense.wi_0/
wi_1/wo``, ``...layer.N.layer_norm``, ``encoder.final_layer_norm`` (after the prefix ``text_encoders.t5xxl.
transformer.`` in SD3.5 single files; bare in standalone ``t5xxl_*.safetensors``). Files also carry
``encoder.embed_tokens.weight``, the same matrix as ``shared.weight`` (transformers ties the two): the model keeps
one, ``shared``, and `load_state_dict` accepts either name (see EMBEDDING_ALIAS).
Upstream definition: transformers ``models/t5/modeling_t5.py`` (T5EncoderModel, T5Stack, T5Block, T5Attention,
T5LayerNorm, T5DenseGatedActDense); the paper's v1.1 changes: gated-GELU feed-forward, no tied output head.

T5 must never run in float16: its feed-forward activations exceed fp16's range in the large models (transformers
keeps ``wo`` in fp32 for that reason). bf16 and fp32 are safe; the caller refuses fp16 for this encoder.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.runtime.errors import BadInputError, UnsupportedModelError, UsageError

PAD_ID = 0
EOS_ID = 1
EMBEDDING_ALIAS = ("encoder.embed_tokens.weight", "shared.weight")  # (name some files use, the model's name)


@dataclass(frozen=True)
class T5Config:
    """T5 encoder hyperparameters; defaults are T5-v1.1-XXL (google/t5-v1_1-xxl, SD3's and Flux's text_encoder_3/2)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # not in the weights; 128 in every released T5
    layer_norm_epsilon: float = 1e-6


def config_from_shapes(shapes: dict[str, tuple[int, ...]], prefix: str = "") -> T5Config:
    """T5Config from a header's {name: shape} (no tensor data); `prefix` e.g. ``text_encoders.t5xxl.transformer.``.

    Reads vocab and width from the embedding, heads and buckets from the relative bias table, d_kv from q,
    d_ff from wi_0, depth from the block count. The original T5 (ReLU, a single ``wi``) is refused: SD3 and Flux
    use v1.1's gated-GELU."""

    def need(name: str) -> tuple[int, ...]:
        key = prefix + name
        if key not in shapes and name == EMBEDDING_ALIAS[1]:
            key = prefix + EMBEDDING_ALIAS[0]  # a file with only the alias
        if key not in shapes:
            raise BadInputError(f"cannot read the T5 encoder: tensor {prefix + name!r} is missing")
        return tuple(shapes[key])

    ff = "encoder.block.0.layer.1.DenseReluDense."
    if prefix + ff + "wi_0.weight" not in shapes and prefix + ff + "wi.weight" in shapes:
        raise UnsupportedModelError("this T5 encoder is the original T5 (ReLU feed-forward); SD3/Flux use T5 v1.1")
    vocab, d_model = need("shared.weight")
    buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    inner = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    pattern = re.compile(re.escape(prefix) + r"encoder\.block\.(\d+)\.")
    layers = 1 + max(int(m.group(1)) for m in map(pattern.match, shapes) if m)
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
                    d_ff=need(ff + "wi_0.weight")[0], num_layers=layers,
                    relative_attention_num_buckets=buckets)  # fmt: skip


class T5LayerNorm(nn.Module):
    """T5's RMS norm: no mean subtraction, no bias; the mean of squares in fp32 whatever the weight dtype
    (transformers T5LayerNorm), then back to a half weight's dtype before the scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, h: Tensor) -> Tensor:
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        h = h * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


def relative_position_bucket(relative: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bidirectional buckets of key - query offsets (transformers T5Attention._relative_position_bucket):
    half the buckets per direction, exact for small offsets, logarithmic up to max_distance, then clamped."""
    num_buckets //= 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    relative = torch.abs(relative)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


class T5Attention(nn.Module):
    """T5Attention, encoder self-attention: no 1/sqrt(d) scale (T5 folds it into the weights' initialisation);
    only the first block owns ``relative_attention_bias`` and the bias it computes is reused by every block."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.cfg = cfg
        inner = cfg.num_heads * cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int) -> Tensor:
        """(1, heads, T, T) additive attention bias for a sequence of `length` tokens."""
        device = self.relative_attention_bias.weight.device
        query = torch.arange(length, dtype=torch.long, device=device)[:, None]
        key = torch.arange(length, dtype=torch.long, device=device)[None, :]
        bucket = relative_position_bucket(key - query, self.cfg.relative_attention_num_buckets,
                                          self.cfg.relative_attention_max_distance)  # fmt: skip
        return self.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, heads, T, T)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        b, t, _ = h.shape
        q, k, v = (p(h).view(b, t, -1, self.cfg.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        # transformers' default (sdpa) path passes the bias as the float mask, scale 1: the same op here.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)  # (B, heads, T, d_kv)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)


class T5DenseGatedActDense(nn.Module):
    """v1.1's feed-forward: gelu_tanh(wi_0 x) * wi_1 x, then wo (transformers T5DenseGatedActDense)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        h = gelu_new(self.wi_0(h)) * self.wi_1(h)  # (B, T, d_ff)
        if self.wo.weight.is_floating_point():  # a GGUF's quantized wo holds GGML blocks: it takes h's dtype
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


def gelu_new(x: Tensor) -> Tensor:
    """GELU, tanh approximation, written out as transformers' ``gelu_new`` (NewGELUActivation) computes it: the
    same function as F.gelu(approximate="tanh") but not the same bits, and T5 v1.1 is defined with this one."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        return h + self.SelfAttention(self.layer_norm(h), bias)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)  # the name of the original ReLU layer, kept by the files
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.DenseReluDense(self.layer_norm(h))


class T5Block(nn.Module):
    """``layer.0`` self-attention, ``layer.1`` feed-forward, both pre-norm residual."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_bias), T5LayerFF(cfg)])

    def forward(self, h: Tensor, bias: Tensor) -> Tensor:
        return self.layer[1](self.layer[0](h, bias))


class T5Encoder(nn.Module):
    """transformers ``T5EncoderModel``: token ids (B, T) -> last hidden state (B, T, d_model), final norm applied.

    No attention mask: SD3 and Flux attend to the padding too (the padded length is part of the conditioning)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(T5Block(cfg, has_relative_bias=i == 0) for i in range(cfg.num_layers))
        self.encoder.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.register_load_state_dict_pre_hook(_accept_embedding_alias)

    def forward(self, ids: Tensor) -> Tensor:
        if self.shared.weight.dtype == torch.float16:
            raise UsageError("T5 overflows in float16; run it in bfloat16 or float32")
        h = self.shared(ids)  # (B, T, D)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1])  # (1, heads, T, T)
        for block in self.encoder.block:
            h = block(h, bias)
        return self.encoder.final_layer_norm(h)  # (B, T, D)


def _accept_embedding_alias(module: nn.Module, state: dict, prefix: str, *args) -> None:
    """Load ``encoder.embed_tokens.weight`` as ``shared.weight`` (files carry one or both, the same matrix).
    `state` is load_state_dict's own copy of the caller's dict."""
    alias, name = prefix + EMBEDDING_ALIAS[0], prefix + EMBEDDING_ALIAS[1]
    if alias in state:
        tied = state.pop(alias)
        state.setdefault(name, tied)
