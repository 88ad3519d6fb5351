"""Text -> conditioning: the prompt and the negative encoded by the family's text encoders (CLIP, or CLIP and T5
for the flow transformers), and the vectors a family's network takes beside the text (SDXL's size vector, SD3's and
FLUX's pooled text, FLUX dev's distilled guidance), built into conditioning.Cond. Textual-inversion embeddings join
the models here (with_embeddings).

Moved out of pipeline.py, which re-exports these names: `pipeline.encode_text` stays the stage callers and tests
use (pipeline.encode_scheduled, the prompt-editing schedule over it, calls it through pipeline's namespace).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sdcli.families.base import SizeCond
from sdcli.quant.layers import reused_buffers
from sdcli.sampling.conditioning import Cond, as_cond
from sdcli.text.editing import ScheduledCond


def encode_text(models, prompt: str, negative: str | None, clip_skip: int = 1):
    """(cond, uncond), each (1, 77*k, D) with the same k, on the run's device, in fp32; for a family whose UNet
    takes a pooled text vector, Conds carrying it (`pooled`, turned into y by with_size_vector). The shorter of
    the two is extended by the empty prompt's encoding (prompts.pad_chunks); an empty negative is all zeros
    where the family says so (SDXL: A1111's force_zero_negative_prompt). Textual-inversion embeddings the texts
    trigger (models.embeddings) take the rows of each encoder's key. `negative` None (no guidance, cfg <= 1): the
    prompt alone, unpadded, as diffusers encodes it then; uncond is None."""
    from sdcli.text.prompts import CHUNK_LENGTH, encode_with, pad_chunks
    from sdcli.text.clip_tokenizer import get_tokenizer

    family, tokenizer = models.family, get_tokenizer()
    if any(spec.kind == "t5" for spec in family.text):
        return _encode_joint(models, prompt, negative)
    encoders = models.stage("text")

    def encode(text: str):
        return encode_with(text, encoders, family.text, tokenizer, clip_skip, models.embeddings)

    def result(context, pooled):
        return context.float() if pooled is None else Cond(context.float(), pooled=pooled.float())

    with torch.inference_mode():
        cond, pooled = encode(prompt)
        if negative is None:
            return result(cond, pooled), None
        if negative == "" and family.zero_empty_negative:
            uncond = torch.zeros_like(cond[:, : CHUNK_LENGTH + 2])  # (1, 77, D)
            uncond_pooled = None if pooled is None else torch.zeros_like(pooled)
        else:
            uncond, uncond_pooled = encode(negative)
        cond, uncond = pad_chunks(cond, uncond, lambda: encode("")[0])
    return result(cond, pooled), result(uncond, uncond_pooled)


def _encode_joint(models, prompt: str, negative: str | None):
    """encode_text for a flow transformer's encoders (text/prompts.encode_joint): the CLIP contexts of cond and
    uncond padded to one chunk count as encode_text does, then [CLIP zero-padded to T5's width | T5 tokens]."""
    from sdcli.text.prompts import encode_joint, pad_chunks
    from sdcli.text.clip_tokenizer import get_tokenizer
    from sdcli.text.t5_tokenizer import t5_tokenizer

    family, encoders = models.family, models.stage("text")
    tokenizers = {"clip": get_tokenizer(), "t5": t5_tokenizer()}
    width = next((cfg.d_model for spec, cfg in zip(family.text, models.info.texts) if spec.kind == "t5" and cfg),
                 getattr(models.info.unet, "context_dim", 0))  # SD3 without T5: its zeros are the MMDiT's width

    def encode(text: str):
        return encode_joint(text, encoders, family.text, tokenizers, width, models.embeddings)

    def result(parts):
        return Cond(parts.context(width), pooled=parts.pooled)

    with torch.inference_mode(), reused_buffers():  # a GGUF T5's weights dequantize into one buffer
        cond = encode(prompt)
        if negative is None:
            return result(cond), None
        uncond = encode(negative)
        if cond.clip is not None:
            clip, clip_u = pad_chunks(cond.clip, uncond.clip, lambda: encode("").clip)
            cond, uncond = replace(cond, clip=clip), replace(uncond, clip=clip_u)
    return result(cond), result(uncond)


def with_size_vector(models, value, size: SizeCond, negative: bool = False):
    """The family's vector y (SDXL: the pooled text, then the size/crop or aesthetic embeddings; SD3 and FLUX: the
    pooled text itself) built into a Cond (or each entry of a prompt-editing schedule) that carries a pooled
    vector; anything else is returned as is."""
    if isinstance(value, ScheduledCond):
        return ScheduledCond(tuple((end, with_size_vector(models, c, size, negative)) for end, c in value.entries))
    if not isinstance(value, Cond) or value.pooled is None:
        return value
    if models.family.size_values is None:
        return replace(value, y=value.pooled)
    from sdcli.models.unet import sdxl_vector

    values = models.family.size_values(size, negative)
    return replace(value, y=sdxl_vector(value.pooled, values, models.info.unet.adm_in_channels))


def with_guidance(models, value, guidance: float | None = None):
    """A guidance-distilled family's strength (FLUX dev: --guidance, else the family's default) carried in the
    Cond (or each entry of a schedule); other families' conditioning is returned as is."""
    family = models.family
    if family.guidance != "distilled" or value is None:
        return value
    if isinstance(value, ScheduledCond):
        return ScheduledCond(tuple((end, with_guidance(models, c, guidance)) for end, c in value.entries))
    strength = family.default_guidance if guidance is None else guidance
    return replace(as_cond(value), guidance=torch.tensor([float(strength)]))


def embedding_widths(models) -> dict[str, int]:
    """{embedding key: width} of the model's text encoders: what a textual-inversion file must fit."""
    return {spec.embedding_key: cfg.hidden_size for spec, cfg in zip(models.family.text, models.info.texts)
            if spec.kind == "clip" and cfg is not None}


def with_embeddings(models, folder):
    """The models with the embeddings of `folder` (sub-folders too) available to every prompt; files that do
    not fit the model are said once on stderr when a prompt names them, and left out."""
    import dataclasses

    from sdcli.runtime import console
    from sdcli.text.embeddings import EmbeddingLibrary
    from sdcli.text.clip_tokenizer import get_tokenizer

    library = EmbeddingLibrary(folder, embedding_widths(models), get_tokenizer().encode, console.info)
    return dataclasses.replace(models, embeddings=library)
