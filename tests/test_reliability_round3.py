"""Hostile input, round 3 (issue 24, items 3 and 4): each root cause the crafted-input runs found, through the real
command. Every case ends in one `error:` line with a documented exit code (or runs), before the slow work when
it can be known then; nothing is replaced unasked, nothing hangs, no memory grows with what the input claims."""

from __future__ import annotations

import html
import json
import os
import re
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from make_checkpoint import make_controlnet
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from _fixtures_embeddings import random_vectors, write_embedding
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403
from _fixtures_taesd import write_taesd_files


@pytest.fixture(scope="module")
def rendered(tiny_sd1, tmp_path_factory) -> Path:  # noqa: F811
    """One real sdcli PNG of the tiny model (64x64, 1 step, seed 3)."""
    out = tmp_path_factory.mktemp("round3") / "a.png"
    result = cli(*render_args(tiny_sd1, "-o", out, "--seed", "3"))
    assert result.exit_code == 0, result.output
    return out


def _with_sdcli_json(src: Path, dst: Path, text: str, size: tuple[int, int] | None = None) -> Path:
    """`src` with its sdcli JSON chunk replaced by `text` (and its pixels by black ones of `size`)."""
    with Image.open(src) as img:
        img.load()
        info = PngInfo()
        info.add_text("parameters", img.text["parameters"])
        info.add_itxt("sdcli", text)
        (img if size is None else Image.new("RGB", size)).save(dst, pnginfo=info)
    return dst


def _zero_dim(src: Path, dst: Path, key: str, dim: int = 0) -> Path:
    state = load_file(str(src))
    shape = list(state[key].shape)
    shape[dim] = 0
    state[key] = torch.zeros(shape)
    save_file(state, str(dst))
    return dst


# ---------------------------------------------------------------- item 3: zero-sized weights, echoed input


def test_zero_sized_weights_are_refused_by_name(tiny_sd1, tmp_path):
    """A zero-sized dimension is valid safetensors: the channel multipliers read from it divided by zero (exit 1)."""
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"):
        path = _zero_dim(tiny_sd1, tmp_path / "z.safetensors", key)
        result = cli(*render_args(path, "-o", "o.png"))
        assert_clean_error(result, 3, "z.safetensors", key, "zero-sized dimension")
        assert_clean_error(cli("inspect", path, "--no-hash"), 3, "z.safetensors", key)
    cn = _zero_dim(make_controlnet(tmp_path / "cn.safetensors"), tmp_path / "zcn.safetensors",
                   "control_model.input_blocks.0.0.weight")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "hint.png")
    result = cli(*render_args(tiny_sd1, "--controlnet", cn, "--control-image", "hint.png", "-o", "o.png"))
    assert_clean_error(result, 3, "zcn.safetensors", "input_blocks.0.0.weight", "zero-sized dimension")
    assert "loading" not in result.stderr  # the ControlNet is checked before the model loads
    assert_clean_error(cli("inspect", cn, "--no-hash"), 3, "zcn.safetensors", "zero-sized dimension")
    _, taesd = write_taesd_files(tmp_path / "taesd")
    tiny = _zero_dim(taesd["decoder"], tmp_path / "taesd_decoder.safetensors", "1.weight", 1)
    assert_clean_error(cli(*render_args(tiny_sd1, "--vae", tiny, "-o", "o.png")), 3, "taesd_decoder", "zero-sized")
    assert files_in(tmp_path) == ["cn.safetensors", "hint.png", "taesd_decoder.safetensors", "z.safetensors",
                                  "zcn.safetensors"]


def _unet_gguf(src: Path, dst: Path, zero_key: str | None = None) -> Path:
    """city96's UNet-only GGUF of the tiny SD1 (names without model.diffusion_model.), F32; one weight emptied."""
    from sdcli.quant.quantize import write_gguf

    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v for k, v in load_file(str(src)).items() if k.startswith(prefix)}
    if zero_key is not None:
        state[zero_key] = torch.zeros(0, *state[zero_key].shape[1:])
    write_gguf(dst, state, "f32", arch="sd1")
    return dst


def _clip_file(src: Path, dst: Path, zero: bool = False) -> Path:
    """ComfyUI's clip_l.safetensors of the tiny SD1 (transformers names); its token embedding 0 wide when `zero`."""
    prefix = "cond_stage_model.transformer."
    state = {k[len(prefix):]: v for k, v in load_file(str(src)).items() if k.startswith(prefix)}
    if zero:
        key = "text_model.embeddings.token_embedding.weight"
        state[key] = torch.zeros(state[key].shape[0], 0)
    save_file(state, str(dst))
    return dst


