"""Network hyperparameters read from the LDM tensor shapes of a header (no tensor data): the denoiser (UNet, MMDiT,
FLUX DiT), VAE, CLIP and T5 text encoders.

What shapes cannot say (attention heads, the text activation) comes from the family declaring the file.
ComfyUI's model_detection.detect_unet_config does the same for its model list.
"""

from __future__ import annotations

import re

from sdcli.runtime.errors import BadInputError
from sdcli.formats.diffusers import count
from sdcli.formats.ldm import UNET_PREFIX, VAE_PREFIX
from sdcli.models.text import TextConfig
from sdcli.models.unet import UNetConfig, UNetModel
from sdcli.models.unet import infer_unet_config as read_unet_config
from sdcli.models.vae import VAEConfig


def _need(shapes: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the {what}: tensor {key!r} is missing")
    return shapes[key]


def infer_unet_config(shapes: dict, heads: dict) -> UNetConfig:
    """UNet hyperparameters from the tensor shapes under ``model.diffusion_model.`` (models/unet.py reads them,
    per-level depth and the vector y's width included); `heads` is the family's attention rule (``num_heads``
    fixed, or ``head_dim`` fixed)."""
    return read_unet_config(shapes, UNET_PREFIX, **heads)


def _mmdit(shapes: dict, heads: dict):
    from sdcli.models import mmdit

    return mmdit.config_from_shapes(shapes, UNET_PREFIX, heads.get("head_dim") or 64)


def _flux(shapes: dict, heads: dict):
    from sdcli.models import flux

    return flux.config_from_shapes(shapes, UNET_PREFIX)


def _network(kind: str):
    """The module class of a denoiser kind (families/base.Family.denoiser)."""
    if kind == "mmdit":
        from sdcli.models.mmdit import MMDiT

        return MMDiT
    if kind == "flux_dit":
        from sdcli.models.flux import FluxModel

        return FluxModel
    return UNetModel


_CONFIGS = {"unet": infer_unet_config, "mmdit": _mmdit, "flux_dit": _flux}


def infer_denoiser_config(shapes: dict, family):
    """The config of the family's denoising network (UNetConfig, MMDiTConfig or FluxConfig) from the shapes under
    ``model.diffusion_model.``."""
    return _CONFIGS[family.denoiser](shapes, family.unet_heads)


def network_call(kind: str, net):
    """`net` as the samplers' adapter calls every denoiser: (x, t, context, **conditioning) -> its output. The
    FLUX DiT works on packed tokens with position ids: its latent_velocity packs and unpacks around the call."""
    if kind != "flux_dit":
        return net

    def call(x, t, context, y=None, guidance=None):
        return net.latent_velocity(x, t, context, y, guidance)  # (B, 16, h, w) velocity

    return call


def build_denoiser(kind: str, cfg):
    """The denoiser of `kind` built from its config (on the current default device: meta for a strict load)."""
    return _network(kind)(cfg)


def infer_vae_config(shapes: dict, prefix: str = VAE_PREFIX) -> VAEConfig:
    """VAE hyperparameters from the tensor shapes under ``first_stage_model.``."""
    keys = list(shapes)
    conv_in = _need(shapes, prefix + "encoder.conv_in.weight", "VAE")
    ch = conv_in[0]
    levels = count(keys, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
    mult = tuple(_need(shapes, f"{prefix}encoder.down.{i}.block.0.conv2.weight", "VAE")[0] // ch for i in range(levels))
    z_channels = _need(shapes, prefix + "decoder.conv_in.weight", "VAE")[1]
    quant = prefix + "post_quant_conv.weight" in shapes  # the 16-channel VAEs (SD3, FLUX) have no quant convs
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=_need(shapes, prefix + "decoder.conv_out.weight", "VAE")[0],
        ch=ch, ch_mult=mult,
        num_res_blocks=count(keys, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=z_channels,
        embed_dim=shapes[prefix + "post_quant_conv.weight"][1] if quant else z_channels,
        use_quant_conv=quant,
    )  # fmt: skip


def _hf_text_prefix(shapes: dict, prefix: str) -> str | None:
    for p in (prefix + "text_model.", prefix):
        if p + "embeddings.token_embedding.weight" in shapes:
            return p
    return None


def find_text(shapes: dict, spec) -> tuple[str, str] | None:
    """(layout, prefix) of a family's text encoder in these shapes: OpenCLIP names ("openclip") or transformers
    names ("openai", the prefix then includes ``text_model.`` when the file has it); None when absent."""
    for prefix in spec.prefixes:
        if prefix + "token_embedding.weight" in shapes:
            return "openclip", prefix
        if (p := _hf_text_prefix(shapes, prefix)) is not None:
            return "openai", p
    return None


def infer_text_config(shapes: dict, family: str, spec) -> tuple[TextConfig | None, str | None, str | None]:
    """(text config, layout, prefix) of the text encoder `spec` (families/base.TextEncoderSpec) declares. An SD2
    OpenCLIP file loses its last layer (SD2 conditions on the penultimate); SDXL keeps every layer and reads the
    width of the pooled output from text_projection (stored (width, proj) in OpenCLIP files, (proj, width) as a
    transformers Linear)."""
    if spec.kind == "t5":
        return _t5_config(shapes, spec)
    found = find_text(shapes, spec)
    if found is None:
        return None, None, None
    layout, p = found
    keys = list(shapes)
    if layout == "openclip":
        vocab, hidden = shapes[p + "token_embedding.weight"]
        layers = count(keys, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")
        layers -= spec.hidden_layer == "penultimate"
        inter = _need(shapes, p + "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        positions = _need(shapes, p + "positional_embedding", "text encoder")[0]
        projection = shapes.get(p + "text_projection", (0, None))[1]
    else:
        vocab, hidden = shapes[p + "embeddings.token_embedding.weight"]
        layers = count(keys, re.escape(p) + r"encoder\.layers\.(\d+)\.")
        inter = _need(shapes, p + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        positions = _need(shapes, p + "embeddings.position_embedding.weight", "text encoder")[0]
        projection = shapes.get(p.removesuffix("text_model.") + "text_projection.weight", (None,))[0]
        if projection is None:  # stable-diffusion.cpp's files: OpenCLIP's (width, proj) P under its bare name
            projection = shapes.get(p.removesuffix("text_model.") + "text_projection", (0, None))[1]
    projected = spec.pooled and spec.projected
    if projected and projection is None:
        raise BadInputError(f"the {family} text encoder at {spec.prefix} has no text_projection (its pooled "
                            "output is needed)")
    # Heads are not visible in shapes: CLIP ViT-L (768/12), OpenCLIP ViT-H (1024/16) and bigG (1280/20) use 64.
    cfg = TextConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                     num_heads=max(1, hidden // 64), intermediate_size=inter, max_positions=positions,
                     hidden_act=spec.hidden_act, projection_dim=projection if projected else None,
                     pad_id=spec.pad_id, pooled=spec.pooled and not projected,
                     )  # fmt: skip
    return cfg, layout, p


def _t5_config(shapes: dict, spec):
    """(T5Config, "t5", prefix) of a T5 encoder under the spec's prefix, or Nones when the file has none."""
    from sdcli.models import t5

    if not any(k.startswith(spec.prefix + "encoder.block.") for k in shapes):
        return None, None, None
    return t5.config_from_shapes(shapes, spec.prefix), "t5", spec.prefix
