"""SDXL's networks (base and refiner) equal diffusers' and transformers' on the same random weights.

The oracles get their weights from our tiny SDXL single files through diffusers' OWN converters
(convert_ldm_unet_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) or its single-file
loader, so agreement does not rest on any sdcli rename table. fp32 CPU; tolerance: float rounding (1e-5 of the
output's scale). The full-size presets are checked against the reference key lists (tests/data/sdxl_*_keys.tsv,
derived from diffusers' SDXL configs) on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _fixtures_pipeline import clip_tokenizer_dir  # noqa: F401
from _fixtures_sdxl import UNET_PREFIX, our_unet, tiny_sdxl, tiny_sdxl_dir, tiny_sdxl_refiner  # noqa: F401
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from make_checkpoint import (
    PRESETS,
    SDXL_G_PREFIX,
    SDXL_PRESETS,
    clip_config,
    ldm_shapes,
    sdxl_preset,
    unet_diffusers_config,
    vae_diffusers_config,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdcli.runtime.errors import BadInputError, UsageError
from sdcli.models import TextConfig, TextEncoder, UNetConfig
from sdcli.models.text import eos_index
from sdcli.models.unet import base_size_values, infer_unet_config, refiner_size_values, sdxl_vector

DATA = Path(__file__).parent / "data"
RTOL = 1e-5
FAMILIES = ["sdxl", "sdxl-refiner"]


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    assert ours.shape == ref.shape
    assert torch.isfinite(ours).all()
    scale = ref.abs().max().item()
    assert scale > 1e-3, "oracle output is degenerate"
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


def _file(request, family: str) -> Path:
    return request.getfixturevalue("tiny_sdxl" if family == "sdxl" else "tiny_sdxl_refiner")


def _pooled_dim(family: str) -> int:
    return sdxl_preset(family, "tiny")[3].projection_dim


# --- layout and shape inference ------------------------------------------------------------------

def _reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (DATA / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(json.loads(shape))
    return out


@pytest.mark.parametrize("family,name", [("sdxl", "sdxl_base_keys.tsv"), ("sdxl-refiner", "sdxl_refiner_keys.tsv")])
def test_full_presets_have_the_real_single_file_layout(family, name):
    ref = _reference_keys(name)
    ours = ldm_shapes(family, "full")  # built on the meta device: no 2.6 B parameters allocated
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert len(ours) == {"sdxl": 2515, "sdxl-refiner": 1858}[family]


@pytest.mark.parametrize("inpaint", [False, True])
@pytest.mark.parametrize("key", sorted(SDXL_PRESETS), ids="-".join)
def test_unet_config_is_inferred_from_shapes(key, inpaint):
    family, size = key
    shapes = ldm_shapes(family, size, inpaint)
    cfg = infer_unet_config(shapes, UNET_PREFIX, head_dim=64)
    assert cfg == sdxl_preset(family, size, inpaint)[0]
    if size == "full":  # the numbers the issue names, as a second check on the presets themselves
        assert (cfg.context_dim, cfg.adm_in_channels, cfg.time_embed_dim) == {
            "sdxl": (2048, 2816, 1280), "sdxl-refiner": (1280, 2560, 1536)}[family]
        assert cfg.in_channels == (9 if inpaint else 4)


@pytest.mark.parametrize("key", sorted(PRESETS), ids="-".join)
def test_sd1_sd2_configs_are_inferred_too(key):
    family, size = key
    heads = dict(num_heads=8, head_dim=None) if family == "sd1" else dict(num_heads=None, head_dim=64)
    assert infer_unet_config(ldm_shapes(family, size), UNET_PREFIX, **heads) == PRESETS[key][0]


def test_inference_refuses_what_it_cannot_build():
    shapes = ldm_shapes("sdxl", "tiny")
    pruned = {k: v for k, v in shapes.items() if ".output_blocks.0.1.transformer_blocks.1." not in k}
    with pytest.raises(BadInputError, match="different depths"):
        infer_unet_config(pruned, UNET_PREFIX, head_dim=64)
    no_mid = {k: v for k, v in shapes.items() if ".middle_block.1." not in k}
    with pytest.raises(BadInputError, match="middle transformer"):
        infer_unet_config(no_mid, UNET_PREFIX, head_dim=64)
    with pytest.raises(BadInputError, match="heads of 48"):
        infer_unet_config(shapes, UNET_PREFIX, head_dim=48)  # 128 channels do not split into 48-wide heads
    with pytest.raises(ValueError, match="per-level"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(False, True), transformer_depth=(0, 2))


# --- UNet ----------------------------------------------------------------------------------------

def _diffusers_unet(path: Path, family: str) -> UNet2DConditionModel:
    cfg = sdxl_preset(family, "tiny")[0]
    config = unet_diffusers_config(cfg, family, _pooled_dim(family))
    unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    unet.load_state_dict(convert_ldm_unet_checkpoint(load_file(path), config), strict=True)
    return unet.eval()


def _diffusers_time_ids(family: str, unet: UNet2DConditionModel, original, crop, target, aesthetic) -> torch.Tensor:
    """diffusers' own _get_add_time_ids (the pipelines' method, on a stand-in holding just what it reads)."""
    proj = _pooled_dim(family)
    if family == "sdxl":
        fake = SimpleNamespace(unet=unet)
        return StableDiffusionXLPipeline._get_add_time_ids(fake, original, crop, target, torch.float32, proj)
    fake = SimpleNamespace(unet=unet, config=SimpleNamespace(requires_aesthetics_score=True))
    ids, _neg = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        fake, original, crop, target, aesthetic, 2.5, original, crop, target, torch.float32, proj)
    return ids


def _our_y(family: str, cfg: UNetConfig, pooled, original, crop, target, aesthetic) -> torch.Tensor:
    if family == "sdxl":
        return sdxl_vector(pooled, base_size_values(original, crop, target), cfg.adm_in_channels)
    return sdxl_vector(pooled, refiner_size_values(original, crop, aesthetic), cfg.adm_in_channels)


# (height, width) differ, and crop top/left differ, so any swapped order shows
SIZES = dict(original=(1024, 768), crop=(16, 8), target=(896, 640), aesthetic=6.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_size_vector_equals_diffusers_add_time_ids_path(request, family):
    path = _file(request, family)
    ours, ref = our_unet(path), _diffusers_unet(path, family)
    pooled = torch.randn(2, _pooled_dim(family), generator=torch.Generator().manual_seed(5))
    y = _our_y(family, ours.config, pooled, **SIZES)
    ids = _diffusers_time_ids(family, ref, SIZES["original"], SIZES["crop"], SIZES["target"], SIZES["aesthetic"])
    assert ids.shape == (1, 6 if family == "sdxl" else 5)
    with torch.no_grad():
        aug = ref.get_aug_embed(torch.zeros(2, 1), None, {"text_embeds": pooled, "time_ids": ids.repeat(2, 1)})
        assert_close(ours.label_emb(y), aug)
    # a per-image (B, n) tensor of values gives the same vector as one sequence for the batch
    if family == "sdxl":
        values = base_size_values(SIZES["original"], SIZES["crop"], SIZES["target"])
    else:
        values = refiner_size_values(SIZES["original"], SIZES["crop"], SIZES["aesthetic"])
    assert torch.equal(sdxl_vector(pooled, torch.tensor([values, values]), ours.config.adm_in_channels), y)


UNET_CASES = [("sdxl", (8, 8)), ("sdxl", (9, 7)), ("sdxl", (54, 96)), ("sdxl-refiner", (8, 8)),
              ("sdxl-refiner", (9, 7))]


@pytest.mark.parametrize("family,hw", UNET_CASES)
def test_unet_matches_diffusers_text_time(request, family, hw):
    """(54, 96) is a 768x432 image: 16:9, sides multiples of 8 but not of 64; (9, 7) is odd at every level."""
    path = _file(request, family)
    ours, ref = our_unet(path), _diffusers_unet(path, family)
    g = torch.Generator().manual_seed(6)
    batch = 1 if hw == (54, 96) else 2
    x = torch.randn(batch, 4, *hw, generator=g)
    t = torch.tensor([999.0, 17.25][:batch])
    ctx = torch.randn(batch, 154, ours.config.context_dim, generator=g)  # two 77-token chunks
    pooled = torch.randn(batch, _pooled_dim(family), generator=g)
    y = _our_y(family, ours.config, pooled, **SIZES)
    ids = _diffusers_time_ids(family, ref, SIZES["original"], SIZES["crop"], SIZES["target"], SIZES["aesthetic"])
    with torch.no_grad():
        expect = ref(x, t, encoder_hidden_states=ctx,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.repeat(batch, 1)}).sample
        assert_close(ours(x, t, ctx, y), expect)


def test_unet_wants_y_exactly_when_it_has_label_emb(tiny_sdxl):  # noqa: F811
    unet = our_unet(tiny_sdxl)
    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), torch.zeros(1, 77, 192)
    with pytest.raises(ValueError, match="needs the vector y"):
        unet(x, t, ctx)
    with pytest.raises(ValueError, match="does not split"):
        sdxl_vector(torch.zeros(1, 95), (1.0,) * 6, 144)


# --- text encoders -------------------------------------------------------------------------------

def _ours_from_transformers(model, cfg: TextConfig) -> TextEncoder:
    """Our encoder holding a transformers model's weights (names: `text_model.` or none -> `transformer.`)."""
    state = {}
    for k, v in model.state_dict().items():
        if "position_ids" in k:
            continue
        state[k if k.startswith("text_projection") else "transformer." + k.removeprefix("text_model.")] = v
    ours = TextEncoder(cfg)
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def _ids(batch: int, eos_at: list[int], pad: int, seed: int) -> torch.Tensor:
    """BOS, random ordinary tokens, EOS at the given position, then `pad` (CLIP's real framing)."""
    ids = torch.randint(1, 49406, (batch, 77), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 49406
    for row, at in enumerate(eos_at):
        ids[row, at] = 49407
        ids[row, at + 1:] = pad
    return ids


def _check_text(ours: TextEncoder, ref, projection: bool) -> None:
    ids = _ids(3, [5, 40, 76], ours.pad_id, seed=7)
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        for index in (-2, -3, 1):
            hidden, pooled = ours.encode_xl(ids, hidden_index=index)
            assert torch.equal(hidden, out.hidden_states[index]), f"hidden state {index}"
            if projection:
                assert torch.equal(pooled, out.text_embeds)
            else:
                assert pooled is None
        assert torch.equal(ours(ids), out.last_hidden_state)  # the SD1 path (final norm) still holds


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoders_of_the_file_equal_transformers(request, family):
    """Through diffusers' converters: CLIP-L (HF names) and bigG (OpenCLIP layout, transposed projection)."""
    path = _file(request, family)
    state = load_file(path)
    _unet, _vae, text_l, text_g = sdxl_preset(family, "tiny")
    big_g = CLIPTextModelWithProjection(clip_config(text_g)).eval()
    converted = convert_open_clip_checkpoint(big_g, state, prefix=SDXL_G_PREFIX[family])
    big_g.load_state_dict(converted, strict=True)
    assert torch.equal(big_g.text_projection.weight, state[SDXL_G_PREFIX[family] + "text_projection"].T)
    _check_text(_ours_from_transformers(big_g, text_g), big_g, projection=True)
    if text_l is not None:
        clip_l = CLIPTextModel(clip_config(text_l)).eval()
        converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()
                     if "position_ids" not in k}  # fmt: skip
        clip_l.load_state_dict(converted, strict=True)
        _check_text(_ours_from_transformers(clip_l, text_l), clip_l, projection=False)


