"""--from-image replays an image's recorded settings; `verify` re-renders an sdcli image and flags drift."""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from sdcli.cli import app

SETTINGS = ["--steps", "3", "-W", "64", "-H", "64", "--sampler", "euler_a", "--cfg", "5", "--negative", "blurry"]


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    model = ["-m", str(tiny_sd1), "--device", "cpu"]

    def run(*args: str, expect: int = 0, with_model: bool = True):
        command, rest = args[0], list(args[1:])
        result = runner.invoke(app, [command, *(model if with_model else []), *rest])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


@pytest.fixture
def original(cli, tmp_path):
    cli("generate", "a red fox, (snow:1.2)", *SETTINGS, "--seed", "11", "--dtype", "fp32", "-o", "a.png")
    return tmp_path / "a.png"


def _meta(path):
    return json.loads(Image.open(path).text["sdcli"])


def test_from_image_reproduces_the_same_file(cli, original, tmp_path):
    cli("generate", "--from-image", str(original), "-o", "b.png")
    assert (tmp_path / "b.png").read_bytes() == original.read_bytes()


def test_flags_override_replayed_settings(cli, original, tmp_path):
    cli("generate", "--from-image", str(original), "--seed", "12", "-o", "c.png")
    meta = _meta(tmp_path / "c.png")
    assert meta["seed"] == 12 and meta["prompt"] == "a red fox, (snow:1.2)"
    assert meta["config"]["steps"] == 3 and meta["config"]["sampler"] == "euler_a"
    assert (tmp_path / "c.png").read_bytes() != original.read_bytes()


def _a1111_png(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path, pnginfo=info)
    return path


def test_from_a1111_infotext(cli, tmp_path):
    png = _a1111_png(tmp_path / "w.png", "a castle\nNegative prompt: fog\nSteps: 7, Sampler: DPM++ 2M, "
                     "Schedule type: Karras, CFG scale: 4.5, Seed: 99, Size: 96x64, Model: x")
    result = cli("generate", "--from-image", str(png), "--dry-run", with_model=False)
    plan = json.loads(result.stdout.splitlines()[0])
    assert plan["prompt"] == "a castle"
    cfg = plan["config"]
    assert (cfg["steps"], cfg["sampler"], cfg["schedule"], cfg["cfg"], cfg["seed"]) == (7, "dpm++_2m", "karras", 4.5, 99)
    assert (cfg["width"], cfg["height"], cfg["negative"]) == (96, 64, "fog")


