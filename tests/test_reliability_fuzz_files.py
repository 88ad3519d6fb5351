"""A small fuzzer for hostile files (issue 12): safetensors headers and PNG metadata chunks, mutated with a fixed
seed and a bounded count, through the real commands (`inspect`, `generate` with the tiny model, `--latent-in`,
`--from-image`, `verify`). Every run ends in an exit code of the README table, never exit 1, never a traceback,
never a hang (each command runs under an alarm). Header verdicts are also held against the safetensors library.
"""

from __future__ import annotations

import json
import random
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

DOCUMENTED_EXITS = {0, 2, 3, 4, 5, 7, 8, 9}  # README "Exit codes" (6 is out of memory, 130 and up are signals)
SECONDS_PER_RUN = 20


def run(*args, what: str = ""):
    with deadline(SECONDS_PER_RUN, f"{' '.join(map(str, args))[:200]} ({what})"):
        result = cli(*args)  # raises on a traceback or an escaped exception
    assert result.exit_code in DOCUMENTED_EXITS, f"{what}: exit {result.exit_code}: {result.output[-2000:]}"
    if result.exit_code:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, f"{what}: {result.stderr[-2000:]}"
    return result


# ---------------------------------------------------------------- safetensors headers

ODD_VALUES = [
    -1, 0, 1, 3, 7, 2**31, 2**63, 2**64, 2**64 + 1, -(2**63), 1.5, 1e300, "1", "", "F32", True, False, None, [], {},
    [1], [0], [-1], [2**64], ["a"], [1, 2, 3], [[1]], {"a": 1}, "x" * 300, [True, 1], [1.0, 2.0],
]  # fmt: skip
FIELDS = ["dtype", "shape", "data_offsets"]


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(raw: bytes, body: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_safetensors(data: bytes, rng: random.Random) -> bytes:
    """One structural or byte-level mutation of a safetensors file."""
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.randrange(9)
    if kind == 0:  # a field gets an odd value
        header[rng.choice(names)][rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
    elif kind == 1:  # an offset or a dimension moves a little
        entry = header[rng.choice(names)]
        field = rng.choice(["shape", "data_offsets"])
        if entry[field]:
            entry[field][rng.randrange(len(entry[field]))] += rng.choice([-8, -4, -1, 1, 2, 4, 8])
    elif kind == 2 and len(names) > 1:  # two tensors swap offsets or shapes
        a, b = rng.sample(names, 2)
        field = rng.choice(["shape", "data_offsets", "dtype"])
        header[a][field], header[b][field] = header[b][field], header[a][field]
    elif kind in (2, 3):  # metadata of the wrong type
        header["__metadata__"] = rng.choice([{"k": rng.choice(ODD_VALUES)}, rng.choice(ODD_VALUES)])
    elif kind == 4:  # an entry removed, duplicated or replaced
        name = rng.choice(names)
        header[name + "_copy"] = dict(header[name]) if rng.random() < 0.5 else rng.choice(ODD_VALUES)
    elif kind == 5:  # deep nesting somewhere
        depth = rng.choice([10, 200, 5000, 200_000])
        raw = json.dumps(header).encode()
        cut = rng.randrange(1, len(raw))
        return _join(raw[:cut] + b"[" * depth + b"]" * depth + raw[cut:], body)
    elif kind == 6:  # the body grows or shrinks
        body = body + bytes(rng.choice([1, 4, 64])) if rng.random() < 0.5 else body[: -rng.choice([1, 4, 64])]
    elif kind == 7:  # random bytes in the header text
        raw = bytearray(json.dumps(header).encode())
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return _join(bytes(raw), body)
    else:  # the header length field lies
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw) + rng.choice([-9, -1, 1, 7, 2**40])) + raw + body
    return _join(json.dumps(header).encode(), body)


def _library_accepts(data: bytes) -> bool:
    try:
        st_load(data)
        return True
    except (SafetensorError, ValueError, KeyError, OverflowError, RuntimeError):
        return False


def _sdcli_accepts(data: bytes) -> bool:
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return False  # read_header's sniffing refuses these before decoding
    try:
        decode_header("x", data[8 : 8 + n], len(data) - 8 - n)
        return True
    except BadInputError:
        return False


def _three_tensors() -> bytes:
    return st_save({"latent": torch.randn(1, 4, 8, 8), "b": torch.ones(3, dtype=torch.float16),
                    "c": torch.zeros(2, 2, dtype=torch.int32)}, metadata={"format": "sdcli.latent"})  # fmt: skip


