"""--seamless: with circular padding the UNet and the VAE decoder commute with circular shifts, so the image
wraps at its edges; without it they do not. The modules are restored afterwards."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from sdcli import pipeline
from sdcli.loading import checkpoint
from sdcli.cli import app


@pytest.fixture(scope="module")
def models(tiny_sd1):  # noqa: F811
    return checkpoint.load_models(tiny_sd1)


def _unet(models, x):
    t = torch.tensor([400.0])
    ctx = torch.randn(1, 77, models.info.unet.context_dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        return models.unet(x, t, ctx)


@pytest.mark.parametrize("enabled", [True, False])
def test_unet_commutes_with_circular_shift_only_when_seamless(models, enabled):
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    shift = (8, 16)  # a multiple of the UNet's total downsampling
    with pipeline.seamless(models, enabled):
        shifted_first = _unet(models, torch.roll(x, shift, dims=(2, 3)))
        shifted_after = torch.roll(_unet(models, x), shift, dims=(2, 3))
    gap = (shifted_first - shifted_after).abs().max().item()
    scale = shifted_after.abs().max().item()
    if enabled:
        assert gap <= 1e-5 * scale
    else:
        assert gap > 1e-3 * scale  # zero padding breaks the symmetry: the test can tell


def test_vae_decoder_commutes_with_circular_shift(models):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with pipeline.seamless(models), torch.inference_mode():
        a = models.vae.decode(torch.roll(z, (1, 3), dims=(2, 3)))
        b = torch.roll(models.vae.decode(z), (8, 24), dims=(2, 3))
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


def test_padding_restored(models):
    convs = [m for m in models.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    with pipeline.seamless(models):
        assert any(m.padding_mode == "circular" for m in convs)
    assert all(m.padding_mode == "zeros" for m in convs)


def test_cli_seamless_records_it(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    args = ["generate", "tiles", "-m", str(tiny_sd1), "-W", "64", "-H", "64", "--steps", "2", "--seed", "1"]
    assert CliRunner().invoke(app, [*args, "--seamless", "-o", "s.png"]).exit_code == 0
    assert CliRunner().invoke(app, [*args, "-o", "p.png"]).exit_code == 0
    meta = json.loads(Image.open(tmp_path / "s.png").text["sdcli"])
    assert meta["config"]["seamless"] is True
    assert Image.open(tmp_path / "s.png").tobytes() != Image.open(tmp_path / "p.png").tobytes()
