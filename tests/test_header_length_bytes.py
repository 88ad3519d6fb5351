"""A safetensors file is decided by its header, never by its first byte (issue 32).

A safetensors file starts with its JSON header's length, 8 bytes little-endian, and the safetensors library pads
the header to a multiple of 8: the first byte of a valid file is one of 32 values, two of which are 0x80 (a pickle's
first byte) and 0x3C ('<', an HTML page's). Files written by the library itself with every one of the 32 low bytes
(the metadata's length varied) must load through every reader; the magic-number sniffing only explains a file that
failed the header test.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save, save_file

from _cli import invoker
from _fixtures_embeddings import random_vectors, write_embedding
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from _fixtures_taesd import write_taesd_files
from make_checkpoint import make_controlnet
from sdcli.formats.diffusers import open_source
from sdcli.formats.pickle_ckpt import is_pickle
from sdcli.formats.safetensors import read_header
from sdcli.formats.safetensors_header import METADATA_KEY
from sdcli.output.latents import load_latent, save_latent
from sdcli.runtime.errors import BadInputError

LOW_BYTES = list(range(0, 256, 8))  # every low byte a padded header length can have
# The two lengths that fooled the sniffing: a first byte of 0x80 (pickle's opcode), and a space then '<' (0x3C20:
# 0x3C itself is not a multiple of 8, but the HTML sniff skipped leading whitespace).
CRITICAL = [(0x80, 0xFF), (0x3C20, 0xFFFF)]  # (value, mask) of the header length


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def with_length(tensors: dict[str, torch.Tensor], metadata: dict[str, str], value: int, mask: int = 0xFF) -> bytes:
    """The safetensors library's own bytes for `tensors`, with a padding metadata value sized so that the header
    length's low bits (`mask`) are `value`. Each character of padding adds one byte of JSON before the library's
    padding to a multiple of 8, so the right amount is found near the difference."""
    base = header_length(save(tensors, metadata={**metadata, "pad": ""}))
    delta = (value - base) & mask
    for pad in range(max(0, delta - 8), delta + 9):
        data = save(tensors, metadata={**metadata, "pad": "x" * pad})
        if header_length(data) & mask == value:
            return data
    raise AssertionError(f"no padding gives a header length ending in {value:#x}")


def rewrite(path: Path, value: int, out: Path | None = None, mask: int = 0xFF) -> Path:
    """`path` (a safetensors file) written again by the library, its metadata kept, with a header length whose
    low bits are `value`."""
    data = path.read_bytes()
    meta = json.loads(data[8 : 8 + header_length(data)]).get(METADATA_KEY) or {}
    out = out or path
    out.write_bytes(with_length(load_file(str(path)), meta, value, mask))
    assert header_length(out.read_bytes()[:8]) & mask == value
    return out


@pytest.mark.parametrize("low", LOW_BYTES)
def test_every_low_byte_reads_as_safetensors(tmp_path, low):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    path = tmp_path / "w.safetensors"
    path.write_bytes(with_length(tensors, {"note": "hello"}, low))
    assert path.read_bytes()[0] == low
    header = read_header(path)
    assert header["a"]["shape"] == [2, 3] and header[METADATA_KEY]["note"] == "hello"
    assert not is_pickle(path)
    source = open_source(path)  # the loader's own way in
    assert set(source.entries) == {"a", "b"}
    ckpt_named = path.rename(tmp_path / "w.ckpt")  # a pickle extension only opts in to unpickling a real pickle
    assert not is_pickle(ckpt_named) and set(open_source(ckpt_named).entries) == {"a", "b"}


@pytest.mark.parametrize("low", LOW_BYTES)
def test_every_low_byte_reads_as_a_latent_file(tmp_path, low):
    path = save_latent(tmp_path / "z.safetensors", torch.randn(1, 4, 8, 8), scaled=True, scale_factor=0.18215,
                       family="", source_size=None, model_hash=None)
    rewrite(path, low)
    assert load_latent(path).latent.shape == (1, 4, 8, 8)


def test_real_pickles_and_pages_are_still_named(tmp_path):
    """The explanations still come for files that fail the header test."""
    pickle_file = tmp_path / "p.safetensors"
    torch.save({"w": torch.ones(2)}, pickle_file, _use_new_zipfile_serialization=False)
    html = tmp_path / "h.safetensors"
    html.write_bytes(b"<!DOCTYPE html><html>not found</html>")
    zipped = tmp_path / "z.safetensors"
    torch.save({"w": torch.ones(2)}, zipped)
    for path, word in ((pickle_file, "pickle"), (html, "HTML"), (zipped, "zip")):
        with pytest.raises(BadInputError, match=word):
            read_header(path)
    assert is_pickle(pickle_file) and is_pickle(zipped)


# --- every reader, through the real command, with the two low bytes that fooled the sniffing ------------------

@pytest.fixture
def run(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    render = ["--device", "cpu", "--dtype", "fp32", "--steps", "1", "-W", "64", "-H", "64", "--seed", "1"]
    return invoker({"generate": render, "decode": ["--device", "cpu", "--dtype", "fp32"]})


def _vae_of(model: Path, out: Path) -> Path:
    vae = {k: v for k, v in load_file(str(model)).items() if k.startswith("first_stage_model.")}
    save_file(vae, str(out))
    return out


def _lora(model: Path, out: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    shape = read_header(model)["model.diffusion_model.input_blocks.1.1.proj_in.weight"]["shape"]
    tensors = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, shape[1], *shape[2:], generator=g),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(shape[0], 4, *shape[2:], generator=g),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}
    save_file({k: v.contiguous() * 0.1 for k, v in tensors.items()}, str(out))
    return out


@pytest.mark.parametrize("value,mask", CRITICAL)
def test_every_reader_takes_the_file(run, tiny_sd1, tmp_path, value, mask):  # noqa: F811
    low = dict(value=value, mask=mask)
    model = rewrite(tiny_sd1, out=tmp_path / "model.safetensors", **low)
    assert model.read_bytes()[:2] in (b"\x80" + model.read_bytes()[1:2], b" <")
    vae = rewrite(_vae_of(tiny_sd1, tmp_path / "vae.safetensors"), **low)
    lora = rewrite(_lora(tiny_sd1, tmp_path / "lora.safetensors"), **low)
    emb_dir = tmp_path / "emb"
    rewrite(write_embedding(emb_dir / "myemb.safetensors", "emb_params", {"*": random_vectors(2, 32)}), **low)
    cn = rewrite(make_controlnet(tmp_path / "cn.safetensors", "sd1"), **low)
    _, taesd = write_taesd_files(tmp_path / "taesd")
    tae_dec = rewrite(taesd["decoder"], **low)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "h.png")

    run("inspect", str(model))
    run("generate", "a myemb fox", "-m", str(model), "--vae", str(vae), "--lora", str(lora), "--embeddings-dir",
        str(emb_dir), "--controlnet", str(cn), "--control-image", str(tmp_path / "h.png"), "-o", "a.png",
        "--latent-out", "a.safetensors")
    latent = rewrite(tmp_path / "a.safetensors", **low)
    run("inspect", str(latent))
    run("decode", str(latent), "--vae", str(tae_dec), "-o", "fast.png")
    run("decode", str(latent), "-m", str(model), "-o", "full.png")
    assert (tmp_path / "a.png").is_file() and (tmp_path / "fast.png").is_file() and (tmp_path / "full.png").is_file()
