"""The CPU controls of issue 30 (15) and issue 24 (2), through the real command: `--threads N` (the bytes do not
depend on it, so no image records it and --skip-existing ignores it), `--vae-tiling on|off|auto` with
`--vae-tile-size` (on: the decode is the tiled path the out-of-memory retry uses, at the asked tile size), and
`-v/--verbose` (per-stage timings on stderr, stdout untouched). Tiny SD1 model, 64-128 px, 2 steps, fp32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import invoker, pixels
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from sdcli import pipeline
from sdcli.formats.images import tensor_to_pil
from sdcli.loading import checkpoint
from sdcli.output.latents import load_latent
from sdcli.output.metadata import read_image_metadata
from sdcli.runtime.tiling import decode_tiled


@pytest.fixture
def run(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    fast = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "--cfg", "5", "--seed", "3"]
    before = torch.get_num_threads()
    yield invoker({"generate": fast, "img2img": fast})
    torch.set_num_threads(before)  # --threads sets this process's torch threads


def _config(path) -> dict:
    return read_image_metadata(path)["sdcli"]["config"]


# --- --threads -------------------------------------------------------------------------------------------------

def test_threads_sets_torchs_threads_and_moves_no_byte_nor_the_record(run, tmp_path):
    for n in (1, 2):
        run("generate", "a red fox", "-W", "64", "-H", "64", "--threads", str(n), "-o", f"t{n}.png")
        assert torch.get_num_threads() == n
    assert (tmp_path / "t1.png").read_bytes() == (tmp_path / "t2.png").read_bytes()
    assert "threads" not in _config(tmp_path / "t1.png")


def test_skip_existing_ignores_the_thread_count(run, tmp_path):
    run("generate", "a red fox", "-W", "64", "-H", "64", "-n", "2", "--threads", "1", "-o", "r{index}.png")
    first, second = (tmp_path / "r0.png").read_bytes(), (tmp_path / "r1.png").read_bytes()
    (tmp_path / "r1.png").unlink()
    result = run("generate", "a red fox", "-W", "64", "-H", "64", "-n", "2", "--threads", "2", "--skip-existing",
                 "-o", "r{index}.png")
    assert "skipping 1 of 2 images" in result.stderr  # r0.png counts as done, not as another job's image
    assert (tmp_path / "r0.png").read_bytes() == first
    assert (tmp_path / "r1.png").read_bytes() == second  # rendered again on 2 threads: the same file


def test_threads_from_a_config_file_and_bad_values(run, tmp_path):
    (tmp_path / "c.yaml").write_text("threads: 2\n")
    run("generate", "a red fox", "-W", "64", "-H", "64", "-c", "c.yaml", "-o", "c.png")
    assert torch.get_num_threads() == 2
    (tmp_path / "bad.yaml").write_text("threads: 0\n")
    result = run("generate", "a red fox", "-c", "bad.yaml", "-o", "x.png", expect=3)
    assert "'threads' must be between 1 and 1024" in result.stderr
    run("generate", "a red fox", "--threads", "0", "-o", "x.png", expect=2)


# --- --vae-tiling ----------------------------------------------------------------------------------------------

def test_vae_tiling_on_is_the_tiled_decode_at_the_asked_size(run, tiny_sd1, tmp_path):  # noqa: F811
    """128 px = a 16x16 latent; 64 px tiles = 8 latent pixels, overlap 2: 3 x 3 tiles. The PNG's pixels are the
    tiled decode (runtime/tiling.decode_tiled over the VAE, as the out-of-memory retry runs it) of the final
    latent, and not the whole decode's; auto (the default) is the whole decode."""
    size = ["-W", "128", "-H", "128"]
    run("generate", "a red fox", *size, "--vae-tiling", "on", "--vae-tile-size", "64", "-o", "tiled.png",
        "--latent-out", "z.safetensors")
    run("generate", "a red fox", *size, "-o", "whole.png")
    models = checkpoint.load_models(tiny_sd1)
    z = load_latent(tmp_path / "z.safetensors").unet_space(pipeline.scale_factor(models), 0.0)
    z = z / pipeline.scale_factor(models)
    with torch.inference_mode():
        expected = decode_tiled(lambda t: models.vae.decode(t).float(), z, 8, 2).clamp(-1, 1)
        whole = models.vae.decode(z).float().clamp(-1, 1)
    assert np.array_equal(pixels(tmp_path / "tiled.png"), np.asarray(tensor_to_pil(expected[0])))
    assert np.array_equal(pixels(tmp_path / "whole.png"), np.asarray(tensor_to_pil(whole[0])))
    assert not np.array_equal(pixels(tmp_path / "tiled.png"), pixels(tmp_path / "whole.png"))
    recorded = _config(tmp_path / "tiled.png")
    assert (recorded["vae_tiling"], recorded["vae_tile_size"]) == ("on", 64)
    assert "vae_tiling" not in _config(tmp_path / "whole.png")  # the default is not recorded: old bytes stay