def test_fuzzed_headers_match_the_safetensors_library_and_inspect_cleanly(tmp_path):
    """600 mutants of a small file: sdcli accepts a header exactly when the library does (for these, where
    nothing is stricter by design), and `inspect` of each is a documented exit."""
    rng = random.Random(1234)
    base = _three_tensors()
    disagreements = []
    for i in range(600):
        data = mutate_safetensors(base, rng)
        if _sdcli_accepts(data) != _library_accepts(data) and not _duplicate_field(data):
            disagreements.append((i, data[:300]))
        if i % 4 == 0:  # through the real command: latent, or checkpoint when the latent key is gone
            path = tmp_path / f"m{i}.safetensors"
            path.write_bytes(data)
            run("inspect", path, "--no-hash", what=f"mutant {i}")
    assert not disagreements, disagreements[:3]


def _duplicate_field(data: bytes) -> bool:
    """A key written twice in one JSON object: Python's json keeps the last, serde refuses a repeated struct
    field. Both are safe; the verdicts only differ in that."""
    (n,) = struct.unpack("<Q", data[:8])
    pairs: list[list[str]] = []
    try:
        json.loads(data[8 : 8 + n], object_pairs_hook=lambda kv: pairs.append([k for k, _ in kv]) or dict(kv))
    except (ValueError, RecursionError):
        return False
    return any(len(keys) != len(set(keys)) for keys in pairs)


def test_fuzzed_checkpoints_latents_and_loras_through_generate(tiny_sd1, tmp_path):
    """A few mutants of each file kind through `generate` on the tiny model (each either renders or is one
    clean error). The headers of the 19 MB model are mutated in place of the whole file."""
    rng = random.Random(99)
    model = tiny_sd1.read_bytes()
    latent = st_save({"latent": torch.randn(1, 4, 8, 8)}, metadata={"format": "sdcli.latent", "scaled": "true"})
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    lora = st_save({f"{key}.lora_down.weight": torch.randn(2, 32) * 0.01, f"{key}.lora_up.weight": torch.randn(32, 2),
                    f"{key}.alpha": torch.tensor(1.0)})  # fmt: skip
    rendered = 0
    for i in range(24):
        kind = ("model", "latent", "lora")[i % 3]
        source = {"model": model, "latent": latent, "lora": lora}[kind]
        path = tmp_path / f"{kind}{i}.safetensors"
        path.write_bytes(mutate_safetensors(source, rng))
        extra = {"model": [], "latent": ["--latent-in", path], "lora": ["--lora", path]}[kind]
        result = run(*render_args(path if kind == "model" else tiny_sd1, "-o", f"o{i}.png", *extra),
                     what=f"{kind} mutant {i}")
        rendered += result.exit_code == 0
    assert rendered < 24  # most mutants are refused
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- PNG metadata chunks


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(chunks: list[tuple[bytes, bytes]]) -> bytes:
    ihdr = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (64 * 3 + 1) * 64)
    text = b"".join(png_chunk(kind, data) for kind, data in chunks)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + text + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))  # fmt: skip


INFOTEXT = "a cat, (snow:1.2)\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64"
COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
                                               "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
}  # fmt: skip
COMFY_WORKFLOW = {"nodes": [{"type": "KSampler", "widgets_values": [5, "fixed", 2, 7.0, "euler", "normal", 1.0]},
                            {"type": "CLIPTextEncode", "widgets_values": ["a cat"]}]}  # fmt: skip


def _mutate_json(value, rng: random.Random, depth: int = 0):
    """The same JSON with one leaf, list or object replaced by an odd value somewhere."""
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.8:
        key = rng.choice(list(value))
        return {**value, key: _mutate_json(value[key], rng, depth + 1)}
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.8:
        k = rng.randrange(len(value))
        return value[:k] + [_mutate_json(value[k], rng, depth + 1)] + value[k + 1 :]
    return rng.choice(ODD_VALUES + ["help", "nan", "1e400", "inf", "-1", "euler", "karras", "(x:1e60)"])


def _text_chunk(kind: bytes, key: bytes, text: bytes, rng: random.Random) -> bytes:
    """A tEXt, zTXt or iTXt chunk (compressed or not) holding `text`."""
    if kind == b"tEXt":
        return key + b"\0" + text
    if kind == b"zTXt":
        return key + b"\0\0" + zlib.compress(text)
    if rng.random() < 0.5:
        return key + b"\0\1\0\0\0" + zlib.compress(text)
    return key + b"\0\0\0\0\0" + text


