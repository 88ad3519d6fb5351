"""Refactors (issue 13: family registry, Cond, split of loading/checkpoint.py and runner.py; issue 23: modules grouped into packages) change no output byte.

The package as it was at the base commit (BASE_COMMIT: main just before the refactor landed, with every output
change made in parallel to it, e.g. "RNG: CPU" in the infotext) is extracted with `git archive` into a temp folder; the same
fixed commands (txt2img, batch, img2img, inpaint, hires fix, LoRA from a flag and from a prompt tag, LoRA sets that
switch between jobs, seamless, prompt editing, --from-image, encode --text -> --cond, latents out and decode, SD2
single file and diffusers folder) are run once with the old package and once with this one, each package in one
subprocess, and every file written must be identical: PNG files byte for byte (pixels and metadata), latent and
embedding files in their header (as parsed) and tensor bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd2, tiny_sd2_diffusers  # noqa: F401
from make_checkpoint import make_checkpoint
from sdcli.formats.safetensors import read_header

# A deliberate change of output bytes (a new infotext field, a numerics fix) moves this to the commit that made it;
# a refactor never does.
BASE_COMMIT = "27b30d1"  # issue 31 round 4: fp32 on x86-64 runs channels_last, large 3x3 convolutions packed
ROOT = Path(__file__).resolve().parents[1]

DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
from typer.testing import CliRunner
import sdcli
from sdcli.cli import app

runner = CliRunner()
for args in json.loads(sys.argv[1]):
    result = runner.invoke(app, args)
    if result.exit_code != 0:
        print(json.dumps({"args": args, "exit": result.exit_code, "stderr": result.stderr[-3000:],
                          "exception": repr(result.exception)}))
        sys.exit(1)
print(json.dumps({"package": sdcli.__file__}))
"""


