"""Hostile files (issue 12): crafted safetensors headers, LoRA, latent and PNG files through the real commands.
Each is one `error:` line naming the file (and the tensor), the documented exit code, no traceback, no crash.

The safetensors rules are held against the safetensors library itself: for every crafted header, sdcli accepts
exactly the files the library accepts (sdcli/formats/safetensors_header.py lists where it is stricter)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sdcli.runtime.errors import BadInputError
from sdcli.formats.safetensors_header import decode_header


def split(data: bytes) -> tuple[dict, bytes]:
    """(header, data section) of a safetensors file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body: bytes, raw: bytes | None = None) -> bytes:
    raw = json.dumps(header).encode() if raw is None else raw
    return struct.pack("<Q", len(raw)) + raw + body


def library_accepts(data: bytes) -> bool:
    try:
        st_load(data)
        return True
    except (SafetensorError, ValueError, KeyError, OverflowError):
        return False


def sdcli_accepts(data: bytes) -> bool:
    (n,) = struct.unpack("<Q", data[:8])
    try:
        decode_header("x.safetensors", data[8 : 8 + n], len(data) - 8 - n)
        return True
    except BadInputError:
        return False


def _two_tensors() -> bytes:
    return st_save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)},
                   metadata={"k": "v"})


def _edit(entry: str, field: str, value):
    def edit(h):
        h[entry][field] = value
    return edit


# Crafted headers, each (label, edit of the header dict of _two_tensors(), body edit or None). The offsets are
# read from the file the library wrote (it orders tensors by dtype alignment).
def _cases():
    header, body = split(_two_tensors())
    a0, a1 = header["a"]["data_offsets"]
    b0, b1 = header["b"]["data_offsets"]
    size = len(body)
    return [
        ("valid", lambda h: None, None),
        ("range longer than the shape", _edit("a", "shape", [2, 2]), None),  # the heap write of issue 12
        ("range shorter than the shape", _edit("a", "shape", [2, 4]), None),
        ("overlap", _edit("b", "data_offsets", [a0, a0 + 8]), None),
        ("negative begin", _edit("a", "data_offsets", [-24, 0]), None),
        ("end before begin", _edit("a", "data_offsets", [a1, a0]), None),
        ("past the end", _edit("b", "data_offsets", [b0 + size, b1 + size]), None),
        ("float offsets", _edit("a", "data_offsets", [float(a0), float(a1)]), None),
        ("string offsets", _edit("a", "data_offsets", [str(a0), str(a1)]), None),
        ("three offsets", _edit("a", "data_offsets", [a0, a1, a1]), None),
        ("offsets an object", _edit("a", "data_offsets", {"0": a0}), None),
        ("huge offsets", _edit("a", "data_offsets", [2**64 + a0, 2**64 + a1]), None),
        ("negative dim", _edit("a", "shape", [-2, -3]), None),
        ("string dim", _edit("a", "shape", ["2", 3]), None),
        ("bool dim", _edit("a", "shape", [True, 6]), None),
        ("float dim", _edit("a", "shape", [2.0, 3]), None),
        ("huge dims", _edit("a", "shape", [2**40, 2**40, 2**40]), None),
        ("dim over usize", _edit("a", "shape", [2**64, 1]), None),
        ("shape not a list", _edit("a", "shape", 6), None),
        ("unknown dtype", _edit("a", "dtype", "F33"), None),
        ("dtype not a string", _edit("a", "dtype", 4), None),
        ("lower-case dtype", _edit("a", "dtype", "f32"), None),
        ("missing shape", lambda h: h["a"].pop("shape"), None),
        ("entry not an object", lambda h: h.update(a=[1, 2]), None),
        ("metadata a list", lambda h: h.update(__metadata__=["k", "v"]), None),
        ("metadata value a number", lambda h: h.update(__metadata__={"k": 1}), None),
        ("metadata value an object", lambda h: h.update(__metadata__={"k": {"x": "y"}}), None),
        ("metadata null", lambda h: h.update(__metadata__=None), None),
        ("gap between tensors", lambda h: None, "gap"),
        ("trailing bytes", lambda h: None, "trailing"),
        ("truncated body", lambda h: None, "truncate"),
        ("zero-sized tensor", lambda h: h.update(z={"dtype": "F32", "shape": [0, 5], "data_offsets": [size, size]}),
         None),
        ("extra field", _edit("a", "extra", 1), None),
    ]  # fmt: skip


