"""ControlNet network (sdcli/models/controlnet.py) and the UNet's `control=` input against diffusers'
ControlNetModel + UNet2DConditionModel(down_block_additional_residuals=...) on the same random weights.

Every parameter is random, the zero convolutions included (diffusers' ControlNetModel.from_unet leaves them at
zero, which would make the residuals vanish and the test blind)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from make_checkpoint import (
    _invert,
    _meta_shapes,
    _random,
    controlnet_config,
    controlnet_diffusers_config,
    controlnet_state_dict,
    controlnet_to_diffusers,
    make_controlnet,
    unet_diffusers_config,
)

from sdcli.formats.diffusers import rename, unet_prefix_pairs
from sdcli.models.controlnet import ControlNet, scale_residuals, sum_residuals, uncond_zeros, unit_active
from sdcli.models.unet import UNetModel, sdxl_vector

FAMILIES = ["sd1", "sdxl"]
SDXL_POOLED = 40  # tiny SDXL: y = pooled 40 + 6 size values x 8


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} vs max |ref| {scale:.3g}"


def _unet_pair(family: str, seed: int = 1) -> tuple[UNetModel, UNet2DConditionModel]:
    """Our UNet and diffusers' with the same random weights (LDM -> diffusers by loading/checkpoint.py's table)."""
    cfg = controlnet_config(family).unet
    ours = UNetModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    shapes = _meta_shapes(ours, "")
    state = {k: _random(k, shapes[k], gen) for k in sorted(shapes)}
    ours.load_state_dict(state, strict=True)
    table = _invert(unet_prefix_pairs(len(cfg.channel_mult), cfg.num_res_blocks, cfg.attention_levels))
    table |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
    pooled_dim = None
    if family == "sdxl":
        diff_cfg = controlnet_diffusers_config(controlnet_config(family))
        pooled_dim = diff_cfg["projection_class_embeddings_input_dim"] - 6 * diff_cfg["addition_time_embed_dim"]
    config = unet_diffusers_config(cfg, family, pooled_dim)
    if family == "sdxl":
        config |= {k: diff_cfg[k] for k in ("addition_embed_type", "addition_time_embed_dim",
                                            "projection_class_embeddings_input_dim", "attention_head_dim",
                                            "transformer_layers_per_block")}  # fmt: skip
    ref = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ref.load_state_dict({rename(k, table): t for k, t in state.items()}, strict=True)
    return ours, ref


def _controlnet_pair(family: str, seed: int = 2) -> tuple[ControlNet, ControlNetModel]:
    cfg = controlnet_config(family)
    state = controlnet_state_dict(cfg, seed)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(state, strict=True)
    config = controlnet_diffusers_config(cfg)
    ref = ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(controlnet_to_diffusers(state, cfg), strict=True)
    assert all(p.abs().sum() > 0 for p in ref.parameters()), "a zero parameter would hide a mix-up"
    return ours, ref


def _inputs(family: str, batch: int = 2, hw: tuple[int, int] = (8, 6)) -> dict:
    cfg = controlnet_config(family).unet
    gen = torch.Generator().manual_seed(3)
    h, w = hw
    out = dict(x=torch.randn(batch, 4, h, w, generator=gen), hint=torch.rand(batch, 3, 8 * h, 8 * w, generator=gen),
               t=torch.tensor([999.0, 321.5][:batch]), ctx=torch.randn(batch, 7, cfg.context_dim, generator=gen))  # fmt: skip
    if family == "sdxl":
        out["pooled"] = torch.randn(batch, SDXL_POOLED, generator=gen)
        out["time_ids"] = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0], [80.0, 40.0, 8.0, 4.0, 64.0, 48.0]][:batch])
        out["y"] = sdxl_vector(out["pooled"], out["time_ids"], cfg.adm_in_channels)
    return out


def _ref_kwargs(family: str, inp: dict) -> dict:
    if family != "sdxl":
        return {}
    return {"added_cond_kwargs": {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("scale", "guess"), [(1.0, False), (0.5, False), (1.3, True)])
def test_residuals_match_diffusers(family, scale, guess):
    ours, ref = _controlnet_pair(family)
    inp = _inputs(family)
    with torch.no_grad():
        down, mid = scale_residuals(ours(inp["x"], inp["hint"], inp["t"], inp["ctx"], inp.get("y")), scale, guess)
        rdown, rmid = ref(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], controlnet_cond=inp["hint"],
                          conditioning_scale=scale, guess_mode=guess, return_dict=False, **_ref_kwargs(family, inp))  # fmt: skip
    assert len(down) == len(rdown) == (6 if family == "sd1" else 9)
    for a, b in zip([*down, mid], [*rdown, rmid]):
        assert a.shape == b.shape
        assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_controlled_unet_matches_diffusers(family):
    """Residuals enter the skip connections and the middle output exactly as diffusers adds them."""
    cn, ref_cn = _controlnet_pair(family)
    unet, ref_unet = _unet_pair(family)
    inp = _inputs(family)
    kw = _ref_kwargs(family, inp)
    with torch.no_grad():
        control = scale_residuals(cn(inp["x"], inp["hint"], inp["t"], inp["ctx"], inp.get("y")), 0.8)
        ours = unet(inp["x"], inp["t"], inp["ctx"], inp.get("y"), control=control)
        plain = unet(inp["x"], inp["t"], inp["ctx"], inp.get("y"))
        rdown, rmid = ref_cn(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], controlnet_cond=inp["hint"],
                             conditioning_scale=0.8, return_dict=False, **kw)  # fmt: skip
        ref = ref_unet(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], down_block_additional_residuals=rdown,
                       mid_block_additional_residual=rmid, **kw).sample  # fmt: skip
    assert_close(ours, ref)
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max(), "the ControlNet must change the prediction"


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_zero_equals_no_controlnet_exactly(family):
    cn, _ = _controlnet_pair(family)
    unet, _ = _unet_pair(family)
    inp = _inputs(family)
    args = (inp["x"], inp["t"], inp["ctx"], inp.get("y"))
    with torch.no_grad():
        zero = scale_residuals(cn(inp["x"], inp["hint"], inp["t"], inp["ctx"], inp.get("y")), 0.0)
        assert torch.equal(unet(*args, control=zero), unet(*args))
        assert torch.equal(unet(*args, control=None), unet(*args))


def test_any_latent_size_and_batch_one():
    cn, ref = _controlnet_pair("sd1")
    inp = _inputs("sd1", batch=1, hw=(9, 7))  # odd sides: the hint 72x56 comes down to 9x7 exactly
    with torch.no_grad():
        down, mid = cn(inp["x"], inp["hint"], inp["t"], inp["ctx"])
        rdown, rmid = ref(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], controlnet_cond=inp["hint"],
                          return_dict=False)  # fmt: skip
    for a, b in zip([*down, mid], [*rdown, rmid]):
        assert_close(a, b)
    with pytest.raises(ValueError, match="8x the latent"):
        cn(inp["x"], inp["hint"][..., :-8], inp["t"], inp["ctx"])


def test_global_pool_matches_diffusers_shuffle_model():
    """Shuffle models pool every residual spatially; in guess mode diffusers then scales them plainly."""
    cfg = controlnet_config("sd1")
    from dataclasses import replace

    cfg = replace(cfg, global_pool=True)
    state = controlnet_state_dict(cfg, 5)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(state)
    config = {k: v for k, v in controlnet_diffusers_config(cfg).items() if not k.startswith("_")}
    ref = ControlNetModel(**config).eval()
    ref.load_state_dict(controlnet_to_diffusers(state, cfg))
    inp = _inputs("sd1")
    with torch.no_grad():
        down, mid = scale_residuals(ours(inp["x"], inp["hint"], inp["t"], inp["ctx"]), 0.7, True, global_pool=True)
        rdown, rmid = ref(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], controlnet_cond=inp["hint"],
                          conditioning_scale=0.7, guess_mode=True, return_dict=False)  # fmt: skip
    for a, b in zip([*down, mid], [*rdown, rmid]):
        assert a.shape[-2:] == (1, 1)
        assert_close(a, b)


def test_several_units_add_up():
    a, _ = _controlnet_pair("sd1", seed=2)
    b, _ = _controlnet_pair("sd1", seed=7)
    inp = _inputs("sd1")
    with torch.no_grad():
        ra, rb = (m(inp["x"], inp["hint"], inp["t"], inp["ctx"]) for m in (a, b))
    total = sum_residuals(sum_residuals(None, ra), rb)
    for s, x, y in zip([*total[0], total[1]], [*ra[0], ra[1]], [*rb[0], rb[1]]):
        assert torch.equal(s, x + y)


def test_guess_mode_pads_the_uncond_half_with_zeros():
    down, mid = uncond_zeros(([torch.ones(1, 2, 3, 3)], torch.full((1, 4, 1, 1), 2.0)))
    assert down[0].shape == (2, 2, 3, 3) and mid.shape == (2, 4, 1, 1)
    assert down[0][0].abs().sum() == 0 and torch.equal(down[0][1], torch.ones(2, 3, 3))
    assert mid[0].abs().sum() == 0 and bool((mid[1] == 2).all())


def _diffusers_keep(steps: int, start: float, end: float) -> list[bool]:
    """pipeline_controlnet.py's controlnet_keep, as written there."""
    return [1.0 - float(i / steps < start or (i + 1) / steps > end) == 1.0 for i in range(steps)]