def _mutate_chunks(chunks: list[list], rng: random.Random) -> bytes:
    """Chunk-level damage: flipped bytes (CRC kept or recomputed), lying lengths, truncation, odd types."""
    kind = rng.randrange(6)
    target = rng.choice(chunks)
    if kind == 0 and target[1]:  # bytes flipped in the data, CRC recomputed: the reader must cope with content
        data = bytearray(target[1])
        for _ in range(rng.randrange(1, 5)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        target[1] = bytes(data)
    elif kind == 1:  # a chunk type changed
        target[0] = rng.choice([b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"IEND", b"IDAT", b"tEXT", b"\0\0\0\0"])
    elif kind == 2:  # compressed data cut short
        target[1] = target[1][: rng.randrange(len(target[1]) + 1)]
    data = _png([tuple(c) for c in chunks])
    if kind == 3:  # a byte flipped anywhere, CRC not fixed
        data = bytearray(data)
        data[rng.randrange(8, len(data))] ^= 1 << rng.randrange(8)
        data = bytes(data)
    elif kind == 4:  # the file cut anywhere
        data = data[: rng.randrange(8, len(data))]
    elif kind == 5:  # a length field lies
        data = bytearray(data)
        at = 33  # the length field of the first chunk after IHDR (8-byte signature, 25-byte IHDR chunk)
        data[at : at + 4] = struct.pack(">I", rng.choice([0, 1, 2**31 - 1, 2**32 - 1, len(chunks[0][1]) + 9]))
        data = bytes(data)
    return data


def png_mutants(sdcli_json: str, count: int, seed: int) -> list[tuple[str, bytes]]:
    """PNGs carrying A1111, sdcli and ComfyUI metadata in every text chunk kind, damaged at the chunk level."""
    rng = random.Random(seed)
    payloads = [(b"parameters", INFOTEXT.encode()), (b"sdcli", sdcli_json.encode()),
                (b"prompt", json.dumps(COMFY_PROMPT).encode()), (b"workflow", json.dumps(COMFY_WORKFLOW).encode())]
    out = []
    for i in range(count):
        chunks = [[kind, _text_chunk(kind, key, text, rng)]
                  for key, text in rng.sample(payloads, rng.randrange(1, 5))
                  for kind in [rng.choice([b"tEXt", b"zTXt", b"iTXt"])]]  # fmt: skip
        out.append((f"mutant {i}", _mutate_chunks(chunks, rng)))
    return out


@pytest.fixture(scope="module")
def sdcli_png(tiny_sd1, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("fuzz_png")
    out = folder / "real.png"
    result = cli(*render_args(tiny_sd1, "-o", out, steps=2))
    assert result.exit_code == 0, result.output
    return out


def test_fuzzed_png_chunks_through_inspect_and_from_image(sdcli_png, tmp_path):
    """240 PNGs whose A1111, sdcli and ComfyUI chunks are damaged: `inspect` and `generate --from-image
    --dry-run` (in-process, no model needed) each end in a documented exit. The values inside the chunks are
    fuzzed by tests/test_reliability_parsing.py."""
    from PIL import Image

    with Image.open(sdcli_png) as img:
        ours = img.text["sdcli"]
    for label, data in png_mutants(ours, 240, seed=5):
        path = tmp_path / "m.png"
        path.write_bytes(data)
        run("inspect", path, what=label)
        run("generate", "--from-image", path, "--dry-run", what=label)


def test_fuzzed_sdcli_metadata_through_verify(sdcli_png, tiny_sd1, tmp_path):
    """verify re-renders: a few mutants of a real sdcli PNG's own JSON (the pixels kept)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    rng = random.Random(17)
    with Image.open(sdcli_png) as img:
        img.load()
        ours, params = json.loads(img.text["sdcli"]), img.text["parameters"]
        for i in range(6):
            info = PngInfo()
            info.add_text("parameters", params)
            info.add_itxt("sdcli", json.dumps(_mutate_json(ours, rng)))
            path = tmp_path / f"v{i}.png"
            img.save(path, pnginfo=info)
            run("verify", path, "--model", tiny_sd1, what=f"verify mutant {i}")


# ---------------------------------------------------------------- round 3: ControlNet, TAESD and embedding files


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Byte-level damage anywhere: flipped bytes, a cut, a repeated or dropped run (pickles, zip archives)."""
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(1, len(data)):]
    elif kind == 2:
        at, n = rng.randrange(len(data)), rng.randrange(1, 64)
        data[at:at] = data[at : at + n] * rng.randrange(1, 4)
    else:
        at = rng.randrange(len(data))
        del data[at : at + rng.randrange(1, 64)]
    return bytes(data)


def _mutate_pickle(data: bytes, rng: random.Random) -> bytes:
    """A torch.save archive whose pickle (data.pkl) is damaged inside an intact zip, so the restricted unpickler
    meets the broken opcodes (a damaged zip is refused before it); half the time the zip itself is damaged."""
    import io
    import zipfile

    if rng.random() < 0.5:
        return _mutate_bytes(data, rng)
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info)
            dst.writestr(info.filename, _mutate_bytes(body, rng) if info.filename.endswith("data.pkl") else body)
    return out.getvalue()


