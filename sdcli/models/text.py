"""The CLIP text encoders of SD 1.x (OpenAI CLIP ViT-L/14), SD 2.x (OpenCLIP ViT-H/14) and SDXL (ViT-L/14 and
OpenCLIP ViT-bigG/14 with its text projection), in plain torch.

The module tree under ``self.transformer`` has transformers' ``CLIPTextModel`` names (embeddings, encoder.layers.N.
self_attn.q_proj, ..., final_layer_norm), so SD files and diffusers ``text_encoder/`` folders load by name and
kohya LoRA keys (``lora_te_text_model_encoder_...``) map onto it; tests check the output against transformers'
CLIPTextModel on the same weights. It is ours rather than transformers' because importing transformers costs
~3 s of every cold ``sdcli`` run. SD1 checkpoints store it under ``cond_stage_model.transformer.[text_model.]``;
SD2 stores OpenCLIP names under ``cond_stage_model.model.`` which ``loading/checkpoint.py`` converts at load (fused q/k/v
split, last layer dropped because SD2 uses the penultimate layer). So for SD2 this model has one layer fewer
than the file, exactly as the diffusers ``text_encoder/`` folder of SD2 does.
SDXL (``encode_xl``) keeps every layer: it conditions on the penultimate hidden state WITHOUT the final norm,
and bigG's pooled vector needs the last layer (final norm, first EOS token, then ``text_projection``, a bias-free
Linear named as in transformers' CLIPTextModelWithProjection; OpenCLIP files store its transpose).
Upstream: https://github.com/Stability-AI/stablediffusion/blob/main/ldm/modules/encoders/modules.py
(FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder with layer="penultimate"); SDXL: generative-models
sgm/modules/encoders/modules.py (FrozenCLIPEmbedder layer="hidden", FrozenOpenCLIPEmbedder2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.models.invariant import gelu, sigmoid
from sdcli.runtime.errors import UsageError

EOS_ID = 49407  # <|endoftext|>


@dataclass(frozen=True)
class TextConfig:
    """Shape of the text encoder; defaults are SD1's CLIP ViT-L/14."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12  # layers actually built (SD2: the file's count minus the dropped last layer)
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    hidden_act: str = "quick_gelu"  # SD2/OpenCLIP: "gelu"
    projection_dim: int | None = None  # SDXL bigG: width of the pooled output (text_projection), else None
    pooled: bool = False  # the pooled output is wanted without a projection (SD3's and FLUX's CLIP-L)
    # The id that fills the window after the end token: OpenAI CLIP repeats <|endoftext|>, OpenCLIP pads with 0
    # ("!"). The family's text-encoder declaration says which (families/base.TextEncoderSpec.pad_id).
    pad_id: int = EOS_ID