def test_full_width_bigg_layers_equal_transformers():
    """bigG's real width, heads and projection (1280, 20 heads, 5120 MLP, gelu), on two layers to stay fast."""
    cfg = TextConfig(hidden_size=1280, num_layers=2, num_heads=20, intermediate_size=5120,
                     hidden_act="gelu", projection_dim=1280, pad_id=0)  # fmt: skip
    with torch.device("meta"):  # transformers' own init of 66 M parameters takes ~5 s: fill them ourselves
        ref = CLIPTextModelWithProjection(clip_config(cfg)).eval()
    ref.to_empty(device="cpu")
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.ndim == 1 else p.shape[-1] ** -0.5))
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
        ref.text_model.embeddings.position_ids.copy_(torch.arange(77).expand(1, -1))  # a buffer to_empty voided
    _check_text(_ours_from_transformers(ref, cfg), ref, projection=True)


def test_pooled_takes_the_first_eos_not_a_larger_id():
    """A textual-inversion id above 49407 must not be taken for the EOS (sgm's argmax would)."""
    cfg = TextConfig(**{**sdxl_preset("sdxl", "tiny")[3].__dict__, "vocab_size": 49410})  # two TI ids added
    torch.manual_seed(9)
    ref = CLIPTextModelWithProjection(clip_config(cfg)).eval()  # eos_token_id 49407: first-EOS rule
    ours = _ours_from_transformers(ref, cfg)
    ids = _ids(1, [6], 0, seed=10)
    ids[0, 3] = 49409
    assert int(eos_index(ids)[0]) == 6 and int(ids.argmax()) == 3
    with torch.no_grad():
        _, pooled = ours.encode_xl(ids)
        assert torch.equal(pooled, ref(input_ids=ids).text_embeds)
    with pytest.raises(UsageError, match="out of range"):
        ours.encode_xl(ids, hidden_index=-5)


