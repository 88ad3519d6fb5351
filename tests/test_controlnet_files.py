"""ControlNet files: every layout detected from its names and loaded strictly to the same weights; other
ControlNet-like files refused by name (exit 8); a ControlNet that does not fit the model refused (exit 3)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from make_checkpoint import CONTROLNET_LAYOUTS, PRESETS, controlnet_config, controlnet_state_dict, make_controlnet
from safetensors.torch import save_file

from sdcli.control.files import check_fits, describe, detect_controlnet, load_controlnet
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, UnsupportedModelError


def _name(layout: str) -> str:
    return {"diffusers-folder": "cn", "pth": "cn.pth"}.get(layout, "cn.safetensors")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_layout_loads_the_same_weights(tmp_path, family):
    cfg = controlnet_config(family)
    expected = controlnet_state_dict(cfg, seed=3)
    for layout in CONTROLNET_LAYOUTS:
        path = make_controlnet(tmp_path / layout / _name(layout), family, layout=layout, seed=3)
        model, info = load_controlnet(path, cfg.unet)
        assert info.config == cfg, layout
        assert info.layout == ("original" if layout == "pth" else layout)
        state = model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), layout


def test_config_from_shapes_alone(tmp_path):
    """Without a base model the head split follows the family rule; everything else comes from shapes."""
    path = make_controlnet(tmp_path / "cn.safetensors", "sdxl")
    info, source = detect_controlnet(path)
    source.close()
    cfg = controlnet_config("sdxl")
    assert info.config.unet.head_dim == 64  # SDXL's rule (the tiny model's 16 is invisible in shapes)
    assert replace(info.config.unet, head_dim=cfg.unet.head_dim) == cfg.unet
    assert info.config.hint_widths == (8, 8, 16, 16) and info.config.hint_channels == 3


def test_dtype_and_describe(tmp_path):
    path = make_controlnet(tmp_path / "cn.safetensors", "sd1")
    model, info = load_controlnet(path, controlnet_config("sd1").unet, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    text = "\n".join(describe(info))
    assert "ControlNet for" in text and "6 down residuals + 1 middle" in text and "original layout" in text


def test_shuffle_pooling_from_name_and_config(tmp_path):
    path = make_controlnet(tmp_path / "control_v11e_sd15_shuffle.safetensors", "sd1")
    base = controlnet_config("sd1").unet
    assert load_controlnet(path, base)[1].config.global_pool
    assert not load_controlnet(make_controlnet(tmp_path / "canny.safetensors", "sd1"), base)[1].config.global_pool
    folder = make_controlnet(tmp_path / "folder", "sd1", layout="diffusers-folder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True,
                                                    "controlnet_conditioning_channel_order": "bgr"}))  # fmt: skip
    info = load_controlnet(folder, base)[1]
    assert info.config.global_pool and info.bgr


def test_controlnet_1_0_pth_with_a_whole_model_inside(tmp_path):
    state = {"control_model." + k: t for k, t in controlnet_state_dict(controlnet_config("sd1")).items()}
    state |= {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2), "betas": torch.zeros(3)}
    torch.save({"state_dict": state}, tmp_path / "control_sd15_canny.pth")
    model, info = load_controlnet(tmp_path / "control_sd15_canny.pth", controlnet_config("sd1").unet)
    assert info.skipped == 2


def _with(tmp_path, extra: dict, drop: str | None = None, name: str = "x.safetensors"):
    state = controlnet_state_dict(controlnet_config("sd1"))
    state = {k: t for k, t in state.items() if drop is None or not k.startswith(drop)}
    path = tmp_path / name
    save_file(state | extra, str(path))
    return path


@pytest.mark.parametrize(("extra", "named"), [
    ({"lora_controlnet": torch.zeros(0)}, "Control-LoRA"),
    ({"input_blocks.1.0.in_layers.2.up": torch.zeros(2, 2)}, "Control-LoRA"),
    ({"difference": torch.zeros(0)}, "difference ControlNet"),
    ({"control_add_embedding.linear_1.weight": torch.zeros(2, 2)}, "ControlNet-Union"),
])  # fmt: skip
def test_lookalikes_are_refused_by_name(tmp_path, extra, named):
    with pytest.raises(UnsupportedModelError, match=named) as e:
        load_controlnet(_with(tmp_path, extra))
    assert e.value.exit_code == 8


@pytest.mark.parametrize(("keys", "named"), [
    (["adapter.body.0.resnets.0.block1.weight", "adapter.conv_in.weight"], "T2I-Adapter"),
    (["body.0.block1.weight", "conv_in.weight"], "T2I-Adapter"),
    (["lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight"], "LLLite"),
    (["controlnet_blocks.0.weight", "pos_embed_input.proj.weight"], "SD3 / Flux"),
])  # fmt: skip
def test_other_kinds_are_refused_by_name(tmp_path, keys, named):
    save_file({k: torch.zeros(2, 2) for k in keys}, str(tmp_path / "a.safetensors"))
    with pytest.raises(UnsupportedModelError, match=named):
        load_controlnet(tmp_path / "a.safetensors")


def test_head_split_that_cannot_be_guessed(tmp_path):
    """Tiny SD1 (context 64, 32 channels) with no base model: 64-wide heads do not fit; said, not misbuilt."""
    with pytest.raises(BadInputError, match="does not split into heads"):
        load_controlnet(make_controlnet(tmp_path / "cn.safetensors", "sd1"))


def test_not_a_controlnet(tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(BadInputError, match="Stable Diffusion checkpoint, not a ControlNet"):
        load_controlnet(tmp_path / "sd.safetensors")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(BadInputError, match="not a ControlNet"):
        load_controlnet(tmp_path / "foo.safetensors")
    with pytest.raises(ModelNotFoundError):
        load_controlnet(tmp_path / "absent.safetensors")
    (tmp_path / "folder").mkdir()
    with pytest.raises(BadInputError, match="no config.json"):
        load_controlnet(tmp_path / "folder")


def test_strict_loading_names_missing_and_unexpected(tmp_path):
    with pytest.raises(BadInputError, match=r"missing: zero_convs\.3\.0\.bias") as e:
        load_controlnet(_with(tmp_path, {}, drop="zero_convs.3.0.bias"), controlnet_config("sd1").unet)
    assert e.value.exit_code == 3
    with pytest.raises(BadInputError, match="unexpected: zero_convs.9.0.weight"):
        load_controlnet(_with(tmp_path, {"zero_convs.9.0.weight": torch.zeros(1)}, name="y.safetensors"),
                        controlnet_config("sd1").unet)


def test_wrong_family_is_refused_before_reading_weights(tmp_path):
    sdxl = make_controlnet(tmp_path / "xl.safetensors", "sdxl")
    sd1_unet = PRESETS[("sd1", "tiny")][0]
    real_sd15 = replace(sd1_unet, context_dim=768)
    real_xl = replace(controlnet_config("sdxl").unet, adm_in_channels=2816, context_dim=2048)
    info, source = detect_controlnet(sdxl)
    source.close()
    with pytest.raises(BadInputError, match="an SDXL ControlNet with an SD1.5 model") as e:
        check_fits(replace(info, config=replace(info.config, unet=real_xl), family="SDXL"), real_sd15)
    assert e.value.exit_code == 3
    with pytest.raises(BadInputError, match="ControlNet with a context width 64 model"):
        load_controlnet(sdxl, sd1_unet)


def test_channel_mismatch_is_refused(tmp_path):
    path = make_controlnet(tmp_path / "cn.safetensors", "sd1")
    base = controlnet_config("sd1").unet
    with pytest.raises(BadInputError, match="does not match"):
        load_controlnet(path, replace(base, channel_mult=(1, 2, 2)))
    with pytest.raises(BadInputError, match="latent channels"):
        load_controlnet(path, replace(base, out_channels=8))