def test_fuzzed_controlnet_files_through_inspect_and_generate(tiny_sd1, tmp_path):
    """Header mutants of a ControlNet (original and diffusers layouts) through `inspect` (40) and `generate
    --controlnet` (12, each either renders or is one clean error, checked before the model loads or after)."""
    from make_checkpoint import make_controlnet
    from PIL import Image

    rng = random.Random(2024)
    sources = [make_controlnet(tmp_path / "cn.safetensors").read_bytes(),
               make_controlnet(tmp_path / "cnd.safetensors", layout="diffusers").read_bytes()]
    Image.new("RGB", (64, 64), "white").save(tmp_path / "hint.png")
    for i in range(40):
        path = tmp_path / f"c{i}.safetensors"
        path.write_bytes(mutate_safetensors(sources[i % 2], rng))
        run("inspect", path, "--no-hash", what=f"controlnet mutant {i}")
        if i % 4 == 0:
            run(*render_args(tiny_sd1, "--controlnet", path, "--control-image", tmp_path / "hint.png", "-o",
                             tmp_path / f"o{i}.png"), what=f"controlnet mutant {i} through generate")
        path.unlink()
    assert temp_files(tmp_path) == []


def test_fuzzed_taesd_files_through_decode(tmp_path):
    """Header mutants of TAESD decoders (safetensors) and byte mutants of their .pth twins (the restricted
    unpickler) through `decode --vae`: a latent decoded, or one clean error."""
    from _fixtures_taesd import write_taesd_files

    _, paths = write_taesd_files(tmp_path / "t")
    latent = tmp_path / "l.safetensors"
    latent.write_bytes(st_save({"latent": torch.randn(1, 4, 8, 8)}, metadata={"format": "sdcli.latent",
                                                                               "scaled": "true"}))
    rng = random.Random(31)
    st, pth = paths["decoder"].read_bytes(), paths["decoder_pth"].read_bytes()
    decoded = 0
    for i in range(30):
        if i % 2:
            path = tmp_path / f"taesd_decoder_{i}.pth"
            path.write_bytes(_mutate_pickle(pth, rng))
        else:
            path = tmp_path / f"taesd_decoder_{i}.safetensors"
            path.write_bytes(mutate_safetensors(st, rng))
        result = run("decode", latent, "--vae", path, "-o", tmp_path / f"d{i}.png", what=f"taesd mutant {i}")
        decoded += result.exit_code == 0
    assert decoded < 30 and temp_files(tmp_path) == []
    assert not (tmp_path / "pwned").exists()