def test_a_tiled_image_replays_tiled(run, tiny_sd1, tmp_path):  # noqa: F811
    run("generate", "a red fox", "-W", "128", "-H", "128", "--vae-tiling", "on", "--vae-tile-size", "64",
        "-o", "tiled.png")
    run("generate", "--from-image", "tiled.png", "-m", str(tiny_sd1), "-o", "again.png")
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "tiled.png"))


def test_vae_tiling_off_makes_out_of_memory_an_error_and_auto_retries_tiled(run, tmp_path, monkeypatch):
    real = pipeline._vae_decode

    def whole_runs_out(vae, z):
        if z.shape[-1] > 8:  # the whole 16x16 latent; 64 px tiles (8 latent pixels) fit
            raise torch.OutOfMemoryError("CPU out of memory (test)")
        return real(vae, z)

    monkeypatch.setattr(pipeline, "_vae_decode", whole_runs_out)
    size = ["-W", "128", "-H", "128", "--vae-tile-size", "64"]
    result = run("generate", "a red fox", *size, "--vae-tiling", "off", "-o", "off.png", expect=None)
    assert result.exit_code not in (0, 1) and "--vae-tiling off" in result.stderr
    assert not (tmp_path / "off.png").exists()
    run("generate", "a red fox", *size, "-o", "auto.png")
    run("generate", "a red fox", *size, "--vae-tiling", "on", "-o", "on.png")
    assert np.array_equal(pixels(tmp_path / "auto.png"), pixels(tmp_path / "on.png"))
    assert read_image_metadata(tmp_path / "auto.png")["sdcli"]["fallbacks"] == ["vae-tiled"]


@pytest.mark.parametrize("flags", [["--vae-tiling", "sometimes"], ["--vae-tile-size", "100"],
                                   ["--vae-tile-size", "32"]])
def test_bad_tiling_values_are_usage_errors(run, flags):
    result = run("generate", "a red fox", *flags, "-o", "x.png", expect=2)
    assert len(result.stderr.strip().splitlines()) == 1


# --- -v --------------------------------------------------------------------------------------------------------

def test_verbose_prints_each_stage_on_stderr_and_nothing_on_stdout(run, tmp_path):
    result = run("generate", "a red fox", "-W", "64", "-H", "64", "--hires-scale", "1.5", "--hires-steps", "1",
                 "-v", "-o", "v.png")
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("time: ")]
    stages = [line[len("time: "):].rsplit(" ", 2)[0] for line in lines]
    assert stages == ["text encode", "text encode (hires pass)", "sampling pass 1", "sampling pass 2 (hires fix)",
                      "VAE decode", "save (encode the image files)", "save (write v.png)"], stages
    assert all(float(line.rsplit(" ", 2)[1]) >= 0 for line in lines)
    quiet = run("generate", "a red fox", "-W", "64", "-H", "64", "-o", "q.png")
    assert "time: " not in quiet.stderr
    assert (tmp_path / "v.png").exists()


def test_verbose_with_json_keeps_stdout_json(run, tmp_path):
    result = run("img2img", "a red door", "-i", str(_image(tmp_path)), "--strength", "0.5", "--json", "-v",
                 "-o", "i.png")
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == ["i.png"]
    assert "time: sampling (img2img)" in result.stderr and "time: VAE decode" in result.stderr


def _image(folder):
    path = folder / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path
