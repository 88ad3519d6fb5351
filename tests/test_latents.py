"""Latent and embedding files: round trips, ComfyUI .latent semantics, and bad files."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdcli.runtime.errors import BadInputError, OutputError, UsageError
from sdcli.output.latents import load_embedding, load_latent, save_embedding, save_latent

SF = 0.18215


def _latent(n=2, h=6, w=5, seed=0):
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def _save(path, latent, scaled=True, **kw):
    args = dict(scaled=scaled, scale_factor=SF, family="sd1", source_size=(40, 48), model_hash="ab" * 32)
    args.update(kw)
    return save_latent(path, latent, **args)


def test_sdcli_round_trip(tmp_path):
    x = _latent()
    before = x.clone()
    path = _save(tmp_path / "a.safetensors", x)
    assert torch.equal(x, before)  # caller's tensor untouched
    f = load_latent(path)
    assert f.format == "sdcli" and f.scaled and f.scale_factor == SF
    assert (f.family, f.source_size, f.model_hash) == ("sd1", (40, 48), "ab" * 32)
    assert torch.equal(f.latent, x) and torch.equal(f.unet_space(), x)
    assert torch.allclose(f.vae_space(), x / SF)
    assert f.metadata["format"] == "sdcli.latent" and f.metadata["version"] == "1"


def test_sdcli_unscaled_round_trip(tmp_path):
    x = _latent()
    f = load_latent(_save(tmp_path / "u.safetensors", x, scaled=False, source_size=None, model_hash=None))
    assert not f.scaled and torch.equal(f.vae_space(), x)
    assert torch.allclose(f.unet_space(), x * SF)
    assert f.source_size is None and f.model_hash is None


def test_half_precision_input_stored_as_float32(tmp_path):
    x = _latent().half()
    f = load_latent(_save(tmp_path / "h.safetensors", x))
    assert f.latent.dtype == torch.float32 and torch.equal(f.latent, x.float())


def test_comfyui_file_layout_matches_comfyui(tmp_path):
    """What ComfyUI's LoadLatent would compute: samples = latent_tensor * (1 if marker else 1/0.18215),
    in ComfyUI's LATENT space, which is raw VAE space (process_in scales by the factor before sampling)."""
    x = _latent()  # UNet space
    path = _save(tmp_path / "c.latent", x, scaled=True)
    raw = load_file(path)
    assert set(raw) == {"latent_tensor", "latent_format_version_0"}
    comfy_samples = raw["latent_tensor"].float() * 1.0
    assert torch.allclose(comfy_samples, x / SF)
    f = load_latent(path)
    assert f.format == "comfyui" and not f.scaled
    assert torch.allclose(f.unet_space(), x, atol=1e-6)


def test_comfyui_file_written_by_comfyui(tmp_path):
    x = _latent()  # raw VAE-space samples, as ComfyUI's SaveLatent stores them
    path = tmp_path / "ComfyUI_00001_.latent"
    save_file({"latent_tensor": x, "latent_format_version_0": torch.tensor([])}, path,
              metadata={"prompt": json.dumps({"3": {}}), "workflow": "{}"})
    f = load_latent(path)
    assert f.format == "comfyui" and not f.scaled and f.scale_factor is None
    assert torch.equal(f.vae_space(), x)
    with pytest.raises(UsageError, match="scale factor"):
        f.unet_space()
    assert torch.allclose(f.unet_space(0.13025), x * 0.13025)


def test_comfyui_legacy_file_without_marker(tmp_path):
    x = _latent()
    path = tmp_path / "old.latent"
    save_file({"latent_tensor": x}, path)
    f = load_latent(path)
    assert f.format == "comfyui-legacy" and not f.scaled
    assert torch.allclose(f.vae_space(), x * (1.0 / SF))