def test_fuzzed_embeddings_through_inspect_prompt(tmp_path):
    """Mutants of every embedding format in one folder (A1111 .pt and diffusers .bin through the restricted
    unpickler byte-mutated; kohya and SDXL .safetensors header-mutated; odd shapes, NaN, huge vector counts),
    each mentioned in a prompt: `inspect --prompt` places it or fails in one line naming the file."""
    from _fixtures_embeddings import random_vectors, write_embedding

    rng = random.Random(77)
    good = tmp_path / "good"
    originals = {
        "a1111_pt": write_embedding(good / "a.pt", "a1111_pt", {"*": random_vectors(2, 64)}),
        "old_pt": write_embedding(good / "o.pt", "old_pt", {"*": random_vectors(1, 64)}),
        "diffusers_bin": write_embedding(good / "d.bin", "diffusers_bin", {"*": random_vectors(1, 64)}),
        "emb_params": write_embedding(good / "k.safetensors", "emb_params", {"*": random_vectors(3, 64)}),
        "sdxl": write_embedding(good / "x.safetensors", "sdxl", {"clip_l": random_vectors(2, 64),
                                                                 "clip_g": random_vectors(2, 128)}),
    }
    odd = {"nan": torch.full((2, 64), float("nan")), "wide": random_vectors(2, 4096), "many": random_vectors(5000, 8),
           "flat": torch.zeros(0, 64), "ints": torch.ones(2, 64, dtype=torch.int32), "three_d": torch.zeros(1, 2, 64)}
    folder = tmp_path / "emb"
    folder.mkdir()
    for name, t in odd.items():
        save_file_st({"emb_params": t}, folder / f"{name}.safetensors")
    for i in range(40):
        kind = sorted(originals)[i % len(originals)]
        data = originals[kind].read_bytes()
        mutant = _mutate_pickle(data, rng) if data.startswith(b"PK") else mutate_safetensors(data, rng)
        (folder / f"m{i}{originals[kind].suffix}").write_bytes(mutant)
    for name in [*odd, *(f"m{i}" for i in range(40))]:
        result = run("inspect", "--prompt", f"a photo of {name}", "--embeddings-dir", folder, what=f"embedding {name}")
        if result.exit_code:
            assert name in result.stderr, result.stderr
    assert not (tmp_path / "pwned").exists()


