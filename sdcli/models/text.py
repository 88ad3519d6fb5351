"""The CLIP text encoders of SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14).

Both are a transformers ``CLIPTextModel`` built from a local config (never fetched from the hub), held at
``self.transformer``. SD1 checkpoints store it under ``cond_stage_model.transformer.[text_model.]``; SD2 stores
OpenCLIP names under ``cond_stage_model.model.`` which ``checkpoint.py`` converts at load (fused q/k/v split,
last layer dropped because SD2 uses the penultimate layer). So for SD2 this model has one layer fewer than the
file, exactly as the diffusers ``text_encoder/`` folder of SD2 does.
Upstream: https://github.com/Stability-AI/stablediffusion/blob/main/ldm/modules/encoders/modules.py
(FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder with layer="penultimate").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from sdcli.errors import UsageError

SD1_PAD_ID = 49407  # SD1 pads with <|endoftext|>
SD2_PAD_ID = 0  # OpenCLIP's tokenizer pads with 0 ("!")


@dataclass(frozen=True)
class TextConfig:
    """Shape of the text encoder; defaults are SD1's CLIP ViT-L/14."""

    family: str = "sd1"
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12  # layers actually built (SD2: the file's count minus the dropped last layer)
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = 77
    hidden_act: str = "quick_gelu"  # SD2/OpenCLIP: "gelu"

    @property
    def pad_id(self) -> int:
        return SD2_PAD_ID if self.family == "sd2" else SD1_PAD_ID

    def to_clip_config(self) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_positions,
            hidden_act=self.hidden_act,
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=self.pad_id,
        )


class TextEncoder(nn.Module):
    """Token ids (N, 77) -> per-token embeddings (N, 77, D) for the UNet's cross-attention."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.family = cfg.family
        self.pad_id = cfg.pad_id
        self.hidden_size = cfg.hidden_size
        self.transformer = CLIPTextModel(cfg.to_clip_config())

    def reset_buffers(self) -> None:
        """Rebuild non-persistent buffers (position_ids), which a meta-device build leaves empty."""
        emb = self.transformer.embeddings
        device = emb.position_embedding.weight.device
        emb.position_ids = torch.arange(self.config.max_positions, device=device).expand(1, -1)

    def forward(self, ids: Tensor, clip_skip: int = 1) -> Tensor:
        """ids (N, T<=77) -> (N, T, D). clip_skip=k takes hidden state k from the end, then the final norm.

        A1111 semantics: clip_skip=1 is the last layer. For SD2 the model already ends at the penultimate
        layer of the file, so clip_skip counts on from there.
        """
        if clip_skip < 1 or clip_skip > self.config.num_layers:
            raise UsageError(f"clip_skip must be in 1..{self.config.num_layers}, got {clip_skip}")
        if clip_skip == 1:
            return self.transformer(input_ids=ids).last_hidden_state  # (N, T, D), final norm applied
        out = self.transformer(input_ids=ids, output_hidden_states=True)
        return self.transformer.final_layer_norm(out.hidden_states[-clip_skip])  # (N, T, D)