class TextEncoder(nn.Module):
    """Token ids (N, 77) -> per-token embeddings (N, 77, D) for the UNet's cross-attention."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.pad_id = cfg.pad_id
        self.hidden_size = cfg.hidden_size
        self.transformer = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def reset_buffers(self) -> None:
        """Rebuild non-persistent buffers (position_ids), which a meta-device build leaves empty."""
        emb = self.transformer.embeddings
        device = emb.position_embedding.weight.device
        emb.position_ids = torch.arange(self.config.max_positions, device=device).expand(1, -1)

    def forward(self, ids: Tensor, clip_skip: int = 1, fixes: list | None = None) -> Tensor:
        """ids (N, T<=77) -> (N, T, D). clip_skip=k takes hidden state k from the end, then the final norm.

        A1111 semantics: clip_skip=1 is the last layer. For SD2 the model already ends at the penultimate
        layer of the file, so clip_skip counts on from there.
        `fixes`: textual-inversion rows, (window n, position t, vectors (k, D)) replacing the token embeddings of
        window n at t..t+k-1 (before the position embedding is added, as A1111's EmbeddingsWithFixes).
        """
        if clip_skip < 1 or clip_skip > self.config.num_layers:
            raise UsageError(f"clip_skip must be in 1..{self.config.num_layers}, got {clip_skip}")
        return self.transformer(ids, layers=self.config.num_layers - clip_skip + 1, fixes=fixes)

    def encode_xl(self, ids: Tensor, hidden_index: int = -2,
                  fixes: list | None = None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """SDXL: (hidden state `hidden_index` (N, T, D) WITHOUT the final norm, pooled (N, P) or None).

        `hidden_index` counts as transformers' ``hidden_states`` (0 = embeddings, -1 = last layer); SDXL uses
        -2, diffusers' clip_skip=c uses -(c + 2). The pooled vector (only with a text_projection) is the final
        norm of the LAST layer at the first EOS token (sgm takes argmax(ids): the same for CLIP's own ids),
        projected when the encoder has a text_projection (SD3's and FLUX's CLIP-L: not projected).
        """
        n = self.config.num_layers
        index = hidden_index + n + 1 if hidden_index < 0 else hidden_index
        if not 0 <= index <= n:
            raise UsageError(f"hidden state {hidden_index} out of range for a {n}-layer text encoder")
        pooled_wanted = self.config.projection_dim is not None or self.config.pooled
        t = self.transformer
        h = picked = t.embeddings(ids, fixes)  # (N, T, D); fixes: textual-inversion rows, as for forward
        for i, layer in enumerate(t.encoder.layers[: n if pooled_wanted else index], start=1):
            h = layer(h)
            if i == index:
                picked = h
        if not pooled_wanted:
            return picked, None
        last = t.final_layer_norm(h)  # (N, T, D)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), eos_index(ids)]  # (N, D)
        return picked, self.text_projection(pooled) if hasattr(self, "text_projection") else pooled


class CLIPTextTransformer(nn.Module):
    """Token + position embeddings, pre-norm causal transformer layers, final LayerNorm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, ids: Tensor, layers: int, fixes: list | None = None) -> Tensor:
        """ids (N, T) -> the final norm of the output of the first `layers` layers, (N, T, D)."""
        h = self.embeddings(ids, fixes)
        for layer in self.encoder.layers[:layers]:
            h = layer(h)
        return self.final_layer_norm(h)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        # Given uninitialised weights (the checkpoint fills them): nn.Embedding's own normal_() init would, on the
        # meta device, import torch._dynamo, 1.1 s of every cold start.
        self.token_embedding = uninitialised_embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = uninitialised_embedding(cfg.max_positions, cfg.hidden_size)
        home = self.position_embedding.weight.device  # a meta build's placeholder is made on the CPU: arange on
        home = torch.device("cpu") if home.type == "meta" else home  # meta imports torch's Python refs, 0.3-0.5 s
        ids = torch.arange(cfg.max_positions, device=home)  # of a cold start (CLIPTextModel.reset_buffers redoes it)
        self.register_buffer("position_ids", ids.expand(1, -1), persistent=False)

    def forward(self, ids: Tensor, fixes: list | None = None) -> Tensor:
        if ids.shape[-1] > self.position_ids.shape[-1]:
            raise UsageError(f"{ids.shape[-1]} tokens given; the text encoder takes at most "
                             f"{self.position_ids.shape[-1]}")  # fmt: skip
        positions = self.position_ids[:, : ids.shape[-1]]
        tokens = self.token_embedding(ids)  # (N, T, D)
        if fixes:
            tokens = tokens.clone()
            for n, t, rows in fixes:
                tokens[n, t : t + rows.shape[0]] = rows.to(tokens)
        return tokens + self.position_embedding(positions)  # (N, T, D)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        q, k, v = (p(h).view(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, heads, T, d/heads); CLIP is causal
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ACTIVATIONS:
            raise UsageError(f"text encoder activation {act!r} is not supported (known: {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(h)))


def eos_index(ids: Tensor) -> Tensor:
    """(N,) position of each row's first EOS; rows without one fall back to argmax(ids), sgm's rule.

    The first EOS rather than argmax: textual-inversion ids above 49407 must not be taken for the EOS."""
    is_eos = ids == EOS_ID
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), ids.argmax(-1))


def uninitialised_embedding(rows: int, dim: int) -> nn.Embedding:
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's GELU approximation (SD1)."""
    return x * sigmoid(1.702 * x, inplace=True)  # thread-count invariant sigmoid (invariant.py)


def exact_gelu(x: Tensor) -> Tensor:
    return gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}  # SD1 (OpenAI CLIP), SD2 (OpenCLIP: exact GELU)
LAYER_NORM_EPS = 1e-5