def save_file_st(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def test_fuzzed_control_images_through_preprocess(tmp_path):
    """ControlNet hints of every mode, bit depth and kind of damage through `preprocess` (no model needed):
    a map written, or one clean error naming the image."""
    import io

    import numpy as np
    from PIL import Image

    rng = random.Random(5)
    arr = np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    base = Image.fromarray(arr)
    made = {}
    for mode in ("1", "L", "P", "RGBA", "LA", "I", "I;16", "F", "CMYK", "RGB"):
        image = base.convert(mode) if mode not in ("I;16",) else base.convert("L").convert("I;16")
        fmt = "TIFF" if mode in ("F", "CMYK", "LA", "I") else "PNG"
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        made[f"{mode.replace(';', '_')}.{fmt.lower()}"] = buf.getvalue()
    buf = io.BytesIO()
    base.save(buf, format="GIF", save_all=True, append_images=[base.rotate(90, expand=True)])
    made["frames.gif"] = buf.getvalue()
    for n in range(16):  # damaged copies of the PNG and JPEG encodings
        buf = io.BytesIO()
        base.save(buf, format="PNG" if n % 2 else "JPEG")
        made[f"damaged{n}.{'png' if n % 2 else 'jpg'}"] = _mutate_bytes(buf.getvalue(), rng)
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
        for kind in ("canny", "invert", "tile"):
            result = run("preprocess", kind, tmp_path / name, "-o", tmp_path / f"{name}.{kind}.png",
                         what=f"{kind} of {name}")
            if result.exit_code:
                assert result.exit_code == 3 and name in result.stderr, result.stderr
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- main's new file kinds: GGUF, upscalers, encoders

ODD_U64 = [0, 1, 2, 3, 31, 32, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def mutate_gguf(data: bytes, head: int, rng: random.Random) -> bytes:
    """One mutation of a GGUF file inside its first `head` bytes (header, metadata, tensor infos: what the reader
    parses before any tensor data): bytes flipped, a 4- or 8-byte field set to an odd value, or the file cut."""
    raw = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(head)] = rng.randrange(256)
    elif kind in (1, 2):  # somewhere a count, a length, a dimension, a type id or an offset lies
        width = 8 if kind == 1 else 4
        at = rng.randrange(4, head - width)
        raw[at:at + width] = (rng.choice(ODD_U64) % 2 ** (8 * width)).to_bytes(width, "little")
    else:
        return bytes(raw[: rng.choice([rng.randrange(head), rng.randrange(head, len(raw))])])
    return bytes(raw)


def test_fuzzed_gguf_files_through_inspect_convert_and_generate(tiny_sd1, tmp_path):
    """Mutants of a Q8_0 GGUF of the tiny SD1 (and of a city96 UNet-only one) through `inspect` (60), `convert`
    to safetensors (10) and `generate` (10): read, or one clean error; nothing half-written."""
    from safetensors.torch import load_file

    from sdcli.formats.gguf import read_gguf_header
    from sdcli.quant.quantize import write_gguf

    whole, unet = tmp_path / "whole.gguf", tmp_path / "unet.gguf"
    state = load_file(str(tiny_sd1))
    write_gguf(whole, state, "q8_0")
    prefix = "model.diffusion_model."
    write_gguf(unet, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "q8_0", arch="sd1")
    sources = [(p.read_bytes(), read_gguf_header(p).data_offset) for p in (whole, unet)]
    rng = random.Random(26)
    refused = 0
    for i in range(60):
        data, head = sources[i % 2]
        path = tmp_path / f"g{i}.gguf"
        path.write_bytes(mutate_gguf(data, head, rng))
        refused += run("inspect", path, "--no-hash", what=f"gguf mutant {i}").exit_code != 0
        if i % 6 == 0:
            run("convert", path, "-o", tmp_path / f"c{i}.safetensors", what=f"gguf mutant {i} through convert")
        if i % 6 == 3:
            extra = ["--vae", tiny_sd1, "--clip-l", tiny_sd1] if i % 2 else []
            run(*render_args(path, *extra, "-o", tmp_path / f"o{i}.png"), what=f"gguf mutant {i} through generate")
        path.unlink()
    assert refused > 20 and temp_files(tmp_path) == []


def test_fuzzed_upscaler_files_through_inspect_and_upscale(tmp_path):
    """Header mutants of ESRGAN (old layout) and Compact .safetensors files and byte mutants of their .pth twins
    (the restricted unpickler) through `inspect` and `upscale`: an image, or one clean error; nothing runs."""
    from make_upscaler import compact_state, old_layout, rrdb_state, write
    from PIL import Image

    from sdcli.models.esrgan import CompactConfig, RRDBConfig

    rrdb = RRDBConfig(num_features=8, num_blocks=1)
    states = [old_layout(rrdb_state(rrdb), rrdb), compact_state(CompactConfig(num_features=8, num_convs=2))]
    sources = []
    for n, state in enumerate(states):
        sources += [write(state, tmp_path / f"u{n}.safetensors").read_bytes(),
                    write(state, tmp_path / f"u{n}.pth").read_bytes()]
    Image.new("RGB", (16, 12), "gray").save(tmp_path / "pic.png")
    rng = random.Random(28)
    upscaled = 0
    for i in range(40):
        data = sources[i % 4]
        path = tmp_path / f"m{i}{'.pth' if i % 2 else '.safetensors'}"
        path.write_bytes(_mutate_pickle(data, rng) if i % 2 else mutate_safetensors(data, rng))
        run("inspect", path, "--no-hash", what=f"upscaler mutant {i}")
        result = run("upscale", tmp_path / "pic.png", "-u", path, "-o", tmp_path / f"o{i}.png",
                     what=f"upscaler mutant {i} through upscale")
        upscaled += result.exit_code == 0
        path.unlink()
    assert upscaled < 40 and temp_files(tmp_path) == []
    assert not (tmp_path / "pwned").exists()


def test_fuzzed_text_encoder_files_through_generate(tiny_sd1, tmp_path):
    """Header mutants of a --clip-l file (ComfyUI's clip_l.safetensors) beside a city96 UNet-only GGUF: a render,
    or one clean error naming the encoder file when the fault is in it."""
    from safetensors.torch import load_file, save_file

    from sdcli.quant.quantize import write_gguf

    state = load_file(str(tiny_sd1))
    unet, clip = tmp_path / "unet.gguf", tmp_path / "clip_l.safetensors"
    prefix, text = "model.diffusion_model.", "cond_stage_model.transformer."
    write_gguf(unet, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, "f32", arch="sd1")
    save_file({k[len(text):]: v for k, v in state.items() if k.startswith(text)}, str(clip))
    rng = random.Random(29)
    data = clip.read_bytes()
    for i in range(12):
        path = tmp_path / f"clip{i}.safetensors"
        path.write_bytes(mutate_safetensors(data, rng))
        result = run(*render_args(unet, "--vae", tiny_sd1, "--clip-l", path, "-o", tmp_path / f"o{i}.png"),
                     what=f"clip-l mutant {i}")
        if result.exit_code == 3:
            assert path.name in result.stderr or "unet.gguf" not in result.stderr, result.stderr
        path.unlink()
    assert temp_files(tmp_path) == []