def _crafted(edit, body_edit) -> bytes:
    header, body = split(_two_tensors())
    edit(header)
    if body_edit == "gap":  # move b one element further and grow the body: a hole at b's old place
        b0, b1 = header["b"]["data_offsets"]
        last = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        header["b"]["data_offsets"] = [last + 2, last + 2 + (b1 - b0)]
        body += bytes(2 + b1 - b0)
    elif body_edit == "trailing":
        body += b"\0" * 8
    elif body_edit == "truncate":
        body = body[:-2]
    return join(header, body)


CASES = _cases()


@pytest.mark.parametrize("label, edit, body_edit", CASES, ids=[c[0] for c in CASES])
def test_header_rules_match_the_safetensors_library(label, edit, body_edit):
    data = _crafted(edit, body_edit)
    assert sdcli_accepts(data) == library_accepts(data), label


RAW_HEADERS = [
    ("deep JSON", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ("deep JSON, shallower than Python's limit", b'{"a": ' + b"[" * 500 + b"]" * 500 + b"}", "tensor 'a'"),
    ("NaN literal", b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}', "not JSON"),
    ("integer of 5000 digits", b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 0]}}',
     "not JSON"),
    ("exponent integer", b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 0]}}', "tensor 'a'"),
    ("not UTF-8", b'{"a\xff": 1}', "not UTF-8"),
    ("a string", b'"abc"', "not a JSON object"),
    ("sub-byte dtype", b'{"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}', "unsupported dtype"),
]  # fmt: skip


@pytest.mark.parametrize("label, raw, what", RAW_HEADERS, ids=[c[0] for c in RAW_HEADERS])
def test_raw_headers_are_refused_with_a_reason(label, raw, what):
    with pytest.raises(BadInputError, match=what):
        decode_header("x.safetensors", raw, 1)


# ---------------------------------------------------------------- through the real commands


def _craft_model(src: Path, dst: Path, edit) -> Path:
    header, body = split(src.read_bytes())
    edit(header)
    dst.write_bytes(join(header, body))
    return dst


KEY = "model.diffusion_model.out.2.bias"  # F32 [4]


def _longer_range(h):  # the exact case that wrote past a buffer: the range says 16 bytes, the shape 8
    h[KEY]["shape"] = [2]


def _overlap(h):
    other = "model.diffusion_model.out.2.weight"
    h[KEY]["data_offsets"] = [h[other]["data_offsets"][0], h[other]["data_offsets"][0] + 16]


def _string_dim(h):
    h[KEY]["shape"] = ["4"]


def _bad_metadata(h):
    h["__metadata__"] = {"modelspec.prediction_type": ["v"]}


MODEL_EDITS = {"longer range": (_longer_range, f"tensor '{KEY}'"), "overlap": (_overlap, "overlap tensor"),
               "string dim": (_string_dim, f"tensor '{KEY}'"), "metadata": (_bad_metadata, "__metadata__")}


@pytest.mark.parametrize("kind", sorted(MODEL_EDITS))
def test_crafted_checkpoint_is_refused_by_generate_and_inspect(tiny_sd1, tmp_path, kind):
    edit, what = MODEL_EDITS[kind]
    path = _craft_model(tiny_sd1, tmp_path / "crafted.safetensors", edit)
    assert_clean_error(cli(*render_args(path, "-o", "out.png")), 3, "crafted.safetensors", what)
    assert not (tmp_path / "out.png").exists()
    assert_clean_error(cli("inspect", path), 3, "crafted.safetensors", what)


def test_crafted_vae_is_refused(tiny_sd1, tmp_path):
    path = _craft_model(tiny_sd1, tmp_path / "vae.safetensors", _longer_range)
    assert_clean_error(cli(*render_args(tiny_sd1, "--vae", path, "-o", "out.png")), 3, "vae.safetensors", KEY)


