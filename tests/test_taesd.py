"""TAESD / TAESDXL against diffusers' AutoencoderTiny on the same random weights, in every file layout."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_taesd import original_layout, tiny_autoencoder, write_taesd_files
from safetensors.torch import save_file

from sdcli.formats.safetensors import read_header
from sdcli.runtime.errors import BadInputError, NumericalError, UsageError
from sdcli.formats.images import tensor_to_pil
from sdcli.models.taesd import (
    TinyDecoder,
    TinyEncoder,
    is_autoencoder_tiny,
    is_taesd,
    is_taesd_decoder,
    is_taesd_encoder,
    load_taesd,
    shapes_of,
)

# TAESD (SD1/2) and TAESDXL share one architecture; two seeds stand for the two releases.
VARIANTS = {"taesd": 0, "taesdxl": 1}
LAYOUTS = {
    "diffusers": ("diffusers",),
    "split safetensors": ("encoder", "decoder"),
    "split pth": ("encoder_pth", "decoder_pth"),
    "mixed": ("decoder_pth", "encoder"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def taesd_files(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return write_taesd_files(folder, seed=VARIANTS[request.param], width=16)


def _latent(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g) * scale


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_and_encode_equal_diffusers(taesd_files, layout):
    tae, paths = taesd_files
    ours = load_taesd(*(paths[k] for k in LAYOUTS[layout]), dtype=torch.float32)
    # Scaled latents straight in: scale 5 reaches well into the tanh clamp (|z| > 3)
    z = _latent(1, scale=5.0)
    with torch.no_grad():
        want = tae.decode(z).sample
        got = ours.decode(z)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
        torch.testing.assert_close(ours.encode(image), tae.encode(image).latents, rtol=1e-5, atol=1e-5)
    assert ours.latent_channels == 4
    # the PNG made from it: equal pixels
    a, b = np.asarray(tensor_to_pil(got[0])), np.asarray(tensor_to_pil(want[0]))
    assert np.array_equal(a, b)


def test_decoder_clamps_its_input_and_not_its_output(taesd_files):
    tae, paths = taesd_files
    ours = load_taesd(paths["decoder"])
    r = _latent(3)
    z = torch.sign(r) * (30 + r.abs())  # every |z| >= 30: tanh(z / 3) * 3 is +-3 in float32
    with torch.no_grad():
        out = ours.decode(z)
        assert torch.equal(ours.decode(z * 2), out)  # saturated: a larger latent decodes the same
        unclamped = torch.nn.Sequential(*list(ours.decoder)[1:])(z).mul(2).sub(1)  # the same network without the clamp
    assert (unclamped - out).abs().max() > 0.1
    assert isinstance(ours.decoder[0], torch.nn.Module) and not list(ours.decoder[0].parameters())
    torch.testing.assert_close(out, tae.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_width_and_latent_channels_come_from_the_weights(tmp_path):
    tae, paths = write_taesd_files(tmp_path, seed=4, width=8, latent_channels=16)
    ours = load_taesd(paths["diffusers"])
    assert ours.latent_channels == 16 and ours.decoder[1].weight.shape == (8, 16, 3, 3)
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(z), tae.decode(z).sample, rtol=1e-5, atol=1e-5)


def test_module_keys_are_the_original_file_keys():
    tae = tiny_autoencoder(width=64)  # the real TAESD size: 67 + 67 tensors, ~1.22 M parameters each
    enc, dec = original_layout(tae)
    assert set(TinyEncoder(4, 64).state_dict()) == set(enc) and len(enc) == 67
    assert set(TinyDecoder(4, 64).state_dict()) == set(dec) and len(dec) == 67
    assert "0.weight" not in dec and "19.weight" in dec and "14.weight" in enc


def test_detection_from_the_header_alone(taesd_files, tiny_sd1):
    _, paths = taesd_files
    dec, enc, dif = (shapes_of(read_header(paths[k])) for k in ("decoder", "encoder", "diffusers"))
    assert is_taesd_decoder(dec) and not is_taesd_encoder(dec) and not is_autoencoder_tiny(dec)
    assert is_taesd_encoder(enc) and not is_taesd_decoder(enc) and not is_autoencoder_tiny(enc)
    assert is_autoencoder_tiny(dif) and not is_taesd_decoder(dif) and not is_taesd_encoder(dif)
    full = shapes_of(read_header(tiny_sd1))
    assert not is_taesd(full)
    vae = {k.removeprefix("first_stage_model."): s for k, s in full.items() if k.startswith("first_stage_model.")}
    assert not is_taesd(vae)
    assert not is_taesd({}) and not is_taesd({"1.weight": (4, 4)})
    # diffusers' layout with only the decoder half is still a diffusers TAESD
    half = {k: s for k, s in dif.items() if k.startswith("decoder.")}
    assert is_autoencoder_tiny(half)


def test_decoder_alone_refuses_to_encode(taesd_files):
    _, paths = taesd_files
    ours = load_taesd(paths["decoder"])
    with pytest.raises(UsageError, match="no encoder"):
        ours.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(UsageError, match="no decoder"):
        load_taesd(paths["encoder"]).decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(UsageError, match="two TAESD decoders"):
        load_taesd(paths["decoder"], paths["diffusers"])


def test_strict_loading_lists_every_problem(taesd_files, tmp_path):
    tae, _ = taesd_files
    _, dec = original_layout(tae)
    dec.pop("5.conv.2.weight")
    dec["4.conv.0.bias"] = torch.zeros(5)
    dec["3.extra.weight"] = torch.zeros(1)
    path = tmp_path / "taesd_decoder.safetensors"
    save_file(dec, str(path))
    with pytest.raises(BadInputError) as err:
        load_taesd(path)
    msg = str(err.value)
    assert "missing: 5.conv.2.weight" in msg and "unexpected: 3.extra.weight" in msg
    assert "wrong shape: 4.conv.0.bias [5] != [16]" in msg


def test_nan_weights_and_mismatched_parts(tmp_path):
    tae, paths = write_taesd_files(tmp_path / "a", seed=5)
    _, dec = original_layout(tae)
    dec["19.bias"][0] = float("nan")
    save_file(dec, str(tmp_path / "nan_decoder.safetensors"))
    with pytest.raises(NumericalError, match="19.bias"):
        load_taesd(tmp_path / "nan_decoder.safetensors")
    _, other = write_taesd_files(tmp_path / "b", seed=5, latent_channels=16)
    with pytest.raises(BadInputError, match="disagree on latent channels"):
        load_taesd(paths["encoder"], other["decoder"])


def test_odd_files_give_one_clear_error(tmp_path, tiny_sd1):
    empty = tmp_path / "taesd_decoder.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        load_taesd(empty)
    html = tmp_path / "html.safetensors"
    html.write_bytes(b"<html>not found</html>")
    with pytest.raises(BadInputError, match="HTML"):
        load_taesd(html)
    with pytest.raises(BadInputError, match="not a TAESD file"):
        load_taesd(tiny_sd1)


class _WritesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_pth_with_code_is_refused_without_running_it(tmp_path):
    target = tmp_path / "was_run"
    evil = tmp_path / "taesd_decoder.pth"
    torch.save({"1.weight": torch.zeros(1), "payload": _WritesAFile(str(target))}, evil)
    with pytest.raises(BadInputError, match="refused"):
        load_taesd(evil)
    assert not target.exists()