def _old_package(dest: Path) -> Path:
    """The sdcli/ folder of the base commit, extracted under `dest`."""
    if shutil.which("git") is None:
        pytest.fail("test_refactor_bytes needs git to extract the base commit's package; git is not installed")
    archive = dest / "base.tar"
    done = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), BASE_COMMIT, "sdcli"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot extract sdcli/ of base commit {BASE_COMMIT} with git archive (a repository without "
                    f"its git history?): {done.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "old", filter="data")
    return dest / "old"


def _inputs(folder: Path, tiny_sd1: Path) -> dict[str, Path]:  # noqa: F811
    folder.mkdir()
    grid = np.indices((64, 64)).sum(axis=0)
    image = np.stack([grid * 2, 255 - grid * 2, (grid * 7) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(image).save(folder / "input.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "loras").mkdir()
    _lora(folder / "loras" / "style.safetensors", tiny_sd1, seed=1)
    _lora(folder / "flag.safetensors", tiny_sd1, seed=2)
    (folder / "prompts.txt").write_text("a fox <lora:style:0.7>\na cat in the snow\n")
    return {"input": folder / "input.png", "mask": folder / "mask.png", "loras": folder / "loras",
            "flag_lora": folder / "flag.safetensors", "prompts": folder / "prompts.txt"}


def _lora(path: Path, model: Path, seed: int) -> None:
    """A LoRA on one text-encoder Linear and one UNet proj_in (named the kohya/diffusers way)."""
    g = torch.Generator().manual_seed(seed)
    shape = read_header(model)["model.diffusion_model.input_blocks.1.1.proj_in.weight"]["shape"]
    out_ch, in_ch, tail = shape[0], shape[1], shape[2:]
    tensors = {
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight": torch.randn(4, 64, generator=g),
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight": torch.randn(64, 4, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, in_ch, *tail, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(out_ch, 4, *tail, generator=g),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
    }
    save_file({k: v.contiguous() * 0.1 for k, v in tensors.items()}, str(path))


def _commands(models: dict[str, Path], inp: dict[str, Path]) -> list[list[str]]:
    place = ["--device", "cpu", "--dtype", "fp32"]
    sd1 = ["-m", str(models["sd1"]), *place]
    fast = ["--steps", "3", "--cfg", "5", "--negative", "blurry"]
    render = [*sd1, *fast, "-W", "64", "-H", "64"]
    image = ["-i", str(inp["input"])]
    return [
        ["generate", "a watercolor fox, (autumn:1.2)", *render, "--seed", "1", "--sampler", "euler_a",
         "-o", "t2i.png", "--latent-out", "t2i.safetensors"],
        ["generate", "a fox BREAK in the snow", *render, "--seed", "2", "-n", "3", "--batch-size", "2", "--sampler",
         "DPM++ 2M Karras", "-o", "batch_{index}.png"],
        ["img2img", "a fox", *image, *sd1, *fast, "--strength", "0.6", "--seed", "3", "-o", "i2i.png"],
        ["img2img", "a fox", *image, "--mask", str(inp["mask"]), "-m", str(models["inpaint"]), *place, *fast,
         "--seed", "4", "-o", "inpaint.png"],
        ["img2img", "a fox", *image, "--mask", str(inp["mask"]), "-m", str(models["inpaint"]), *place, *fast,
         "--strength", "0.7", "--seed", "4", "-o", "inpaint_07.png"],
        ["generate", "a fox", *render, "--seed", "5", "--hires-scale", "1.5", "--hires-steps", "2",
         "--sampler", "dpm++_2m_sde", "-o", "hires.png"],
        ["generate", "a fox <lora:style:0.5>", *render, "--seed", "6", "--lora", f"{inp['flag_lora']}:0.8",
         "--lora-dir", str(inp["loras"]), "-o", "lora.png"],
        ["generate", "--prompts-file", str(inp["prompts"]), *render, "--seed", "7", "--lora-dir",
         str(inp["loras"]), "-o", "jobs_{index}.png"],
        ["generate", "a tiled wall", *render, "--seed", "8", "--seamless", "-o", "seamless.png"],
        ["generate", "a [fox:cat:0.5] in [snow|rain]", *render, "--seed", "9", "--negative", "[blurry::2]",
         "--sampler", "heun", "--hires-scale", "1.25", "-o", "editing.png"],
        ["generate", "--from-image", "t2i.png", *sd1, "-o", "replay.png"],
        ["encode", "--text", "a fox in the snow", *sd1, "-o", "emb.safetensors"],
        ["generate", "--cond", "emb.safetensors", *render, "--seed", "10", "-o", "cond.png"],
        ["decode", "t2i.safetensors", *sd1, "-o", "decoded.png"],
        ["encode", str(inp["input"]), *sd1, "-o", "encoded.safetensors"],
        ["generate", "a fox", "-m", str(models["sd2"]), *place, *fast, "-W", "64", "-H", "64", "--seed", "11",
         "--clip-skip", "2", "-o", "sd2.png"],
        ["generate", "a fox", "-m", str(models["sd2_diffusers"]), *place, *fast, "-W", "64", "-H", "64",
         "--seed", "12", "--guidance-rescale", "0.5", "-o", "sd2_diffusers.png"],
    ]


def _render(package_root: Path, out: Path, commands: list[list[str]], cache: Path) -> None:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(package_root), "XDG_CACHE_HOME": str(cache),
           "XDG_CONFIG_HOME": str(out.parent / "xdg-config"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (package_root, done.stdout[-4000:], done.stderr[-4000:])
    used = json.loads(done.stdout.strip().splitlines()[-1])["package"]
    assert Path(used).resolve().is_relative_to(package_root.resolve()), (used, package_root)


@pytest.fixture(scope="module")
def tiny_inpaint_model(tiny_models_dir):  # noqa: F811
    out = tiny_models_dir / "tiny_sd1_inpaint.safetensors"
    if not out.exists():
        make_checkpoint(out, "sd1", "tiny", seed=0, layout="single", inpaint=True)
    return out


def test_outputs_are_byte_identical_to_the_base_commit(tmp_path, tiny_sd1, tiny_sd2, tiny_sd2_diffusers,  # noqa: F811
                                                       tiny_inpaint_model):
    old = _old_package(tmp_path)
    inp = _inputs(tmp_path / "inputs", tiny_sd1)
    models = {"sd1": tiny_sd1, "sd2": tiny_sd2, "sd2_diffusers": tiny_sd2_diffusers, "inpaint": tiny_inpaint_model}
    commands = _commands(models, inp)
    _render(old, tmp_path / "out_old", commands, tmp_path / "cache")
    _render(ROOT, tmp_path / "out_new", commands, tmp_path / "cache")
    old_files = sorted(p.name for p in (tmp_path / "out_old").iterdir())
    new_files = sorted(p.name for p in (tmp_path / "out_new").iterdir())
    assert old_files == new_files
    assert len(old_files) >= 20
    differ = [n for n in old_files if _content(tmp_path / "out_old" / n) != _content(tmp_path / "out_new" / n)]
    assert not differ, f"outputs differ from the base commit's: {differ}"


# Config keys added since the base commit: the sdcli metadata chunk records the whole config, so at their
# defaults they are left out of the comparison (everything else of the PNG is compared: pixels, every chunk).
NEW_KEYS = {"original_size": None, "target_size": None, "crop_coords": None, "aesthetic_score": 6.0,
            "negative_aesthetic_score": 2.5, "refiner": None, "refiner_switch": 0.8,
            "mask_blur": None, "inpaint_fill": "original", "inpaint_area": "whole", "inpaint_padding": 32,
            "mask_invert": False, "overlay": None, "pad": None}


def _content(path: Path):
    """A PNG's pixels and text chunks (the sdcli chunk parsed, config keys added since the base commit left out at
    their defaults); a safetensors file's parsed header and data bytes (safetensors writes its metadata map in
    an order that changes from process to process, so two equal files need not be equal byte for byte)."""
    data = path.read_bytes()
    if path.suffix == ".png":
        image = Image.open(path)
        chunks = dict(image.text)
        if "sdcli" in chunks:
            record = json.loads(chunks["sdcli"])
            config = record.get("config", {})
            record["config"] = {k: v for k, v in config.items() if k not in NEW_KEYS or NEW_KEYS[k] != v}
            chunks["sdcli"] = record
        return np.asarray(image).tobytes(), image.size, image.mode, chunks
    if path.suffix != ".safetensors":
        return data
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]