def test_zero_sized_weights_in_gguf_encoder_and_upscaler_files(tiny_sd1, tmp_path):
    """Main's new files under the same rule, each named: a GGUF tensor (the reader refuses it, so generate,
    inspect and convert all do), a --clip-l file (the error named the checkpoint it was merged into) and an
    upscaler file (it reached the strict load; inspect reported a 0-wide model), refused before the model loads."""
    from make_upscaler import write_rrdb

    from sdcli.models.esrgan import RRDBConfig

    gguf = _unet_gguf(tiny_sd1, tmp_path / "zu.gguf", "input_blocks.0.0.weight")
    clip, zclip = _clip_file(tiny_sd1, tmp_path / "clip_l.safetensors"), \
        _clip_file(tiny_sd1, tmp_path / "zclip_l.safetensors", zero=True)  # fmt: skip
    result = cli(*render_args(gguf, "--vae", tiny_sd1, "--clip-l", clip, "-o", "o.png"))
    assert_clean_error(result, 3, "zu.gguf", "input_blocks.0.0.weight", "zero-sized dimension")
    assert_clean_error(cli("inspect", gguf, "--no-hash"), 3, "zu.gguf", "zero-sized dimension")
    assert_clean_error(cli("convert", gguf, "-o", "c.safetensors"), 3, "zu.gguf", "zero-sized dimension")
    good = _unet_gguf(tiny_sd1, tmp_path / "u.gguf")
    result = cli(*render_args(good, "--vae", tiny_sd1, "--clip-l", zclip, "-o", "o.png"))
    error = assert_clean_error(result, 3, "zclip_l.safetensors", "token_embedding.weight", "zero-sized dimension")
    assert "u.gguf" not in error
    up = write_rrdb(tmp_path / "4x-T.pth", RRDBConfig(num_features=8, num_blocks=1), layout="old")
    state = torch.load(up, weights_only=True)
    state["model.0.weight"] = torch.zeros(0, *state["model.0.weight"].shape[1:])
    save_file(state, str(tmp_path / "4x-Z.safetensors"))
    torch.save(state, tmp_path / "4x-Z.pth")
    Image.new("RGB", (32, 32)).save(tmp_path / "pic.png")
    for bad in ("4x-Z.safetensors", "4x-Z.pth"):
        result = cli("upscale", "pic.png", "-u", bad, "-o", "u.png")
        assert_clean_error(result, 3, bad, "model.0.weight", "zero-sized dimension")
        assert_clean_error(cli("inspect", bad), 3, bad, "zero-sized dimension")
        result = cli(*render_args(tiny_sd1, "--hires-scale", "2", "--hires-upscaler", bad, "-o", "o.png"))
        assert_clean_error(result, 3, bad, "zero-sized dimension")
        assert "loading" not in result.stderr  # the hires upscaler is checked before the model loads
    assert not {"o.png", "u.png", "c.safetensors"} & set(files_in(tmp_path))


BIG = "x" * 62_000
LONG_LINES = {
    "weight": (f"a ({BIG}:1.2.3)", 3),
    "lora tag": (f"a <lora:{BIG}:abc>", 3),
    "other network": (f"a <hypernet:{BIG}>", 8),
    "unknown key": (json.dumps({"prompt": "a", BIG: 1}), 3),
    "sampler": (json.dumps({"prompt": "a", "sampler": BIG}), 3),
    "schedule": (json.dumps({"prompt": "a", "schedule": BIG}), 3),
    "sigmas": (json.dumps({"prompt": "a", "sigmas": BIG}), 3),
    "control key": (json.dumps({"prompt": "a", "controlnets": [{"model": "m", "image": "i", BIG: 1}]}), 3),
    "control resize": (json.dumps({"prompt": "a", "controlnets": [{"model": "m", "image": "i", "resize": BIG}]}), 3),
    "noise source": (json.dumps({"prompt": "a", "rng": BIG}), 3),
    "inpaint fill": (json.dumps({"prompt": "a", "inpaint_fill": BIG}), 3),
    "seed resize": (json.dumps({"prompt": "a", "seed_resize_from": "0" * 62_000 + "64x64"}), 3),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(LONG_LINES))
def test_an_error_quotes_at_most_a_short_piece_of_a_long_line(tmp_path, case):
    """A 62 KB prompts-file line was echoed whole in its error: now the start of the quoted text and its length."""
    line, code = LONG_LINES[case]
    (tmp_path / "p.txt").write_text(line + "\n", encoding="utf-8")
    error = assert_clean_error(cli("generate", "--prompts-file", "p.txt", "--dry-run"), code, "p.txt:1")
    assert not re.search(r"(.)\1{200}", error) and len(error) < 1500, error  # (an unknown key's lists the known)
    assert re.search(r"\.\.\. \(6\d,\d{3} characters\)", error) or "..." in error, error


def test_other_quoted_input_is_capped_too(tmp_path):
    (tmp_path / "c.yaml").write_text(f"? {BIG}\n: 1\n")  # an explicit key: a plain one stops at 1024
    error = assert_clean_error(cli("generate", "x", "--config", "c.yaml", "--dry-run"), 3, "c.yaml", "unknown key")
    assert "x" * 201 not in error and len(error) < 1500 and "(62,000 characters)" in error  # (lists known keys)
    error = assert_clean_error(cli("sweep", "a cat", "--x", f"sampler={BIG}", "-o", "p.png"), 2, "sampler")
    assert len(error) < 700
    error = assert_clean_error(cli("generate", "x", "--sigmas", BIG, "--dry-run"), 2, "sigmas")
    assert len(error) < 700


LONG_NAME = "n" * 300  # one name over the 255 bytes of every file system: Path.is_file() raised ENAMETOOLONG


