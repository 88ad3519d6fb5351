"""Numerical failures and out-of-memory through the real `sdcli generate`: non-finite UNet or VAE output is exit 5
with nothing saved, a low-precision VAE overflow is retried once in fp32 and recorded, an OOM in the VAE decode is
retried tiled and recorded, any other OOM is exit 6 with advice (RELIABILITY.md "Numerics", "Output and
environment"). No black or NaN image is ever written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403
from PIL import Image
from safetensors.torch import load_file, save_file

from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL


def _scaled(src, dst, key: str, factor: float):
    state = load_file(src)
    state[key] = state[key] * factor
    save_file(state, str(dst))
    return dst


def _assert_real_image(path, fallbacks: list[str]):
    """A saved image that is neither black nor flat, with the fallbacks recorded in its sdcli metadata."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 1.0 and pixels.max() > 0
    assert sdcli_meta(path)["fallbacks"] == fallbacks


# ---------------------------------------------------------------- UNet


def test_unet_overflowing_weight_is_exit_5_and_nothing_saved(tiny_sd1, tmp_path):
    """A finite weight so large that the UNet output overflows to Inf (the loader accepts it: it is finite)."""
    model = _scaled(tiny_sd1, tmp_path / "hot.safetensors", "model.diffusion_model.out.2.weight", 1e37)
    result = cli(*render_args(model, "-o", "out.png", steps=3))
    assert_clean_error(result, 5, "UNet produced NaN/Inf at step 1 of 3")
    assert not (tmp_path / "out.png").exists() and temp_files(tmp_path) == []


def test_unet_nan_mid_run_is_caught_at_that_step(tiny_sd1, tmp_path, monkeypatch):
    timesteps = []  # one per UNet call; euler calls the model once per step (the batch may be split in rows)
    real = UNetModel.forward

    def flaky(self, x, t, context):
        timesteps.append(float(t[0]))
        out = real(self, x, t, context)
        return out * float("nan") if timesteps[-1] != timesteps[0] else out  # from step 2 on

    monkeypatch.setattr(UNetModel, "forward", flaky)
    result = cli(*render_args(tiny_sd1, "-o", "out-{index}.png", "-n", "2", steps=3))
    assert_clean_error(result, 5, "step 2 of 3", "--dtype fp32")
    assert len(set(timesteps)) == 2  # stopped after step 2, did not run step 3
    assert not list(tmp_path.glob("out-*.png")) and temp_files(tmp_path) == []


# ---------------------------------------------------------------- VAE


def _vae_nan_when(monkeypatch, bad):
    real = AutoencoderKL.decode
    seen = []

    def decode(self, z):
        out = real(self, z)
        seen.append(z.dtype)
        return out * float("nan") if bad(z) else out

    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    return seen


def test_low_precision_vae_overflow_is_retried_in_fp32_and_recorded(tiny_sd1, tmp_path, monkeypatch):
    seen = _vae_nan_when(monkeypatch, lambda z: z.dtype != torch.float32)
    args = render_args(tiny_sd1, "-o", "out.png")
    args[args.index("fp32")] = "bf16"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert seen == [torch.bfloat16, torch.float32]
    _assert_real_image(tmp_path / "out.png", ["vae-fp32-retry"])


def test_vae_non_finite_even_in_fp32_is_exit_5_and_nothing_saved(tiny_sd1, tmp_path, monkeypatch):
    seen = _vae_nan_when(monkeypatch, lambda z: True)
    args = render_args(tiny_sd1, "-o", "out-{index}.png", "-n", "2")
    args[args.index("fp32")] = "bf16"
    assert_clean_error(cli(*args), 5, "VAE", "nothing was saved")
    assert seen == [torch.bfloat16, torch.float32]
    assert not list(tmp_path.glob("out-*")) and temp_files(tmp_path) == []


def test_vae_overflowing_weight_in_fp32_is_exit_5(tiny_sd1, tmp_path):
    """No monkeypatch: a real decoder whose last conv overflows fp32."""
    model = _scaled(tiny_sd1, tmp_path / "hotvae.safetensors", "first_stage_model.decoder.conv_out.weight", 1e38)
    assert_clean_error(cli(*render_args(model, "-o", "out.png")), 5, "VAE")
    assert not (tmp_path / "out.png").exists() and temp_files(tmp_path) == []


# ---------------------------------------------------------------- out of memory


def _oom_when(monkeypatch, cls, name, too_big):
    real = getattr(cls, name)

    def guarded(self, x, *args):
        if too_big(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, x, *args)

    monkeypatch.setattr(cls, name, guarded)


def test_vae_oom_is_retried_tiled_and_recorded(tiny_sd1, tmp_path, monkeypatch):
    # 576 px wide = 72 latent columns: more than one 64-column tile; a tile-sized decode fits, the whole does not
    _oom_when(monkeypatch, AutoencoderKL, "decode", lambda z: z.shape[-1] > 64)
    args = render_args(tiny_sd1, "-o", "wide.png")
    args[args.index("-W") + 1] = "576"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "wide.png").size == (576, 64)
    _assert_real_image(tmp_path / "wide.png", ["vae-tiled"])


def test_vae_oom_even_tiled_is_exit_6_with_advice(tiny_sd1, tmp_path, monkeypatch):
    _oom_when(monkeypatch, AutoencoderKL, "decode", lambda z: True)
    assert_clean_error(cli(*render_args(tiny_sd1, "-o", "out.png")), 6, "out of memory", "smaller")
    assert not (tmp_path / "out.png").exists() and temp_files(tmp_path) == []


def test_unet_oom_is_exit_6_with_size_and_dtype_advice(tiny_sd1, tmp_path, monkeypatch):
    _oom_when(monkeypatch, UNetModel, "forward", lambda x: True)
    line = assert_clean_error(cli(*render_args(tiny_sd1, "-o", "out.png")), 6, "out of memory", "--dtype")
    assert "-W" in line and "--batch-size" in line
    assert not (tmp_path / "out.png").exists()
