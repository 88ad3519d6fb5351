"""GGUF files of one part beside a model: stable-diffusion.cpp's SD2 whole-model files (their OpenCLIP text tower)
and a VAE given with --vae as a GGUF file.

- SD2: stable-diffusion.cpp writes OpenCLIP ViT-H under transformers names (cond_stage_model.transformer.text_model.,
  fused ``self_attn.in_proj``, OpenCLIP's bare ``text_projection``) and keeps EVERY layer, skipping the last at run
  time; older sd.cpp split in_proj into q/k/v first. Both files (made here from the tiny SD2 exactly as its
  name_conversion.cpp names them) must build the text encoder an SD2 safetensors file builds: the last layer
  dropped (SD2 conditions on the penultimate), the same weights; they render the bytes of sdcli's own GGUF of the
  same checkpoint (Q8_0 quantizes rows independently, so fused or split q/k/v give the same blocks).
- --vae x.gguf: F16/F32 (stable-diffusion.cpp and city96's usual VAE types) renders the bytes of the same
  weights as a safetensors VAE; a quantized one (Q8_0, kernels as 256-wide rows) is dequantized at load and renders
  the bytes of its dequantized weights; a type sdcli cannot dequantize is exit 8 naming it, nothing written.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _cli import invoker, pixels
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd2  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir  # noqa: F401
from sdcli.loading.checkpoint import load_models
from sdcli.quant.layers import holds_blocks
from sdcli.quant.quantize import write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

RENDER = ["--steps", "2", "-W", "64", "-H", "64", "--sampler", "euler", "--cfg", "5", "--seed", "7"]
# stable-diffusion.cpp name_conversion.cpp convert_open_clip_to_hf_clip_name, as data (OpenCLIP -> its names)
SDCPP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight", "text_projection": "text_projection",
             "positional_embedding": "embeddings.position_embedding.weight",
             "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}  # fmt: skip
SDCPP_BLOCK = {"attn.in_proj_weight": "self_attn.in_proj.weight", "attn.in_proj_bias": "self_attn.in_proj.bias",
               "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
               "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias", "ln_2.weight": "layer_norm2.weight",
               "ln_2.bias": "layer_norm2.bias", "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
               "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}  # fmt: skip
SDCPP_UNUSED = ("logit_scale", "position_ids")  # model.cpp unused_tensors: its converter leaves them out
OPENCLIP, SDCPP = "cond_stage_model.model.", "cond_stage_model.transformer.text_model."


def _render(tmp_path: Path, model: Path, *args: str, name: str, expect: int = 0) -> np.ndarray | None:
    png = tmp_path / f"{name}.png"
    invoker({})("generate", "a red fox", "-m", str(model), *RENDER, "-o", str(png), *args, expect=expect)
    if expect:
        assert not png.exists()
        return None
    return pixels(png)


# --- stable-diffusion.cpp's SD2 ----------------------------------------------------------------------------------

def _sdcpp_sd2(state: dict, split: bool) -> dict:
    """The checkpoint as stable-diffusion.cpp names an SD2 file: its OpenCLIP tower in transformers names, every
    layer kept; with `split`, in_proj as q_proj/k_proj/v_proj (its older converter)."""
    out = {}
    for k, v in state.items():
        if k.endswith(SDCPP_UNUSED):
            continue
        name = k.removeprefix(OPENCLIP)
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
        if not k.startswith(OPENCLIP) or (name not in SDCPP_TOP and not m):
            out[k] = v
        elif name in SDCPP_TOP:
            out[SDCPP + SDCPP_TOP[name]] = v
        elif split and "in_proj" in m.group(2):
            leaf = m.group(2).rsplit("_", 1)[1]  # weight / bias
            for part, chunk in zip("qkv", v.chunk(3)):
                out[f"{SDCPP}encoder.layers.{m.group(1)}.self_attn.{part}_proj.{leaf}"] = chunk.contiguous()
        else:
            out[f"{SDCPP}encoder.layers.{m.group(1)}.{SDCPP_BLOCK[m.group(2)]}"] = v
    return out


@pytest.fixture(scope="module")
def sd2_files(tiny_sd2, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("sd2_gguf")
    ours = folder / "sd2-q8_0.gguf"
    invoker({})("convert", str(tiny_sd2), "-o", str(ours), "--quantize", "q8_0")
    state = load_file(tiny_sd2)
    files = {"ours": ours}
    for split in (False, True):
        files[split] = folder / f"sd2-sdcpp-{'split' if split else 'fused'}.gguf"
        write_gguf(files[split], _sdcpp_sd2(state, split), "q8_0")
    return files


def test_sdcpp_sd2_text_encoder_drops_the_last_layer(sd2_files, tiny_sd2):  # noqa: F811
    stored = len({m.group(1) for k in load_file(tiny_sd2) if (m := re.match(r".*resblocks\.(\d+)\.", k))})
    assert stored == 3  # the tiny SD2 file holds one layer more than SD2 uses, as the real one (24 vs 23)
    reference = load_models(sd2_files["ours"]).text_encoders[0]
    assert reference.config.num_layers == stored - 1
    for split in (False, True):
        names = [t.name for t in gguf.GGUFReader(sd2_files[split]).tensors]
        assert f"{SDCPP}encoder.layers.{stored - 1}.mlp.fc1.weight" in names  # every layer is in the file
        assert any(("q_proj" if split else "in_proj") in n for n in names)
        encoder = load_models(sd2_files[split]).text_encoders[0]
        assert encoder.config == reference.config
        assert any(holds_blocks(m) for m in encoder.modules())
        ours, theirs = _weights(reference), _weights(encoder)
        assert ours.keys() == theirs.keys()
        assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as float32 values, quantized layers' blocks dequantized (our fused in_proj is split at load,
    so dequantized there; sd.cpp's split q/k/v keep their blocks)."""
    out = {k: v.float() for k, v in module.state_dict().items()}
    for name, m in module.named_modules():
        if holds_blocks(m):
            out[f"{name}.weight"] = m.dequantized_weight(torch.float32)
    return out