@pytest.mark.parametrize("args", [
    ["-m", LONG_NAME], ["--vae", LONG_NAME], ["--lora", LONG_NAME], ["--clip-l", LONG_NAME],
    ["--controlnet", LONG_NAME, "--control-image", "h.png"], ["--control-image", LONG_NAME, "--controlnet",
    "cn.safetensors"], ["--embeddings-dir", LONG_NAME], ["--lora-dir", LONG_NAME],
    ["--hires-scale", "2", "--hires-upscaler", LONG_NAME], ["--latent-in", LONG_NAME], ["--refiner", LONG_NAME]],
    ids=lambda a: a[0])
def test_an_input_name_too_long_for_any_file_system_is_one_line(tiny_sd1, tmp_path, args):
    """`unexpected OSError: [Errno 36] File name too long` (exit 1) from most options naming an input file."""
    make_controlnet(tmp_path / "cn.safetensors")
    Image.new("RGB", (64, 64)).save(tmp_path / "h.png")
    base = render_args(tiny_sd1, "-o", "o.png")
    if args[0] == "-m":
        base = base[:2] + base[4:]
    if args[0] == "--lora-dir":
        base[1] = "a cat <lora:x:1>"
    assert_clean_error(cli(*base, *args), 3, "n" * 100, "over 255 bytes")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("command", ["inspect", "verify", "upscale", "convert", "from-image"])
def test_commands_given_a_name_too_long_for_any_file_system(tiny_sd1, tmp_path, command):
    args = {"inspect": ["inspect", LONG_NAME], "verify": ["verify", LONG_NAME, "-m", tiny_sd1],
            "upscale": ["upscale", LONG_NAME, "-u", "Lanczos", "--scale", "2", "-o", "u.png"],
            "convert": ["convert", LONG_NAME, "-o", "c.safetensors"],
            "from-image": ["generate", "--from-image", LONG_NAME, "-m", tiny_sd1, "-o", "o.png"]}[command]
    assert_clean_error(cli(*args), 3, "n" * 100, "over 255 bytes" if command != "convert" else "cannot read")
    assert files_in(tmp_path) == []


def test_an_upscaler_name_is_quoted_short_when_not_found(tiny_sd1, tmp_path):
    name = "u" * 240  # a valid file name, not there
    (tmp_path / "ups").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "pic.png")
    error = assert_clean_error(cli("upscale", "pic.png", "-u", name, "--upscaler-dir", "ups", "-o", "x.png"), 4,
                               "not found under ups")
    assert "u" * 121 not in error and "(240 characters)" in error
    (tmp_path / "p.txt").write_text(json.dumps({"prompt": "a", "hires_scale": 2, "hires_upscaler": name}) + "\n")
    result = cli("generate", "--prompts-file", "p.txt", "-m", tiny_sd1, "--upscaler-dir", "ups", "-o", "o.png")
    error = assert_clean_error(result, 4, "not found under ups")
    assert "u" * 121 not in error and "loading" not in result.stderr


def test_console_caps_any_error_line():
    from sdcli.runtime.errors import LINE_LIMIT, cap_line, quote, quote_list

    assert quote("abc") == "abc" and quote("y" * 500) == "y" * 200 + "... (500 characters)"
    assert quote_list([f"n{i}" for i in range(10)]) == "n0, n1, n2, n3, n4, n5, ... (10 in all)"
    long = "start " + "z" * 10_000 + " pass --overwrite"
    capped = cap_line(long)
    assert len(capped) < LINE_LIMIT + 100 and capped.startswith("start ") and capped.endswith("pass --overwrite")


# ---------------------------------------------------------------- verify: reports, sheets, plots


def test_report_dir_never_replaces_a_file_without_overwrite(tiny_sd1, rendered, tmp_path):
    """Its PNGs were written with overwrite=True: a file of one of their names was destroyed."""
    (tmp_path / "rep").mkdir()
    kept = tmp_path / "rep" / "001-a-stored.png"
    kept.write_bytes(b"precious")
    result = cli("verify", rendered, "-m", tiny_sd1, "--report-dir", tmp_path / "rep")
    assert_clean_error(result, 7, "001-a-stored.png", "--overwrite")
    assert "loading" not in result.stderr and kept.read_bytes() == b"precious"
    assert files_in(tmp_path / "rep") == ["001-a-stored.png"]
    result = cli("verify", rendered, "-m", tiny_sd1, "--report-dir", tmp_path / "rep", "--overwrite")
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path / "rep") == ["001-a-diff.png", "001-a-rerender.png", "001-a-stored.png", "index.html",
                                          "legend.png"]
    assert Image.open(kept).size == (64, 64)


def test_verify_refuses_contact_sheets_and_sweep_plots(tiny_sd1, tmp_path):
    """A sheet carries its first image's metadata: its re-render was compared with the whole sheet (exit 9)."""
    result = cli(*render_args(tiny_sd1, "-n", "2", "-o", "g{index}.png", "--grid", "sheet.png"))
    assert result.exit_code == 0, result.output
    result = cli("verify", "sheet.png", "-m", tiny_sd1)
    assert_clean_error(result, 2, "sheet.png", "contact sheet")
    assert "loading" not in result.stderr
    assert cli("verify", "g1.png", "-m", tiny_sd1).exit_code == 0  # its images verify
    sweep = cli("sweep", "a cat", "-m", tiny_sd1, "--steps", "1", "-W", "64", "-H", "64", "--dtype", "fp32",
                "--x", "cfg=3,7", "-o", "plot.png")
    assert sweep.exit_code == 0, sweep.output
    assert_clean_error(cli("verify", "plot.png", "-m", tiny_sd1), 2, "plot.png", "sweep plot")
    assert_clean_error(cli("generate", "--from-image", "plot.png", "--dry-run"), 2, "plot.png", "sweep plot")


