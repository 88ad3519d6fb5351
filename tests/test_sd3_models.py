"""SD3 / SD3.5 networks against diffusers on the same random weights: the MMDiT (SD3 Medium shape; SD3.5 with dual
attention and q/k RMS norm; a 2x2-patch 16-channel variant), the Stability <-> diffusers key rules and diffusers'
own single-file loader, and the 16-channel VAE without quant convs.

The weights are drawn in OUR (Stability single-file) layout, every tensor random (norm scales around 1, adaLN and
pos_embed included), then converted for diffusers by sdcli/formats/sd3_layouts.py; diffusers' from_single_file
reading the same tensors from a safetensors file must build the same module, so the rules are checked by an
independent converter. The MMDiT is bit-identical to diffusers in fp32 (same operations in the same order).
The VAE (models/vae.py, unchanged but for the missing quant convs) is compared through diffusers' own LDM converter
within 1e-5 relative, as tests/test_models.py does for the 4-channel one: its mid-block attention runs 1x1
convolutions where diffusers runs Linear layers, and the sums round differently (measured ~4e-7 relative).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from sdcli.runtime.errors import BadInputError, UnsupportedModelError
from sdcli.formats.sd3_layouts import diffusers_names, from_diffusers, to_diffusers
from sdcli.models.mmdit import PREFIX, MMDiT, MMDiTConfig, config_from_shapes
from sdcli.models.vae import AutoencoderKL, VAEConfig

# diffusers' tiny SD3 test configuration (tests/models/transformers/test_models_transformer_sd3.py)
TINY = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
            pos_embed_max_size=96)  # fmt: skip
VARIANTS = {
    "sd3": {},
    "sd35": dict(dual_attention_layers=(0,), qk_norm="rms_norm"),
    "patch2": dict(patch_size=2, in_channels=16, out_channels=16, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
}


def ours_config(kw: dict) -> MMDiTConfig:
    """The MMDiTConfig of a diffusers SD3Transformer2DModel configuration."""
    hidden = kw["num_attention_heads"] * kw["attention_head_dim"]
    return MMDiTConfig(depth=kw["num_layers"], hidden_size=hidden, num_heads=kw["num_attention_heads"],
                       patch_size=kw["patch_size"], in_channels=kw["in_channels"], out_channels=kw["out_channels"],
                       pos_embed_max_size=kw["pos_embed_max_size"], adm_in_channels=kw["pooled_projection_dim"],
                       context_dim=kw["joint_attention_dim"], mlp_hidden=4 * hidden,
                       dual_attention_layers=tuple(kw.get("dual_attention_layers", ())),
                       qk_norm=kw.get("qk_norm") is not None)  # fmt: skip


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        scale = 1.0 if k == "pos_embed" else 0.3 if v.dim() > 1 else 0.5
        state[k] = torch.randn(v.shape, generator=gen) * scale + (1.0 if ".ln_" in k else 0.0)
        assert state[k].std() > 0.1, k  # nothing constant: a wrong index or swap would show
    return state


def pair(variant: str, seed: int = 0) -> tuple[MMDiT, SD3Transformer2DModel, dict]:
    kw = {**TINY, **VARIANTS[variant]}
    ours = MMDiT(ours_config(kw)).eval()
    state = random_state(ours, seed)
    ours.load_state_dict(state, strict=True)
    ref = SD3Transformer2DModel(**kw).eval()
    ref.load_state_dict(to_diffusers(state, ours.config.depth), strict=True)
    return ours, ref, state


def inputs(cfg: MMDiTConfig, seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    p = cfg.patch_size
    x = torch.randn(2, cfg.in_channels, 8 * p, 6 * p, generator=gen)  # not square: h and w must not swap
    t = torch.tensor([999.0, 137.5])  # sigma * 1000, fractional
    context = torch.randn(2, 7, cfg.context_dim, generator=gen)
    y = torch.randn(2, cfg.adm_in_channels, generator=gen)
    return x, t, context, y


def run_ref(ref: SD3Transformer2DModel, x, t, context, y, **kw) -> torch.Tensor:
    return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=y, timestep=t, **kw).sample


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mmdit_matches_diffusers_bit_for_bit(variant):
    ours, ref, _ = pair(variant)
    x, t, context, y = inputs(ours.config)
    with torch.no_grad():
        want = run_ref(ref, x, t, context, y)
        got = ours(x, t, context, y)
        skipped = ours(x, t, context, y, skip_layers=(1,))
        want_skipped = run_ref(ref, x, t, context, y, skip_layers=[1])
    assert want.abs().max() > 1.0 and got.shape == x.shape
    assert torch.equal(got, want)
    assert torch.equal(skipped, want_skipped) and not torch.equal(skipped, got)


def test_mmdit_rejects_bad_latent_sizes():
    ours, _, _ = pair("patch2")
    x, t, context, y = inputs(ours.config)
    with pytest.raises(BadInputError, match="multiple of 2"):
        ours(x[..., :-1], t, context, y)
    with pytest.raises(BadInputError, match="at most 192"):
        ours(torch.zeros(1, 16, 194, 8), t[:1], context[:1], y[:1])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_shapes_and_key_rules(variant):
    ours, ref, state = pair(variant)
    shapes = {PREFIX + k: tuple(v.shape) for k, v in state.items()}
    assert config_from_shapes(shapes, head_dim=8) == ours.config
    theirs = ref.state_dict()
    converted = to_diffusers(state, ours.config.depth)
    assert set(converted) == set(theirs)  # every diffusers tensor made, none left over
    back = from_diffusers(theirs, list(state), ours.config.depth)
    assert all(torch.equal(back[k], state[k]) for k in state)


# Stability's released shapes (diffusers' configs of the hub repositories), built on the meta device.
FULL = {
    "sd3_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd35_medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                        dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd35_large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                       qk_norm="rms_norm"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FULL))
def test_full_size_key_lists_match_diffusers(name):
    kw = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
              joint_attention_dim=4096, pooled_projection_dim=2048, **FULL[name])  # fmt: skip
    with torch.device("meta"):
        ours = MMDiT(ours_config(kw))
        ref = SD3Transformer2DModel(**kw)
    shapes = {PREFIX + k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert config_from_shapes(shapes) == ours.config  # head_dim 64: the released rule
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mapped = {}
    for key, shape in shapes.items():
        names, op = diffusers_names(key[len(PREFIX) :], ours.config.depth)
        parts = [(shape[0] // 3, *shape[1:])] * 3 if op == "qkv" else [shape]
        mapped.update(zip(names, parts))
    assert mapped == theirs


def test_config_from_shapes_refuses_unknown_options():
    ours, _, state = pair("sd35")
    shapes = {PREFIX + k: tuple(v.shape) for k, v in state.items()}
    with pytest.raises(UnsupportedModelError, match="register"):
        config_from_shapes({**shapes, PREFIX + "register": (1, 4, 32)}, head_dim=8)
    with pytest.raises(BadInputError, match="pos_embed"):
        config_from_shapes({k: v for k, v in shapes.items() if k != PREFIX + "pos_embed"}, head_dim=8)


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_diffusers_single_file_loader_agrees_with_our_rules(variant, tmp_path):
    """diffusers reads a Stability-layout file with its own converter: the module it builds holds exactly the
    tensors our rules produce (config from a local folder, local_files_only: nothing is downloaded)."""
    ours, ref, state = pair(variant)
    ref.save_config(tmp_path)
    path = tmp_path / "sd3.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = SD3Transformer2DModel.from_single_file(str(path), config=str(tmp_path), local_files_only=True,
                                                    torch_dtype=torch.float32)  # fmt: skip
    theirs, rules = loaded.state_dict(), to_diffusers(state, ours.config.depth)
    assert set(theirs) == set(rules)
    assert all(torch.equal(theirs[k], rules[k]) for k in rules)


# --- the 16-channel VAE -------------------------------------------------------------------------------------------

VAE16 = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, use_quant_conv=False,
                  scale_factor=1.5305)  # fmt: skip


def test_vae16_matches_diffusers():
    ours = AutoencoderKL(VAE16).eval()
    assert not any("quant_conv" in k for k in ours.state_dict())  # SD3 / Flux VAEs have none
    gen = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
             for k, v in ours.state_dict().items()}  # fmt: skip
    ours.load_state_dict(state, strict=True)
    config = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                  scaling_factor=1.5305, shift_factor=0.0609)  # fmt: skip
    ref = DiffusersVAE(**config).eval()
    ref.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    image = torch.rand(1, 3, 32, 24, generator=gen) * 2 - 1
    z = torch.randn(1, 16, 5, 3, generator=gen)
    with torch.no_grad():
        mean, logvar = ours.encode(image)
        dist = ref.encode(image).latent_dist
        decoded, want = ours.decode(z), ref.decode(z).sample
    assert mean.shape == (1, 16, 16, 12) and decoded.shape == (1, 3, 10, 6)
    for a, b in ((mean, dist.mean), (logvar, dist.logvar), (decoded, want)):
        assert b.abs().max() > 1.0
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()  # measured ~4e-7: see the module docstring


def test_vae_with_quant_conv_unchanged():
    """SD1/SDXL configs keep their quant convs (the default)."""
    cfg = dataclasses.replace(VAE16, z_channels=4, embed_dim=4, use_quant_conv=True)
    keys = AutoencoderKL(cfg).state_dict()
    assert {"quant_conv.weight", "post_quant_conv.weight"} <= set(keys)
