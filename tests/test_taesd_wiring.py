"""TAESD wired through the commands: `decode LATENT --vae FILE` with no checkpoint equal to diffusers'
AutoencoderTiny.decode (both file layouts), `--vae taesd_decoder...` on generate (recorded as A1111 records a VAE),
the TAESD encoder in img2img, the live preview drawn by TAESD (--preview-vae, or found in vae_dir), and the family
check (taesdxl files refused for SD1)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from _fixtures_taesd import write_taesd_files
from PIL import Image
from typer.testing import CliRunner

from sdcli.output import latents
from sdcli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    return write_taesd_files(tmp_path_factory.mktemp("taesd"), seed=3)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)

    def run(*args: str, expect: int = 0):
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _within_2_levels(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape and len(np.unique(ref)) > 16, "degenerate oracle image"
    return float((np.abs(got - ref) <= 2).mean())


@pytest.mark.parametrize("layout", ["decoder", "diffusers", "decoder_pth"])
def test_decode_command_equals_diffusers_autoencoder_tiny(layout, taesd, cli, tmp_path):
    tae, paths = taesd
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1)) * 2  # scaled (UNet-space) latents
    latents.save_latent(tmp_path / "z.safetensors", z, scaled=True, scale_factor=0.18215, family="sd1",
                        source_size=None, model_hash=None)
    vae = paths[layout] if layout != "diffusers" else paths["diffusers"].parent  # the AutoencoderTiny folder
    cli("decode", "z.safetensors", "--vae", str(vae), "--dtype", "fp32", "--device", "cpu", "-o", "{index}.png",
        "-m", "no/such/model")  # never loaded: a latent and a VAE are enough
    with torch.no_grad():
        ref = tae.decode(z).sample.clamp(-1, 1)
    for k in range(2):
        want = np.round((ref[k].permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)
        assert _within_2_levels(_pixels(tmp_path / f"{k}.png"), want) >= 0.99
    assert json.loads(Image.open(tmp_path / "0.png").info["sdcli"])["vae"] == vae.name


def test_decode_with_a_comfy_unscaled_latent(taesd, cli, tmp_path):
    """ComfyUI files hold unscaled latents: TAESD gets them scaled by the file's family factor (SD1 by default)."""
    tae, paths = taesd
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    latents.save_latent(tmp_path / "z.latent", z, scaled=True, scale_factor=0.18215, family="sd1",
                        source_size=None, model_hash=None)
    cli("decode", "z.latent", "--vae", str(paths["decoder"]), "--dtype", "fp32", "--device", "cpu", "-o", "a.png")
    with torch.no_grad():
        ref = tae.decode(z).sample.clamp(-1, 1)[0]
    want = np.round((ref.permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)
    assert _within_2_levels(_pixels(tmp_path / "a.png"), want) >= 0.99


def test_taesdxl_file_is_refused_for_an_sd1_latent(taesd, cli, tmp_path):
    _, paths = taesd
    xl = tmp_path / "taesdxl_decoder.safetensors"
    shutil.copy(paths["decoder"], xl)
    latents.save_latent(tmp_path / "z.safetensors", torch.zeros(1, 4, 8, 8), scaled=True, scale_factor=0.18215,
                        family="sd1", source_size=None, model_hash=None)
    result = cli("decode", "z.safetensors", "--vae", str(xl), "--device", "cpu", "-o", "a.png", expect=3)
    assert "taesdxl" in result.stderr and not (tmp_path / "a.png").exists()


def test_generate_with_taesd_decodes_the_same_latent_and_records_it(taesd, cli, tiny_sd1, tmp_path):  # noqa: F811
    tae, paths = taesd
    common = ["generate", "a fox", "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "2",
              "-W", "64", "-H", "64", "--seed", "3", "--latent-out", "{seed}.safetensors"]
    cli(*common, "--vae", str(paths["decoder"]), "-o", "fast.png")
    info = Image.open(tmp_path / "fast.png").info
    z = latents.load_latent(tmp_path / "3.safetensors").latent
    with torch.no_grad():
        ref = tae.decode(z).sample.clamp(-1, 1)[0]
    want = np.round((ref.permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)
    assert _within_2_levels(_pixels(tmp_path / "fast.png"), want) >= 0.99
    meta = json.loads(info["sdcli"])
    assert meta["vae"]["kind"] == "taesd" and meta["vae"]["name"] == "taesd_decoder.safetensors"
    assert "VAE: taesd_decoder.safetensors" in info["parameters"] and "VAE hash: " in info["parameters"]


def test_img2img_uses_the_sibling_taesd_encoder(taesd, cli, tiny_sd1, tmp_path):  # noqa: F811
    tae, paths = taesd
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    cli("img2img", "a fox", "-i", "in.png", "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32",
        "--steps", "2", "--strength", "0", "--vae", str(paths["decoder"]), "-o", "out.png")
    x = torch.from_numpy(np.asarray(Image.open(tmp_path / "in.png"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        ref = tae.decode(tae.encode(x).latents).sample.clamp(-1, 1)[0]  # strength 0: the round trip
    want = np.round((ref.permute(1, 2, 0).numpy() + 1) * 127.5).astype(int)
    assert _within_2_levels(_pixels(tmp_path / "out.png"), want) >= 0.99


def test_preview_is_drawn_by_taesd(taesd, cli, tiny_sd1, tmp_path):  # noqa: F811
    _, paths = taesd
    common = ["generate", "a fox", "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "2",
              "-W", "64", "-H", "80", "--seed", "3"]
    cli(*common, "--preview", "cheap.png", "-o", "a.png")
    cli(*common, "--preview", "tiny.png", "--preview-vae", str(paths["decoder"]), "-o", "b.png")
    (tmp_path / "vae").mkdir()
    shutil.copy(paths["decoder"], tmp_path / "vae" / "taesd_decoder.safetensors")
    (tmp_path / "c.yaml").write_text("vae_dir: vae\n")
    found = cli(*common, "--preview", "auto.png", "-c", "c.yaml", "-o", "c.png")
    assert "preview: decoded by taesd_decoder.safetensors" in found.stderr
    assert np.array_equal(_pixels(tmp_path / "tiny.png"), _pixels(tmp_path / "auto.png"))
    assert not np.array_equal(_pixels(tmp_path / "tiny.png"), _pixels(tmp_path / "cheap.png"))
    assert _pixels(tmp_path / "tiny.png").shape == (80, 64, 3)