# ---------------------------------------------------------------- sweeps and sheets


@pytest.mark.parametrize("key", ["refiner", "refiner_switch", "aesthetic_score", "negative_aesthetic_score", "ray"])
def test_sweep_refuses_keys_no_cell_would_use(key):
    """`--x refiner=...` was accepted and recorded in every cell's metadata, but sweep runs no refiner."""
    value = {"refiner": "a.safetensors,b.safetensors", "ray": "auto,local"}.get(key, "0.5,0.7")
    result = cli("sweep", "a cat", "--x", f"{key}={value}", "-o", "p.png")
    assert_clean_error(result, 2, f"--x {key}", "cannot be swept")


def test_sweep_size_is_bounded_before_any_work(tiny_sd1, tmp_path):
    with deadline(20, "a 10^9-cell sweep"):
        result = cli("sweep", "a cat", "-m", tiny_sd1, "--x", "seed=1-10000", "--y", "cfg=1-100 [10000]",
                     "--z", "steps=1-10", "-o", "p.png")
    assert_clean_error(result, 2, "10000 x 10000 x 10", "cells")
    assert "loading" not in result.stderr
    result = cli("sweep", "a cat", "-m", tiny_sd1, "--steps", "1", "-W", "4096", "-H", "4096", "--dtype", "fp32",
                 "--x", "seed=1-20", "-o", "p.png")
    assert_clean_error(result, 2, "p.png", "81920x4096 pixels")
    assert "cell 1/" not in result.stderr
    result = cli(*render_args(tiny_sd1, "-n", "20", "-o", "g/{index}.png", "--grid", "g.png"), "-W", "4096",
                 "-H", "4096")  # the later -W/-H win
    assert_clean_error(result, 2, "--grid g.png", "20480x16384 pixels")
    assert "saved" not in result.stderr and files_in(tmp_path) == []


def test_plot_labels_of_any_text_are_drawn():
    from sdcli.output import grid

    cell = Image.new("RGB", (64, 64))
    labels = ["a\x00b\x07\u202e\u05e9\u05dc\u05d5\u05dd\u200f\r\n\t", "\x1b[31mred", "z" * 3000]
    plot = grid.plot_grid([cell] * 3, labels, ["\u202e\x00"], title="t\x00")
    assert plot.width >= 64 * 3 and plot.height > 64


# ---------------------------------------------------------------- ControlNet


def test_crop_resize_resamples_only_what_stays(tiny_sd1, tmp_path, monkeypatch):
    """A 1x40000 hint, `crop` to 64x64: the whole hint was first scaled to 64x2560000 (491 MB of RGB)."""
    from sdcli.control.apply import fit_hint

    cn = make_controlnet(tmp_path / "cn.safetensors")
    Image.new("RGB", (1, 40_000), "white").save(tmp_path / "thin.png")
    sizes = []
    resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sizes.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    result = cli(*render_args(tiny_sd1, "--controlnet", cn, "--control-image", "thin.png", "--control-resize",
                              "crop", "-o", "o.png"))
    assert result.exit_code == 0, result.output
    assert sizes and max(sizes) <= 64 * 64 * 16, max(sizes)
    monkeypatch.setattr(Image.Image, "resize", resize)
    rng = np.random.default_rng(0)  # the same picture as scaling all of it and cutting the middle
    for src, dst in [((100, 37), (64, 64)), ((37, 100), (96, 64)), ((33, 1000), (64, 128)), ((640, 480), (72, 200))]:
        img = Image.fromarray(rng.integers(0, 256, (src[1], src[0], 3), dtype=np.uint8))
        scale = max(dst[0] / src[0], dst[1] / src[1])
        w, h = max(1, round(src[0] * scale)), max(1, round(src[1] * scale))
        left, top = (w - dst[0]) // 2, (h - dst[1]) // 2
        whole = img.resize((w, h), Image.Resampling.LANCZOS).crop((left, top, left + dst[0], top + dst[1]))
        ours = fit_hint(img, *dst, "crop")
        assert ours.size == dst
        assert np.abs(np.asarray(ours, dtype=int) - np.asarray(whole, dtype=int)).max() <= 1, (src, dst)


def test_controlnet_whose_hint_block_is_not_rgb_is_refused_before_the_load(tiny_sd1, tmp_path):
    """It loaded, then crashed in its first convolution while sampling (exit 1)."""
    state = load_file(str(make_controlnet(tmp_path / "cn.safetensors")))
    state["control_model.input_hint_block.0.weight"] = torch.randn(8, 1, 3, 3)
    save_file(state, str(tmp_path / "gray.safetensors"))
    Image.new("RGB", (64, 64)).save(tmp_path / "hint.png")
    result = cli(*render_args(tiny_sd1, "--controlnet", "gray.safetensors", "--control-image", "hint.png", "-o",
                              "o.png"))
    assert_clean_error(result, 8, "gray.safetensors", "1 channels", "RGB")
    assert "loading" not in result.stderr and not (tmp_path / "o.png").exists()