def test_crafted_lora_is_refused(tiny_sd1, tmp_path):
    data = st_save({"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1)})
    header, body = split(data)
    header["lora_unet_x.lora_down.weight"]["shape"] = [1, 3]
    (tmp_path / "l.safetensors").write_bytes(join(header, body))
    assert_clean_error(cli(*render_args(tiny_sd1, "--lora", "l.safetensors", "-o", "out.png")), 3, "l.safetensors",
                       "lora_unet_x.lora_down.weight")


@pytest.mark.parametrize("suffix", [".safetensors", ".latent"])
def test_crafted_latent_is_refused(tiny_sd1, tmp_path, suffix):
    name = "latent" if suffix == ".safetensors" else "latent_tensor"
    header, body = split(st_save({name: torch.zeros(1, 4, 8, 8)}))
    header[name]["shape"] = [1, 4, 8, 7]
    path = tmp_path / f"crafted{suffix}"
    path.write_bytes(join(header, body))
    assert_clean_error(cli(*render_args(tiny_sd1, "--latent-in", path, "-o", "out.png")), 3, path.name, name)
    assert_clean_error(cli("inspect", path), 3, path.name, name)
    assert_clean_error(cli("decode", path, "--model", tiny_sd1, "-o", "o.png"), 3, path.name, name)


def test_crafted_embedding_is_refused(tiny_sd1, tmp_path):
    header, body = split(st_save({"cond": torch.zeros(1, 77, 64)}, metadata={"format": "sdcli.embedding"}))
    header["cond"]["data_offsets"][1] += 4
    path = tmp_path / "e.safetensors"
    path.write_bytes(join(header, body + bytes(4)))
    args = ["generate", "--cond", path, "--model", tiny_sd1, "--steps", "1", "-W", "64", "-H", "64", "--dtype", "fp32",
            "-o", "out.png"]
    assert_clean_error(cli(*args), 3, "e.safetensors", "tensor 'cond'")


# ---------------------------------------------------------------- PNG bombs on the metadata path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(width: int, height: int, idat: bytes, before: bytes = b"", after: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + before + png_chunk(b"IDAT", idat) + after
            + png_chunk(b"IEND", b""))  # fmt: skip


INFOTEXT = b"parameters\0a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64"
SMALL_IDAT = zlib.compress(b"\0" * (64 * 3 + 1) * 64)


def _zlib_bomb(size: int) -> bytes:
    packer = zlib.compressobj(9)
    return b"".join(packer.compress(bytes(1 << 20)) for _ in range(size >> 20)) + packer.flush()


def test_pixel_bombs_are_not_decoded_to_read_metadata(tmp_path, monkeypatch):
    """A declared size past PIL's bomb limit (PIL raised DecompressionBombError: exit 1), and a 6000x6000 image
    whose IDAT is a zlib bomb after which the text comes (PIL decoded all 108 MB of pixels to find it):
    the metadata is read from the chunks alone, never through PIL's pixel decoder."""
    import time

    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("pixels decoded to read metadata")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    rows = 6000 * 3 + 1
    bombs = {"dims.png": make_png(30000, 30000, SMALL_IDAT, before=png_chunk(b"tEXt", INFOTEXT)),
             "pixels.png": make_png(6000, 6000, _zlib_bomb(rows * 6000 // (1 << 20) << 20),
                                    after=png_chunk(b"tEXt", INFOTEXT))}  # fmt: skip
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
        start = time.perf_counter()
        result = cli("inspect", name, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["parameters"]["seed"] == 5
        replay = cli("generate", "--from-image", name, "--dry-run", "--json")
        assert replay.exit_code == 0, replay.output
        assert json.loads(replay.stdout.splitlines()[0])["config"]["seed"] == 5
        assert time.perf_counter() - start < 5


TEXT_BOMBS = {
    "ztxt": (png_chunk(b"zTXt", b"parameters\0\0" + _zlib_bomb(64 << 20)), "expands past 1 MB"),
    "itxt": (png_chunk(b"iTXt", b"sdcli\0\1\0\0\0" + _zlib_bomb(64 << 20)), "expands past 1 MB"),
    "many": (b"".join(png_chunk(b"tEXt", b"k%d\0" % i + bytes(1 << 20)) for i in range(70)), "64 MB of PNG text"),
    "bad zlib": (png_chunk(b"zTXt", b"parameters\0\0" + b"not zlib"), "not valid zlib"),
    "bad crc": (png_chunk(b"tEXt", INFOTEXT)[:-4] + b"\0\0\0\0", "bad CRC"),
    "huge length": (struct.pack(">I", 0xFFFFFFF0) + b"tEXt", "claims"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TEXT_BOMBS))
def test_text_chunk_bombs_are_one_clear_error(tmp_path, kind):
    chunk, what = TEXT_BOMBS[kind]
    (tmp_path / "b.png").write_bytes(make_png(64, 64, SMALL_IDAT, before=chunk))
    assert_clean_error(cli("inspect", "b.png"), 3, "b.png", what)
    assert_clean_error(cli("generate", "--from-image", "b.png", "--dry-run"), 3, "b.png", what)


def test_truncated_png_and_odd_text_chunks(tmp_path):
    data = make_png(64, 64, SMALL_IDAT, after=png_chunk(b"tEXt", INFOTEXT))
    (tmp_path / "cut.png").write_bytes(data[:-30])  # inside the text chunk
    assert_clean_error(cli("inspect", "cut.png"), 3, "cut.png", "truncated PNG")
    # cut inside the image data: the pixels are not needed to read text written before them
    data = make_png(64, 64, SMALL_IDAT, before=png_chunk(b"tEXt", INFOTEXT))
    (tmp_path / "cut2.png").write_bytes(data[:-20])
    assert json.loads(cli("inspect", "cut2.png", "--json").stdout)["parameters"]["seed"] == 5
    # An iTXt that is not UTF-8 and a zTXt of an unknown method are skipped (as PIL does); the rest is read.
    odd = png_chunk(b"iTXt", b"sdcli\0\0\0\0\0\xff\xfe") + png_chunk(b"zTXt", b"x\0\7abc")
    (tmp_path / "odd.png").write_bytes(make_png(64, 64, SMALL_IDAT, before=odd + png_chunk(b"tEXt", INFOTEXT)))
    result = cli("inspect", "odd.png", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["parameters"]["seed"] == 5 and set(report["raw"]) == {"parameters"}


# ---------------------------------------------------------------- LoRA, latent and model mix-ups (issue 12, item 10)

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_proj_in"
LORAS = {
    "rank0": ({".lora_down.weight": torch.zeros(0, 32), ".lora_up.weight": torch.zeros(32, 0)}, "rank-0"),
    "alpha_shape": ({".lora_down.weight": torch.zeros(4, 32), ".lora_up.weight": torch.zeros(32, 4),
                     ".alpha": torch.ones(3)}, "alpha has shape [3]"),
    "zero_d": ({".lora_down.weight": torch.tensor(1.0), ".lora_up.weight": torch.tensor(1.0)}, "not 2-d or 4-d"),
    "misfit": ({".lora_down.weight": torch.zeros(4, 32), ".lora_up.weight": torch.zeros(32, 3)}, "does not fit"),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(LORAS))
def test_malformed_lora_is_refused_before_the_model_loads(tiny_sd1, tmp_path, kind):
    parts, what = LORAS[kind]
    from safetensors.torch import save_file

    save_file({LORA_KEY + suffix: t for suffix, t in parts.items()}, str(tmp_path / "l.safetensors"))
    result = cli(*render_args(tiny_sd1, "--lora", "l.safetensors", "-o", "out.png"))
    assert_clean_error(result, 3, "l.safetensors", LORA_KEY, what)
    assert "loading" not in result.stderr
    prompt_tag = cli("generate", "a cat <lora:l:0.5>", *render_args(tiny_sd1, "--lora-dir", tmp_path)[2:])
    assert_clean_error(prompt_tag, 3, "l.safetensors", what)


def test_full_checkpoint_given_as_lora(tiny_sd1, tmp_path):
    result = cli(*render_args(tiny_sd1, "--lora", tiny_sd1, "-o", "out.png"))
    assert_clean_error(result, 3, tiny_sd1.name, "not a LoRA but model weights", "--model")


def test_lora_given_as_vae_names_the_file(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    save_file({LORA_KEY + ".lora_down.weight": torch.zeros(4, 32), LORA_KEY + ".lora_up.weight": torch.zeros(32, 4)},
              str(tmp_path / "l.safetensors"))
    assert_clean_error(cli(*render_args(tiny_sd1, "--vae", "l.safetensors", "-o", "out.png")), 3, "l.safetensors",
                       "a LoRA, not a VAE", "--lora")
    save_file({"something.else": torch.zeros(4)}, str(tmp_path / "v.safetensors"))
    assert_clean_error(cli(*render_args(tiny_sd1, "--vae", "v.safetensors", "-o", "out.png")), 3, "v.safetensors",
                       "cannot read the VAE")


def test_sdxl_detection_names_the_file(tiny_sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_sd1)
    state["conditioner.embedders.1.model.ln_final.weight"] = torch.zeros(4)
    save_file(state, str(tmp_path / "xl.safetensors"))
    assert_clean_error(cli(*render_args(tmp_path / "xl.safetensors", "-o", "out.png")), 8, "xl.safetensors", "SDXL")
    assert_clean_error(cli("inspect", "xl.safetensors"), 8, "xl.safetensors", "SDXL")


def test_empty_latent_is_refused(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    for name, shape in [("h0.safetensors", (1, 4, 0, 8)), ("n0.safetensors", (0, 4, 8, 8)), ("w0.latent", (1, 4, 8, 0))]:
        key = "latent_tensor" if name.endswith(".latent") else "latent"
        save_file({key: torch.zeros(shape)}, str(tmp_path / name))
        assert_clean_error(cli(*render_args(tiny_sd1, "--latent-in", name, "-o", "out.png")), 3, name, "empty")
        assert_clean_error(cli("inspect", name), 3, name, "empty")
        assert_clean_error(cli("decode", name, "--model", tiny_sd1, "-o", "o.png"), 3, name, "empty")


def test_several_latents_need_batches_of_that_size(tiny_sd1, tmp_path):
    from safetensors.torch import save_file

    save_file({"latent": torch.randn(3, 4, 8, 8)}, str(tmp_path / "three.safetensors"))
    for flags in (["-n", "1"], ["-n", "3"], ["-n", "3", "--batch-size", "2"], ["-n", "4", "--batch-size", "3"]):
        result = cli(*render_args(tiny_sd1, "--latent-in", "three.safetensors", "-o", "o{index}.png", *flags))
        assert_clean_error(result, 2, "three.safetensors", "holds 3 latents", "--batch-size 3")
        assert "loading" not in result.stderr
    result = cli(*render_args(tiny_sd1, "--latent-in", "three.safetensors", "-o", "o{index}.png", "-n", "3", "--batch-size", "3"))
    assert result.exit_code == 0, result.output
    assert files_in(tmp_path) == ["o0.png", "o1.png", "o2.png", "three.safetensors"]


def test_latent_with_a_large_metadata_block_is_read(tiny_sd1, tmp_path):
    """ComfyUI's SaveLatent stores the whole workflow in the latent's metadata: a few MB is still a latent file
    (it was refused as "not a safetensors file" past 1 MB)."""
    from safetensors.torch import save_file

    save_file({"latent_tensor": torch.randn(1, 4, 8, 8), "latent_format_version_0": torch.tensor([])},
              str(tmp_path / "big.latent"), metadata={"workflow": json.dumps({"nodes": ["x" * 100] * 30_000})})
    assert (tmp_path / "big.latent").stat().st_size > 3_000_000
    report = cli("inspect", "big.latent", "--json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["shape"] == [1, 4, 8, 8]
    result = cli(*render_args(tiny_sd1, "--latent-in", "big.latent", "-o", "out.png"))
    assert result.exit_code == 0, result.output