def test_refuses_overwrite(tmp_path):
    path = _save(tmp_path / "a.safetensors", _latent())
    with pytest.raises(OutputError, match="exists"):
        _save(path, _latent(seed=1))
    _save(path, _latent(seed=1), overwrite=True)
    assert torch.equal(load_latent(path).latent, _latent(seed=1))


@pytest.mark.parametrize("shape", [(4, 8, 8), (1, 3, 8, 8), (1, 16, 8, 8), (1, 4, 2, 2, 2)])
def test_save_rejects_bad_shapes(tmp_path, shape):
    with pytest.raises(BadInputError, match="shape"):
        _save(tmp_path / "b.safetensors", torch.zeros(shape))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tensors", [
    {"latent": torch.zeros(4, 8, 8)},
    {"latent": torch.zeros(1, 3, 8, 8)},
    {"latent": torch.zeros(1, 4, 8, 8, dtype=torch.int32)},
    {"latent": torch.full((1, 4, 8, 8), float("nan"))},
    {"something_else": torch.zeros(1, 4, 8, 8)},
    {"latent_tensor": torch.zeros(1, 8, 8)},
])
def test_load_rejects_bad_tensors(tmp_path, tensors):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(BadInputError, match="bad.safetensors"):
        load_latent(path)


def test_load_rejects_an_embedding_as_latent(tmp_path):
    path = save_embedding(tmp_path / "e.safetensors", torch.zeros(1, 77, 8), prompt="p", family="sd1",
                          clip_skip=1, model_hash=None)
    with pytest.raises(BadInputError, match="e.safetensors"):
        load_latent(path)


@pytest.mark.parametrize("content,what", [
    (b"", "empty"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "PNG"), (b"version https://git-lfs.github.com/spec/v1\n", "git-LFS"),
    (b"<!DOCTYPE html><html></html>", "HTML"), (struct.pack("<Q", 10) + b"{not json}", "not JSON"),
    (struct.pack("<Q", 1 << 40) + b"{}", "not a safetensors"),
])
def test_load_rejects_non_safetensors(tmp_path, content, what):
    path = tmp_path / "x.latent"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=what):
        load_latent(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        load_latent(tmp_path / "nope.latent")
    with pytest.raises(BadInputError, match="directory"):
        load_embedding(tmp_path)


def test_embedding_round_trip(tmp_path):
    cond = torch.randn(1, 154, 32, generator=torch.Generator().manual_seed(3))
    pooled = torch.randn(1, 16, generator=torch.Generator().manual_seed(4))
    path = save_embedding(tmp_path / "e.safetensors", cond, prompt="猫, a cat: (x:1.2)", family="sdxl",
                          clip_skip=2, model_hash="cd" * 32, pooled=pooled)
    e = load_embedding(path)
    assert torch.equal(e.cond, cond) and torch.equal(e.pooled, pooled)
    assert (e.prompt, e.family, e.clip_skip, e.model_hash) == ("猫, a cat: (x:1.2)", "sdxl", 2, "cd" * 32)
    e2 = load_embedding(save_embedding(tmp_path / "f.safetensors", cond[:, :77], prompt="", family="sd1",
                                       clip_skip=None, model_hash=None))
    assert e2.pooled is None and e2.clip_skip is None and e2.model_hash is None


@pytest.mark.parametrize("shape", [(77, 32), (1, 76, 32), (1, 0, 32)])
def test_embedding_bad_shapes(tmp_path, shape):
    with pytest.raises(BadInputError, match="shape"):
        save_embedding(tmp_path / "e.safetensors", torch.zeros(shape), prompt="", family="sd1", clip_skip=1,
                       model_hash=None)
    path = tmp_path / "raw.safetensors"
    save_file({"cond": torch.zeros(shape)}, path)
    with pytest.raises(BadInputError, match="raw.safetensors"):
        load_embedding(path)


def test_latent_file_is_not_an_embedding(tmp_path):
    path = _save(tmp_path / "l.safetensors", _latent())
    with pytest.raises(BadInputError, match="not an sdcli embedding"):
        load_embedding(path)