def test_diffusers_folder_configs_go_through_the_json_guard(tiny_sd1, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    folder = make_controlnet(tmp_path / "cnf", layout="diffusers-folder")
    (folder / "config.json").write_text(deep)
    Image.new("RGB", (64, 64)).save(tmp_path / "hint.png")
    result = cli(*render_args(tiny_sd1, "--controlnet", folder, "--control-image", "hint.png", "-o", "o.png"))
    assert_clean_error(result, 3, "config.json")
    assert_clean_error(cli("inspect", folder), 3, "config.json")
    _, taesd = write_taesd_files(tmp_path / "taesd")
    (tmp_path / "taesd" / "config.json").write_text(deep)
    assert_clean_error(cli("inspect", tmp_path / "taesd"), 3, "config.json")


def test_hint_images_are_read_before_the_load_and_a_bomb_is_one_line(tiny_sd1, tmp_path):
    """PIL's DecompressionBombWarning was printed before the error line, and only after the model loaded."""
    make_controlnet(tmp_path / "cn.safetensors")
    Image.new("1", (10_000, 10_000)).save(tmp_path / "bomb.png")  # 100 M pixels, 12 KB
    # A process of its own: pytest catches warnings in-process, so a printed one would not show there.
    env = dict(os.environ, OMP_NUM_THREADS="1", XDG_CONFIG_HOME=str(tmp_path / "xdg"), NO_COLOR="1",
               PYTHONPATH=str(ROOT))  # this checkout's sdcli, whatever is installed
    env.pop("SDCLI_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "sdcli", "generate", "x", "-m", str(tiny_sd1), "--controlnet",
                           "cn.safetensors", "--control-image", "bomb.png", "--steps", "1", "-W", "64", "-H", "64",
                           "-o", "o.png"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr
    assert proc.returncode == 3, err
    assert err.strip().splitlines() == [next(line for line in err.splitlines() if line.startswith("error:"))], err
    assert "bomb.png" in err and "pixel limit" in err
    Image.new("RGB", (64, 64), "white").save(tmp_path / "ok.png", compress_level=0)
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:-2000])
    result = cli(*render_args(tiny_sd1, "--controlnet", "cn.safetensors", "--control-image", "cut.png", "-o",
                              "o.png"))
    assert_clean_error(result, 3, "cut.png")
    assert "loading" not in result.stderr


# ---------------------------------------------------------------- embeddings folders


def test_embeddings_folder_with_link_loops_is_walked_once(tmp_path):
    """os.walk(followlinks=True) went round a link to a parent forever, its paths (and memory) growing."""
    write_embedding(tmp_path / "emb" / "sub" / "myemb.safetensors", "emb_params", {"*": random_vectors(2, 64)})
    os.symlink("..", tmp_path / "emb" / "sub" / "up")
    os.symlink(".", tmp_path / "emb" / "self")
    os.symlink("../sub", tmp_path / "emb" / "sub" / "again")
    with deadline(30, "an embeddings folder with link loops"):
        result = cli("inspect", "--prompt", "a myemb", "--embeddings-dir", tmp_path / "emb")
    assert result.exit_code == 0, result.output
    assert "embedding: myemb (2 vectors" in result.stdout


def test_embeddings_folder_walk_is_bounded(tmp_path, monkeypatch):
    from sdcli.text import embeddings

    monkeypatch.setattr(embeddings, "MAX_WALKED", 50)
    for i in range(60):
        (tmp_path / "emb" / f"d{i}").mkdir(parents=True)
    result = cli("inspect", "--prompt", "a cat", "--embeddings-dir", tmp_path / "emb")
    assert_clean_error(result, 3, "emb", "more than 50 files and folders")


# ---------------------------------------------------------------- metadata read back