@pytest.mark.parametrize(("steps", "start", "end"), [(10, 0.2, 0.7), (20, 0.0, 0.5), (7, 0.3, 1.0), (3, 0.0, 0.0)])
def test_start_end_follow_diffusers(steps, start, end):
    assert [unit_active(i, steps, start, end) for i in range(steps)] == _diffusers_keep(steps, start, end)


def test_end_half_runs_ten_of_twenty_steps():
    assert sum(unit_active(i, 20, 0.0, 0.5) for i in range(20)) == 10  # A1111 runs 11 (documented difference)


@pytest.mark.parametrize("family", FAMILIES)
def test_original_file_through_diffusers_single_file_loader(tmp_path, monkeypatch, family):
    """Our original-layout file, read by diffusers' own converter, gives our residuals: an independent check
    of the names. diffusers' convert_controlnet_checkpoint forgets label_emb (SDXL), so those 4 keys are
    mapped by hand here, as the reference doc records."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    from sdcli.control.files import load_controlnet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the config is local: nothing may be fetched
    path = make_controlnet(tmp_path / "cn.safetensors", family, seed=4)
    cfg = controlnet_config(family)
    config = {k: v for k, v in controlnet_diffusers_config(cfg).items() if not k.startswith("_")}
    if family == "sd1":
        (tmp_path / "cfg").mkdir()
        (tmp_path / "cfg" / "config.json").write_text(json.dumps(config))
        ref = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "cfg"), local_files_only=True)
    else:
        ldm = load_file(str(path))
        converted = convert_controlnet_checkpoint(ldm, {"layers_per_block": cfg.unet.num_res_blocks})
        for i, j in ((0, 1), (2, 2)):
            for leaf in ("weight", "bias"):
                converted[f"add_embedding.linear_{j}.{leaf}"] = ldm[f"control_model.label_emb.0.{i}.{leaf}"]
        ref = ControlNetModel(**config)
        ref.load_state_dict(converted, strict=True)
    ours, _ = load_controlnet(path, cfg.unet)
    inp = _inputs(family)
    with torch.no_grad():
        down, mid = ours(inp["x"], inp["hint"], inp["t"], inp["ctx"], inp.get("y"))
        rdown, rmid = ref.eval()(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"], controlnet_cond=inp["hint"],
                                 return_dict=False, **_ref_kwargs(family, inp))  # fmt: skip
    for a, b in zip([*down, mid], [*rdown, rmid]):
        assert_close(a, b)