def test_sdcpp_sd2_renders_what_our_gguf_renders(sd2_files, tmp_path):
    """--prediction v: sd.cpp's files carry no prediction metadata (ours keeps the checkpoint's); the probe on a
    random UNet is no test of the text encoder."""
    mine = _render(tmp_path, sd2_files["ours"], "--prediction", "v", name="ours")
    assert np.array_equal(mine, _render(tmp_path, sd2_files[False], "--prediction", "v", name="sdcpp"))


def test_sdcpp_sdxl_with_fused_in_proj_renders_what_our_gguf_renders(tiny_sdxl, tmp_path):  # noqa: F811
    """Current stable-diffusion.cpp keeps bigG's in_proj fused (self_attn.in_proj) in its SDXL files, beside its
    other names (both encoders under cond_stage_model., the projection bare, in OpenCLIP's orientation)."""
    rules = "text_projection=f32,proj_in=f32,proj_out=f32"  # what the layouts store differently stays float
    ours = tmp_path / "ours.gguf"
    invoker({})("convert", str(tiny_sdxl), "-o", str(ours), "--quantize", "q8_0", "--tensor-type-rules", rules)
    state = load_file(tiny_sdxl)
    out = {k: v for k, v in state.items() if not k.startswith("conditioner.")}
    big_g = "conditioner.embedders.1.model."
    for k, v in state.items():
        if k.endswith(SDCPP_UNUSED):
            continue
        if k.startswith("conditioner.embedders.0.transformer."):  # CLIP-L: transformers names already
            out[k.replace("conditioner.embedders.0.", "cond_stage_model.", 1)] = v
        elif k.startswith(big_g):
            name = k.removeprefix(big_g)
            m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
            new = SDCPP_TOP.get(name) or (f"encoder.layers.{m.group(1)}.{SDCPP_BLOCK[m.group(2)]}" if m else None)
            out[f"cond_stage_model.1.transformer.text_model.{new}"] = v
    assert any("self_attn.in_proj.weight" in k for k in out) and not any(k.startswith("conditioner.") for k in out)
    theirs = tmp_path / "sdcpp.gguf"
    from sdcli.quant.quantize import parse_type_rules

    write_gguf(theirs, out, "q8_0", rules=parse_type_rules(rules))
    assert np.array_equal(_render(tmp_path, ours, name="ours"), _render(tmp_path, theirs, name="sdcpp"))