def test_skip_existing_takes_only_whole_pngs_of_the_job(tiny_sd1, rendered, tmp_path):
    """Outputs were read with a bare PIL reader: a declared 30000x30000 size was DecompressionBombError (exit 1),
    and any file carrying the job's metadata counted as its image, pixels or not."""
    args = render_args(tiny_sd1, "-o", "a.png", "--seed", "3", "--skip-existing")
    meta = json.dumps(sdcli_meta(rendered))
    real = rendered.read_bytes()
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    huge = real[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + real[33:]
    crafted = {"huge": huge, "cut": real[:-20], "claims": None}
    for name, data in crafted.items():
        if data is None:
            _with_sdcli_json(rendered, tmp_path / "a.png", meta, size=(1, 1))
        else:
            (tmp_path / "a.png").write_bytes(data)
        before = (tmp_path / "a.png").read_bytes()
        assert_clean_error(cli(*args), 7, "a.png", "not this job's image")
        assert (tmp_path / "a.png").read_bytes() == before, name
    (tmp_path / "a.png").write_bytes(real)
    result = cli(*args)
    assert result.exit_code == 0 and "nothing to render" in result.stderr, result.output


def test_metadata_with_a_lone_surrogate_is_unreadable_not_a_crash(rendered, tmp_path):
    """JSON may spell "\\ud800"; inspect then failed to print it (UnicodeEncodeError, exit 1)."""
    text = json.dumps(sdcli_meta(rendered)).replace('"prompt": "a cat"', '"prompt": "a cat \\ud800"')
    assert "\\ud800" in text
    path = _with_sdcli_json(rendered, tmp_path / "s.png", text)
    result = cli("inspect", path)
    assert result.exit_code == 0 and "source: a1111" in result.stdout, result.output  # the infotext still reads
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["source"] == "a1111" and "\\ud800" in report["raw"]["sdcli"]  # the chunk as written
    emoji = json.dumps(sdcli_meta(rendered)).replace('"prompt": "a cat"', '"prompt": "a cat \\ud83d\\ude00"')
    result = cli("inspect", _with_sdcli_json(rendered, tmp_path / "e.png", emoji), "--json")
    assert json.loads(result.stdout)["source"] == "sdcli"  # an escaped pair is one character: kept


def test_names_from_metadata_are_bounded_in_errors(tiny_sd1, rendered, tmp_path):
    meta = sdcli_meta(rendered)
    many = [{"name": f"{'n' * 300}{i}", "sha256": "0" * 64, "weight": 1.0} for i in range(5000)]
    path = _with_sdcli_json(rendered, tmp_path / "l.png", json.dumps({**meta, "loras": many}))
    error = assert_clean_error(cli("verify", path, "-m", tiny_sd1), 2, "l.png", "(5000 in all)")
    assert len(error) < 1000
    path = _with_sdcli_json(rendered, tmp_path / "t.png", json.dumps({**meta, "embeddings": many}))
    error = assert_clean_error(cli("generate", "--from-image", path, "-m", tiny_sd1, "-o", "o.png"), 4, "t.png",
                               "(5000 in all)")
    assert len(error) < 1000


# ---------------------------------------------------------------- Ray and residency


@pytest.fixture
def ray_never_starts(monkeypatch):
    """ray.init fails the test: these runs must be refused before Ray starts."""
    import ray  # a test dependency (tests/test_ray.py needs it too)

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, what", [("x:y", "a port from 1 to 65535"), ("ray://", "HOST:PORT"),
                                           ("a b:1", "HOST:PORT"), ("h:99999", "a port"), ("closed", "nothing answers")])
def test_bad_ray_addresses_are_refused_before_ray_starts(tiny_sd1, address, what, ray_never_starts):
    """A dead HOST:PORT kept Ray retrying for minutes; `x:y` and a ray:// address without ray[client] were
    ValueErrors (exit 1)."""
    address = f"127.0.0.1:{_closed_port()}" if address == "closed" else address
    with deadline(60, f"--ray {address}"):
        result = cli(*render_args(tiny_sd1, "--ray", address, "-o", "o.png"))
    assert_clean_error(result, 2, "--ray", what)


@pytest.mark.parametrize("workers", ["0", "5000", "100000"])
def test_worker_counts_no_machine_takes_are_refused_before_ray_starts(tiny_sd1, workers, ray_never_starts):
    with deadline(60, f"--workers {workers}"):
        result = cli(*render_args(tiny_sd1, "--ray", "local", "--workers", workers, "-o", "o.png"))
    assert result.exit_code == 2 and "--workers" in result.stderr, result.output


