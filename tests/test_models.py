"""Our UNet / VAE / text encoder equal diffusers' and transformers' models holding the same random weights.

Oracle weights come from the LDM single file through diffusers' OWN converters (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) or from the diffusers
folder through diffusers/transformers ``from_pretrained``, so agreement does not rest on our rename table.
All in fp32 on CPU; differences must be at float rounding level (relative max error 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers, tiny_sd2, tiny_sd2_diffusers  # noqa: F401
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from make_checkpoint import unet_diffusers_config, vae_diffusers_config
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdcli.loading.checkpoint import load_models
from sdcli.runtime.errors import UsageError

RTOL = 1e-5
FAMILIES = ["sd1", "sd2"]


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert scale > 1e-3, "oracle output is degenerate"
    assert err <= RTOL * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


def _file(request: pytest.FixtureRequest, family: str, layout: str) -> Path:
    name = f"tiny_{family}" + ("_diffusers" if layout == "diffusers" else "")
    return request.getfixturevalue(name)


@pytest.fixture(scope="module")
def loaded(request: pytest.FixtureRequest):
    cache = {}

    def get(family: str, layout: str):
        if (family, layout) not in cache:
            cache[(family, layout)] = load_models(_file(request, family, layout))
        return cache[(family, layout)]

    return get


def _oracle_unet(path: Path, family: str, models) -> UNet2DConditionModel:
    if path.is_dir():
        return UNet2DConditionModel.from_pretrained(path / "unet").eval()
    config = unet_diffusers_config(models.unet.config, family)
    converted = convert_ldm_unet_checkpoint(load_file(path), config)
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet.load_state_dict(converted, strict=True)
    return unet.eval()


@pytest.mark.parametrize("layout", ["single", "diffusers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_unet_matches_diffusers(request, loaded, family, layout):
    models = loaded(family, layout)
    ref = _oracle_unet(_file(request, family, layout), family, models)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([999.0, 17.25])  # fractional timesteps are allowed
    ctx = torch.randn(2, 154, 64, generator=g)  # two 77-token chunks
    with torch.no_grad():
        assert_close(models.unet(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample)


def _oracle_vae(path: Path, models) -> DiffusersVAE:
    if path.is_dir():
        return DiffusersVAE.from_pretrained(path / "vae").eval()
    config = vae_diffusers_config(models.vae.config)
    converted = convert_ldm_vae_checkpoint(load_file(path), config)
    vae = DiffusersVAE(**{k: v for k, v in config.items() if not k.startswith("_")})
    vae.load_state_dict(converted, strict=True)
    return vae.eval()


@pytest.mark.parametrize("layout", ["single", "diffusers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vae_matches_diffusers(request, loaded, family, layout):
    models = loaded(family, layout)
    ref = _oracle_vae(_file(request, family, layout), models)
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    with torch.no_grad():
        mean, logvar = models.vae.encode(image)
        dist = ref.encode(image).latent_dist
        assert mean.shape == (1, 4, 8, 6)
        assert_close(mean, dist.mean)
        assert_close(logvar, dist.logvar)
        z = torch.randn(1, 4, 8, 6, generator=g)
        assert_close(models.vae.decode(z), ref.decode(z).sample)


def _oracle_text(path: Path, family: str) -> tuple[CLIPTextModel, int]:
    """(transformers CLIPTextModel, index into hidden_states that SD conditions on)."""
    if path.is_dir():
        return CLIPTextModel.from_pretrained(path / "text_encoder").eval(), -1
    state = load_file(path)
    layers = 2 if family == "sd1" else 3  # the SD2 file keeps OpenCLIP's full depth
    config = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=1, max_position_embeddings=77,
                            hidden_act="quick_gelu" if family == "sd1" else "gelu")  # fmt: skip
    model = CLIPTextModel(config).eval()
    if family == "sd1":
        converted = convert_ldm_clip_checkpoint(state)
    else:
        converted = convert_open_clip_checkpoint(model, state)
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    converted = {(k if nested else k.removeprefix("text_model.")): v for k, v in converted.items()
                 if "position_ids" not in k and "text_projection" not in k}  # fmt: skip
    model.load_state_dict(converted, strict=True)
    return model, -1 if family == "sd1" else -2  # SD2 uses the penultimate layer


@pytest.mark.parametrize("layout", ["single", "diffusers"])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoder_matches_transformers(request, loaded, family, layout):
    models = loaded(family, layout)
    ref, layer = _oracle_text(_file(request, family, layout), family)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    with torch.no_grad():
        hidden = ref(input_ids=ids, output_hidden_states=True).hidden_states
        for skip in (1, 2):
            expect = ref.final_layer_norm(hidden[layer - (skip - 1)])
            assert_close(models.text_encoder(ids, clip_skip=skip), expect)
    assert models.text_encoder.pad_id == (49407 if family == "sd1" else 0)
    assert models.text_encoder.hidden_size == 64
    with pytest.raises(UsageError, match="clip_skip"):
        models.text_encoder(ids, clip_skip=3)  # only 2 usable layers in the tiny model


def test_single_file_and_folder_hold_the_same_weights(loaded):
    for family in FAMILIES:
        a, b = loaded(family, "single"), loaded(family, "diffusers")
        for part in ("unet", "vae", "text_encoder"):
            sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
            assert sa.keys() == sb.keys()
            assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{family} {part} differs between layouts"