# --- --vae x.gguf --------------------------------------------------------------------------------------------------

def _vae_state(tiny_sd1: Path) -> dict:  # noqa: F811
    """The tiny SD1's VAE under its bare LDM names (vae-ft-mse's, and what sd.cpp writes for a VAE alone)."""
    return {k.removeprefix("first_stage_model."): v for k, v in load_file(tiny_sd1).items()
            if k.startswith("first_stage_model.")}  # fmt: skip


def test_float_vae_gguf_renders_the_safetensors_bytes(tiny_sd1, tmp_path):  # noqa: F811
    state = {k: v.half() for k, v in _vae_state(tiny_sd1).items()}
    st, gg = tmp_path / "vae-f16.safetensors", tmp_path / "vae-f16.gguf"
    save_file(state, str(st))
    types = write_gguf(gg, state, "f16")
    assert {"F16", "F32"} >= set(types.values()) and "F16" in types.values()
    a = _render(tmp_path, tiny_sd1, "--vae", str(st), name="st")
    assert np.array_equal(a, _render(tmp_path, tiny_sd1, "--vae", str(gg), name="gg"))


def _type_offset(path: Path, name: str) -> int:
    """Byte offset of tensor `name`'s ggml type id in the file's tensor info (after its name and dimensions)."""
    field = next(t for t in gguf.GGUFReader(path).tensors if t.name == name).field
    return field.offset + 8 + len(name.encode()) + 4 + 8 * len(field.parts[3])


def test_quantized_vae_gguf_is_dequantized_at_load(tiny_sd1, tmp_path):  # noqa: F811
    state = _vae_state(tiny_sd1)
    gg, deq = tmp_path / "vae-q8_0.gguf", tmp_path / "vae-q8_0-deq.safetensors"
    types = write_gguf(gg, state, "q8_0", convs=True)  # bare names: the VAE rule does not apply; convs as rows
    quantized = [k for k, t in types.items() if t == "Q8_0"]
    assert len(quantized) >= 10
    reader = {t.name: t for t in gguf.GGUFReader(gg).tensors}
    values = {k: torch.from_numpy(gguf.quants.dequantize(np.array(reader[k].data), reader[k].tensor_type).copy())
              .reshape(v.shape) if k in quantized else v for k, v in state.items()}  # fmt: skip
    save_file(values, str(deq))
    vae = load_models(tiny_sd1, vae=gg).vae
    assert not any(holds_blocks(m) for m in vae.modules())  # plain weights: dequantized once, at load
    k = quantized[0]
    assert torch.equal(vae.state_dict()[k], values[k]) and not torch.equal(values[k], state[k])
    a = _render(tmp_path, tiny_sd1, "--vae", str(deq), name="deq")
    assert np.array_equal(a, _render(tmp_path, tiny_sd1, "--vae", str(gg), name="q8"))
    # a type sdcli has no dequantizer for (ggml's retired Q4_0_4_4, id 31: Q4_0's block size, so the header holds)
    q4 = tmp_path / "vae-q4_0.gguf"
    types = write_gguf(q4, state, "q4_0", convs=True)
    victim = next(k for k, t in types.items() if t == "Q4_0")
    raw = bytearray(q4.read_bytes())
    at = _type_offset(q4, victim)
    assert int.from_bytes(raw[at:at + 4], "little") == 2  # Q4_0
    raw[at:at + 4] = (31).to_bytes(4, "little")
    bad = tmp_path / "vae-retired.gguf"
    bad.write_bytes(bytes(raw))
    result = invoker({})("generate", "a red fox", "-m", str(tiny_sd1), *RENDER, "-o", str(tmp_path / "bad.png"),
                         "--vae", str(bad), expect=8)  # fmt: skip
    assert "Q4_0_4_4" in result.stderr and not (tmp_path / "bad.png").exists()