def test_pad_ids_per_encoder():
    _unet, _vae, text_l, text_g = sdxl_preset("sdxl", "full")
    assert (text_l.pad_id, text_g.pad_id) == (49407, 0)


# --- diffusers' single-file loader accepts the files ----------------------------------------------

def _config_folder(root: Path, family: str, tokenizer_dir: Path, size: str = "tiny") -> Path:
    """A local diffusers config folder (no weights) so from_single_file runs offline."""
    unet_cfg, vae_cfg, text_l, text_g = sdxl_preset(family, size)
    out = root / f"{family}_config"
    comps = {"unet": unet_diffusers_config(unet_cfg, family, text_g.projection_dim),
             "vae": {**vae_diffusers_config(vae_cfg), "force_upcast": True}}
    for name, config in comps.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "config.json").write_text(json.dumps(config))
    encoders = {"text_encoder_2": (text_g, "CLIPTextModelWithProjection")}
    if text_l is not None:
        encoders["text_encoder"] = (text_l, "CLIPTextModel")
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionXLImg2ImgPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": [None, None],
             "tokenizer": [None, None], "force_zeros_for_empty_prompt": family == "sdxl"}  # fmt: skip
    for name, (cfg, cls) in encoders.items():
        clip = clip_config(cfg)
        clip.architectures = [cls]
        (out / name).mkdir(exist_ok=True)
        clip.to_json_file(str(out / name / "config.json"))
        index[name] = ["transformers", cls]
        tok = "tokenizer" + name.removeprefix("text_encoder")
        (out / tok).mkdir(exist_ok=True)
        for f in tokenizer_dir.iterdir():
            (out / tok / f.name).write_bytes(f.read_bytes())
        (out / tok / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 77, "pad_token": "<|endoftext|>" if cfg.pad_id == 49407 else "!"}))
        index[tok] = ["transformers", "CLIPTokenizer"]
    if family == "sdxl-refiner":
        index["requires_aesthetics_score"] = True
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
         "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
         "timestep_spacing": "leading", "prediction_type": "epsilon"}))  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_single_file_loader_accepts_the_tiny_files(request, family, tmp_path,
                                                             clip_tokenizer_dir):  # noqa: F811
    path = _file(request, family)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionXLImg2ImgPipeline
    config = _config_folder(tmp_path, family, clip_tokenizer_dir)
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32)
    assert pipe.vae.config.scaling_factor == 0.13025
    ours = our_unet(path)
    g = torch.Generator().manual_seed(11)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    ctx = torch.randn(1, 77, ours.config.context_dim, generator=g)
    pooled = torch.randn(1, _pooled_dim(family), generator=g)
    ids = _diffusers_time_ids(family, pipe.unet, SIZES["original"], SIZES["crop"], SIZES["target"], SIZES["aesthetic"])
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        assert_close(ours(x, t, ctx, _our_y(family, ours.config, pooled, **SIZES)), ref.sample)
    with torch.no_grad():
        prompt_embeds, _, pooled_ref, _ = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
    _u, _v, text_l, text_g = sdxl_preset(family, "tiny")
    assert prompt_embeds.shape == (1, 77, ours.config.context_dim)
    assert pooled_ref.shape == (1, text_g.projection_dim)