@pytest.mark.parametrize("change", ["remove", "cut", "rewrite in place"])
def test_checkpoint_changed_while_a_part_is_read_again(tiny_sd1, tmp_path, monkeypatch, change):
    """Lean residency reads the text encoder again for job 2; the file went away meanwhile (FileNotFoundError,
    exit 1), was cut (named as a damaged file) or rewritten with its size and mtime put back (used)."""
    from sdcli.app import save
    from sdcli.loading import residency

    model = tmp_path / "m.safetensors"
    model.write_bytes(tiny_sd1.read_bytes())
    write = save.save_rendered

    def write_then_change(*args, **kwargs):
        write(*args, **kwargs)
        if not model.exists():
            return
        st = model.stat()
        if change == "remove":
            model.unlink()
        elif change == "cut":
            os.truncate(model, st.st_size // 2)
        else:
            data = bytearray(model.read_bytes())
            data[-64:] = bytes(64)
            model.write_bytes(bytes(data))
            os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(save, "save_rendered", write_then_change)
    monkeypatch.setenv(residency.POLICY_ENV, "lean")
    (tmp_path / "jobs.txt").write_text("a fox\na cat\n")
    result = cli("generate", "--prompts-file", "jobs.txt", "-m", model, "--steps", "1", "-W", "64", "-H", "64",
                 "--dtype", "fp32", "--device", "cpu", "-o", "j-{index}.png")
    assert_clean_error(result, 3, str(model), "removed since it was loaded" if change == "remove" else "changed on disk")
    assert (tmp_path / "j-0.png").exists() and not (tmp_path / "j-1.png").exists()
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("changed", ["unet gguf", "clip-l file"])
@pytest.mark.parametrize("change", ["remove", "rewrite in place"])
def test_gguf_and_encoder_files_changed_while_a_part_is_read_again(tiny_sd1, tmp_path, monkeypatch, changed, change):
    """The same rule for main's separate files: a city96 UNet GGUF with --vae and --clip-l, lean residency reading
    the parts again for job 2; whichever file changed is named, and job 2 is not written."""
    from sdcli.app import save
    from sdcli.loading import residency

    unet, clip = _unet_gguf(tiny_sd1, tmp_path / "u.gguf"), _clip_file(tiny_sd1, tmp_path / "clip_l.safetensors")
    target = unet if changed == "unet gguf" else clip
    write = save.save_rendered

    def write_then_change(*args, **kwargs):
        write(*args, **kwargs)
        if not target.exists():
            return
        st = target.stat()
        if change == "remove":
            target.unlink()
        else:
            data = bytearray(target.read_bytes())
            data[-64:] = bytes(64)
            target.write_bytes(bytes(data))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(save, "save_rendered", write_then_change)
    monkeypatch.setenv(residency.POLICY_ENV, "lean")
    (tmp_path / "jobs.txt").write_text("a fox\na cat\n")
    result = cli("generate", "--prompts-file", "jobs.txt", "-m", unet, "--vae", tiny_sd1, "--clip-l", clip, "--steps",
                 "1", "-W", "64", "-H", "64", "--dtype", "fp32", "--device", "cpu", "-o", "j-{index}.png")
    assert_clean_error(result, 3, str(target), "removed since it was loaded" if change == "remove" else "changed on disk")
    assert (tmp_path / "j-0.png").exists() and not (tmp_path / "j-1.png").exists()
    assert temp_files(tmp_path) == []


def test_a_hires_upscaler_replaced_between_runs_of_one_process_is_read_again(tiny_sd1, tmp_path):
    """The hires upscaler's network was cached by path for the process: a second run (as `serve` makes, or any
    in-process caller) after the file was replaced used the old network, and recorded the new file's hash."""
    from make_upscaler import write_rrdb

    from sdcli.models.esrgan import RRDBConfig

    cfg = RRDBConfig(num_features=8, num_blocks=1)
    path, other = tmp_path / "4x-A.pth", write_rrdb(tmp_path / "4x-B.pth", cfg, layout="old", seed=1)
    write_rrdb(path, cfg, layout="old", seed=0)
    hires = ["--hires-scale", "2", "--hires-steps", "1", "--hires-upscaler"]

    def render(upscaler: Path, name: str) -> np.ndarray:
        result = cli(*render_args(tiny_sd1, *hires, upscaler, "-o", name))
        assert result.exit_code == 0, result.output
        return np.asarray(Image.open(tmp_path / name))

    first = render(path, "first.png")
    path.write_bytes(other.read_bytes())  # 4x-A.pth is now B's weights
    again, fresh = render(path, "again.png"), render(other, "fresh.png")
    assert not np.array_equal(first, fresh)  # the two networks do give different images
    assert np.array_equal(again, fresh)
    recorded = [sdcli_meta(tmp_path / name)["hires_upscaler"]["sha256"] for name in ("again.png", "fresh.png")]
    assert recorded[0] == recorded[1]  # and the record names the network that ran


def test_a_vae_of_another_latent_space_is_refused_before_the_load(tiny_sd1, tmp_path):
    """A 16-channel VAE (SD3/FLUX's ae.safetensors) with an SD model, or its latents decoded by SD's VAE: exit 1 in
    the VAE's first convolution, after the whole render. Now named, before any part is read."""
    from make_checkpoint import vae16_state

    from sdcli.output import latents

    save_file({f"first_stage_model.{k}" if not k.startswith("first_stage_model.") else k: v
               for k, v in vae16_state(9).items()}, str(tmp_path / "ae.safetensors"))  # fmt: skip
    result = cli(*render_args(tiny_sd1, "--vae", "ae.safetensors", "-o", "o.png"))
    assert_clean_error(result, 3, "ae.safetensors", "16 latent channels", "have 4")
    assert "loading" in result.stderr and not (tmp_path / "o.png").exists()
    latents.save_latent(tmp_path / "z.safetensors", torch.zeros(1, 16, 8, 8), scaled=True, scale_factor=0.3611,
                        family=None, source_size=None, model_hash=None)  # fmt: skip
    for flag in ("--vae", "-m"):
        result = cli("decode", "z.safetensors", flag, tiny_sd1, "--device", "cpu", "-o", "d.png")
        assert_clean_error(result, 3, "z.safetensors", "latents of 16 channels", "decodes 4")
    assert files_in(tmp_path) == ["ae.safetensors", "z.safetensors"]


def test_a_prompts_file_of_100000_lines_and_a_sheet_of_them_end_before_the_load(tiny_sd1, tmp_path):
    """100,000 lines read and planned in bounded time; their contact sheet (20288x20224 at 64 px) was refused only
    after the model loaded; a bad last line is named by its number."""
    (tmp_path / "p.txt").write_text("".join(f"a cat {i}\n" for i in range(100_000)))
    with deadline(120, "a 100,000-line prompts file"):
        result = cli("generate", "--prompts-file", "p.txt", *render_args(tiny_sd1)[2:], "-o", "g/{index}.png",
                     "--grid", "g.png")
    assert_clean_error(result, 2, "--grid g.png", "pixels")
    assert "loading" not in result.stderr and not (tmp_path / "g").exists()
    with open(tmp_path / "p.txt", "a") as f:
        f.write(json.dumps({"prompt": "a", "stepz": 1}) + "\n")
    with deadline(120, "a 100,001-line prompts file"):
        result = cli("generate", "--prompts-file", "p.txt", "--dry-run")
    assert_clean_error(result, 3, "p.txt:100001", "unknown key 'stepz'")


def test_ray_skip_existing_refuses_a_crafted_file_before_ray_starts(tiny_sd1, rendered, tmp_path, ray_never_starts):
    """A file that claims this job's metadata but holds other pixels, under --ray: refused in the plan, Ray unused."""
    meta = json.dumps(sdcli_meta(rendered))
    _with_sdcli_json(rendered, tmp_path / "a.png", meta, size=(1, 1))
    before = (tmp_path / "a.png").read_bytes()
    result = cli(*render_args(tiny_sd1, "-o", "a.png", "--seed", "3", "--skip-existing", "--ray", "local"))
    assert_clean_error(result, 7, "a.png", "not this job's image")
    assert (tmp_path / "a.png").read_bytes() == before


def test_sweep_labels_of_control_and_right_to_left_text_through_the_command(tiny_sd1, tmp_path):
    values = "\x1b[31mred,\u202e\u05e9\u05dc\u05d5\u05dd\u200f x,a\x07b\x00c"
    result = cli("sweep", "a cat", "-m", tiny_sd1, "--steps", "1", "-W", "64", "-H", "64", "--dtype", "fp32",
                 "--x", f"negative={values}", "-o", "plot.png")
    assert result.exit_code == 0, result.output
    plot = json.loads((tmp_path / "plot.json").read_text())
    assert Image.open(tmp_path / "plot.png").width >= 3 * 64 and len(json.dumps(plot)) > 0


def test_embeddings_named_like_words_and_syntax_are_shown_where_they_take_the_prompt(tiny_sd1, tmp_path):
    """Files named `a`, `cat`, `BREAK`, `AND` or `(`: A1111 takes a word that is an embedding's name for it; sdcli
    does the same, and `inspect --prompt` shows which words became vectors; BREAK and weights keep their meaning."""
    for name in ("cat", "BREAK", "AND", "("):
        write_embedding(tmp_path / "emb" / f"{name}.safetensors", "emb_params", {"*": random_vectors(2, 64)})
    result = cli("inspect", "--prompt", "a cat BREAK (dog:1.2) AND x", "--embeddings-dir", "emb")
    assert result.exit_code == 0, result.output
    assert "embedding: cat (2 vectors" in result.stdout and "embedding: AND (2 vectors" in result.stdout
    assert "embedding: BREAK" not in result.stdout and "embedding: (" not in result.stdout
    result = cli(*render_args(tiny_sd1, "--embeddings-dir", "emb", "-o", "o.png"))
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- the HTML report stays inert


EVIL_PROMPT = 'a cat </style><script>alert(1)</script> "><img src=x onerror=alert(2)> javascript:alert(3)'


@pytest.mark.parametrize("variant", ["--report", "--report-dir"])
def test_report_of_hostile_prompts_and_names_is_inert(tiny_sd1, tmp_path, variant):
    """Markup, quotes, `</style>` and `javascript:` in a prompt and an image's file name: the page holds no element,
    attribute or URL the input made (every <img> source is a data: URI or a PNG beside the page)."""
    from html.parser import HTMLParser

    name = 'x"><script>alert(4)<\u2215script>javascript:alert(5).png'
    result = cli("generate", EVIL_PROMPT, *render_args(tiny_sd1, "-o", name)[2:])
    assert result.exit_code == 0, result.output
    target = "r.html" if variant == "--report" else "rep"
    result = cli("verify", name, "-m", tiny_sd1, variant, target)
    assert result.exit_code == 0, result.output
    page = (tmp_path / target if variant == "--report" else tmp_path / "rep" / "index.html").read_text()

    class Seen(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.sources, self.handlers, self.data, self.open = [], [], [], {}, None

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.sources += [v for k, v in attrs if k in ("src", "href", "action", "srcset")]
            self.handlers += [k for k, _ in attrs if k.startswith("on")]
            self.open = tag

        def handle_data(self, data):
            if self.open in ("script", "style"):
                self.data[self.open] = self.data.get(self.open, "") + data

    seen = Seen()
    seen.feed(page)
    assert seen.tags.count("script") == 1 and seen.tags.count("style") == 1  # the page's own (JSON data, CSS)
    assert seen.tags.count("img") == 4  # stored, re-render, difference, legend: none from the prompt
    assert not {"a", "iframe", "object", "embed", "form", "base", "link"} & set(seen.tags)
    assert not seen.handlers and "javascript:" not in "".join(seen.sources)
    assert all(s.startswith("data:image/png;base64,") or re.fullmatch(r"[\w.-]+\.png", s) for s in seen.sources)
    assert "</style>" not in seen.data["style"] and "script" not in seen.data["style"]
    assert "Content-Security-Policy" in page and "default-src 'none'" in page  # and nothing may be fetched
    assert EVIL_PROMPT.replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") in page  # shown as text
    assert html.escape(name, quote=True) in page
    (result_json,) = json.loads(seen.data["script"])  # the data block round-trips the name, holding no '<'
    assert result_json["path"].endswith(name) and "<" not in seen.data["script"]
    if variant == "--report-dir":
        assert all(re.fullmatch(r"[\w.-]+\.(png|html)", f) for f in files_in(tmp_path / "rep"))
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [name]  # nothing outside the folder