def test_from_image_without_metadata(cli, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = cli("generate", "--from-image", str(tmp_path / "plain.png"), expect=3)
    assert "no generation metadata" in result.stderr


def test_from_image_with_bad_recorded_value(cli, tmp_path):
    png = _a1111_png(tmp_path / "bad.png", "x\nSteps: 0, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")
    result = cli("generate", "--from-image", str(png), "--dry-run", expect=3, with_model=False)
    assert "bad.png" in result.stderr and "'steps'" in result.stderr


def test_verify_passes_on_an_untouched_image(cli, original):
    result = cli("verify", str(original), "--json")
    report = json.loads(result.stdout)
    assert report["passed"] and report["identical"] and report["max_diff"] == 0 and report["same_model"]


def test_verify_flags_drift(cli, original, tmp_path):
    img = Image.open(original)
    info = PngImagePlugin.PngInfo()
    for key, value in img.text.items():
        info.add_itxt(key, value)
    pixels = img.convert("RGB")
    pixels.putpixel((3, 3), (0, 255, 0))
    pixels.paste((255, 255, 255), (0, 0, 32, 32))
    pixels.save(tmp_path / "tampered.png", pnginfo=info)
    result = cli("verify", str(tmp_path / "tampered.png"), expect=9)
    assert "drifted" in result.stderr and "tampered.png" in result.stderr


def test_verify_refuses_images_it_cannot_replay(cli, tmp_path):
    png = _a1111_png(tmp_path / "w.png", "a castle\nSteps: 7, Sampler: Euler, CFG scale: 4.5, Seed: 99, Size: 64x64")
    result = cli("verify", str(png), expect=2)
    assert "written by sdcli" in result.stderr


def test_verify_and_replay_keep_hires_and_seamless(cli, tmp_path):
    cli("generate", "tiles", *SETTINGS, "--seed", "4", "--dtype", "fp32", "--seamless", "--hires-scale", "1.5",
        "--hires-steps", "2", "-o", "h.png")
    report = json.loads(cli("verify", str(tmp_path / "h.png"), "--json").stdout)
    assert report["passed"] and report["identical"]
    cli("generate", "--from-image", str(tmp_path / "h.png"), "-o", "h2.png")
    assert (tmp_path / "h2.png").read_bytes() == (tmp_path / "h.png").read_bytes()


@pytest.fixture
def cpu_kind(monkeypatch):
    """Run as if the CPU had (True) or lacked (False) native bf16, whatever this machine is."""
    from sdcli.runtime import device

    def pretend(native: bool):
        monkeypatch.setenv(device.FORCE_BF16_ENV, "1" if native else "0")
        device.cpu_has_native_bf16.cache_clear()

    yield pretend
    device.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_replay_keeps_an_explicit_fp32_dtype_on_any_cpu(cli, original, tmp_path, cpu_kind, native):
    cpu_kind(native)  # auto would pick bf16 on a native-bf16 CPU: the image's fp32 must win over it
    result = cli("generate", "--from-image", str(original), "-o", "b.png")
    assert (tmp_path / "b.png").read_bytes() == original.read_bytes()
    assert "replaying in" not in result.stderr


def test_replay_keeps_bf16_where_it_runs_well(cli, tmp_path, cpu_kind):
    cpu_kind(True)
    cli("generate", "a red fox", *SETTINGS, "--seed", "3", "--dtype", "bf16", "-o", "a.png")
    cli("generate", "--from-image", "a.png", "-o", "b.png")
    assert _meta(tmp_path / "b.png")["dtype"] == "bf16"
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()


def test_replay_of_bf16_on_an_fp32_only_cpu_says_so(cli, tmp_path, cpu_kind):
    cpu_kind(True)
    cli("generate", "a red fox", *SETTINGS, "--seed", "3", "--dtype", "bf16", "-o", "a.png")
    cpu_kind(False)
    result = cli("generate", "--from-image", "a.png", "-o", "b.png")
    assert _meta(tmp_path / "b.png")["dtype"] == "fp32"
    note = [line for line in result.stderr.splitlines() if "replaying in" in line]
    assert len(note) == 1 and "bf16" in note[0] and "fp32" in note[0]


def test_dtype_flag_beats_the_replayed_dtype(cli, original, tmp_path, cpu_kind):
    cpu_kind(True)
    cli("generate", "--from-image", str(original), "--dtype", "bf16", "-o", "c.png")
    assert _meta(tmp_path / "c.png")["dtype"] == "bf16"


def test_print_config_shows_the_replayed_dtype(cli, original, cpu_kind):
    cpu_kind(True)
    result = cli("generate", "--from-image", str(original), "--print-config", "--json", with_model=False)
    assert json.loads(result.stdout)["dtype"] == "fp32"


def test_thread_count_moves_no_byte(cli, tmp_path):
    """1 and 2 threads give the same file, which verify passes at any threshold (every mode and 1-4 threads:
    test_thread_invariance.py)."""
    import torch

    try:
        for threads, name in ((1, "one.png"), (2, "two.png")):
            torch.set_num_threads(threads)
            cli("generate", "a red fox", *SETTINGS[:2], "-W", "128", "-H", "128", "--seed", "4", "--dtype", "fp32",
                "-o", name)
        assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
        cli("verify", "one.png")  # rendered again with 2 threads here
    finally:
        torch.set_num_threads(1)


def test_no_home_directory_and_unwritable_cache(cli, tmp_path, monkeypatch):
    """A container user with no HOME and no passwd entry, and a cache path that cannot be created."""
    from pathlib import Path

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file" / "cache"))  # mkdir fails: NotADirectory
    cli("generate", "a red fox", *SETTINGS, "--seed", "2", "--dtype", "fp32", "-o", "h.png")
    assert (tmp_path / "h.png").is_file()
