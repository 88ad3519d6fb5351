"""GGUF weights: header validation, dequantizers, quantized layers, runtime LoRA and the writer.

Oracles: the gguf package (llama.cpp's gguf-py): ``GGUFWriter`` writes the valid files, ``GGUFReader`` reads them
back, ``gguf.quants.dequantize`` (numpy) is the reference every dequantizer must equal BIT FOR BIT (float32
results compared as integers; NaN only where the reference is NaN too: random scale bytes include NaN and Inf).
The layers are compared with the plain op on the dequantized weight (bit-identical: the same op on the same
values), runtime LoRA with sdcli.loading.lora's own merge into that weight (bit-identical: the same float32 steps).
Crafted files are built byte by byte (``_gguf``, itself checked against GGUFReader on a valid file).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdcli.runtime.errors import BadInputError, OutputError, UnsupportedModelError, UsageError
from sdcli.formats.gguf import header_view, load_gguf_state, read_gguf_header
from sdcli.loading.lora import LoraSpec, _merge
from sdcli.loading.lora_keys import Slot
from sdcli.models.unet import UNetConfig, UNetModel
from sdcli.quant.dequantize import DEQUANTIZERS, dequantize
from sdcli.quant.ggml_types import BY_NAME, GGML_TYPES
from sdcli.quant.layers import QuantizedConv2d, QuantizedLinear, RuntimeLora, quantize_modules, replaceable
from sdcli.quant.quantize import choose_type, parse_type_rules, write_gguf
from sdcli.quant.tensor import QuantizedTensor

QT = gguf.GGMLQuantizationType
RNG = np.random.default_rng(1234)
BLOCK_TYPES = [n for n in DEQUANTIZERS if n not in ("F32", "F16", "BF16", "F64")]
# byte offsets of the float16 scales (d, dmin, m) in each block, to plant extreme values there
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                 "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,)}
EXTREME_F16 = (0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x0400, 0x8000, 0x0000, 0x3C00)  # +-max, +-min subnormal, ...


# --- helpers ------------------------------------------------------------------------------------------------------

def _bits_equal(ours: np.ndarray, ref: np.ndarray) -> bool:
    """float32 arrays equal as bit patterns; NaN matches NaN (payloads may differ)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    both_nan = np.isnan(ours) & np.isnan(ref)
    return ours.shape == ref.shape and bool(((ours.view(np.uint32) == ref.view(np.uint32)) | both_nan).all())


def _random_blocks(name: str, n_blocks: int, extreme: bool = False) -> np.ndarray:
    t = BY_NAME[name]
    raw = RNG.integers(0, 256, size=(n_blocks, t.type_size), dtype=np.uint8)
    if extreme:
        for off in SCALE_OFFSETS.get(name, ()):
            values = np.array([EXTREME_F16[i % len(EXTREME_F16)] for i in range(n_blocks)], np.uint16)
            raw[:, off:off + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def _reference(raw: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    t = BY_NAME[name]
    rows = raw.reshape(*shape[:-1], shape[-1] // t.block_size * t.type_size)
    with np.errstate(all="ignore"):
        return gguf.quants.dequantize(rows, QT(t.id))


def _s(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _gguf(tensors, kvs=(), data: bytes = b"", version: int = 3, alignment: int = 32) -> bytes:
    """A GGUF file by hand: tensors as (name, dims innermost first, type id, offset)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, type_id, offset in tensors:
        head += _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def _valid(q8_rows: int = 2) -> bytes:
    """Two tensors: 'a' Q8_0 (q8_rows, 32) at 0, 'b' F32 (4,) right after it (aligned)."""
    a = gguf.quants.quantize(RNG.standard_normal((q8_rows, 32)).astype(np.float32), QT.Q8_0).tobytes()
    pad = b"\0" * (-len(a) % 32)
    b = np.arange(4, dtype=np.float32).tobytes()
    return _gguf([("a", (32, q8_rows), 8, 0), ("b", (4,), 0, len(a) + len(pad))],
                 [_kv("general.architecture", 8, _s("sd1"))], a + pad + b)  # fmt: skip


def _file(tmp_path: Path, data: bytes, name: str = "x.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the type table and the header -------------------------------------------------------------------------------

def test_type_table_is_ggufs():
    ours = {t.id: (t.block_size, t.type_size) for t in GGML_TYPES.values()}
    theirs = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert {k: ours[k] for k in theirs} == theirs
    assert {t.name for t in GGML_TYPES.values() if t.id in theirs} == {QT(k).name for k in theirs}


def test_handmade_file_reads_as_gguf_reads_it(tmp_path):
    path = _file(tmp_path, _valid())
    ref = gguf.GGUFReader(path)
    info = read_gguf_header(path)
    assert info.architecture == "sd1" and info.version == 3
    assert [t.name for t in ref.tensors] == list(info.tensors)
    for t in ref.tensors:
        ours = info.tensors[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert (ours.qtype.id, ours.offset, ours.nbytes) == (int(t.tensor_type), t.data_offset, t.n_bytes)


def test_header_of_a_written_file(tmp_path):
    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(path, "sdxl")
    w.add_array("tokens", ["a", "bb", ""])
    w.add_array("comfy.gguf.orig_shape.conv.weight", [32, 32, 3, 3])
    w.add_float32("scale", 0.5)
    conv = RNG.standard_normal((32 * 32 * 9 // 256, 256)).astype(np.float32)  # city96's reshape of a 3x3 conv
    w.add_tensor("conv.weight", gguf.quants.quantize(conv, QT.Q8_0), raw_dtype=QT.Q8_0)
    w.add_tensor("lin.weight", RNG.standard_normal((3, 5, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_gguf_header(path)
    assert info.metadata["tokens"] == ["a", "bb", ""] and info.metadata["scale"] == 0.5
    assert info.tensors["conv.weight"].shape == (32, 32, 3, 3) and info.tensors["lin.weight"].shape == (3, 5, 64)
    state = load_gguf_state(path)
    conv_q = state["model.diffusion_model.conv.weight"]
    assert _bits_equal(conv_q.dequantize().numpy(), gguf.quants.dequantize(gguf.quants.quantize(conv, QT.Q8_0),
                                                                            QT.Q8_0).reshape(32, 32, 3, 3))
    assert header_view(info)["model.diffusion_model.lin.weight"] == {"dtype": "F16", "shape": [3, 5, 64]}


def _replace(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


Q8_ROW = gguf.quants.quantize(np.ones((1, 32), np.float32), QT.Q8_0).tobytes()  # 34 bytes
CRAFTED = {  # name -> (file bytes, words the one-line message must hold)
    "overlapping": (_gguf([("a", (32,), 8, 0), ("b", (32,), 8, 0)], data=Q8_ROW), ["'b'", "overlaps", "'a'"]),
    "overlapping partly": (_gguf([("a", (64,), 8, 0), ("b", (32,), 8, 32)], data=Q8_ROW * 3), ["overlaps"]),
    "bad type id": (_gguf([("w", (32,), 99, 0)], data=Q8_ROW), ["'w'", "unknown ggml type id 99"]),
    "removed type id": (_gguf([("w", (32,), 4, 0)], data=Q8_ROW), ["'w'", "unknown ggml type id 4"]),
    "wrong block count": (_gguf([("w", (48, 2), 8, 0)], data=Q8_ROW * 4), ["'w'", "48", "Q8_0 blocks of 32"]),
    "huge dims": (_gguf([("w", (2**40, 2**40), 0, 0)], data=b"\0" * 64), ["'w'", "too large"]),
    "dim past int64": (_gguf([("w", (2**63,), 0, 0)], data=b"\0" * 64), ["'w'", "too large"]),
    "huge tensor": (_gguf([("w", (2**20, 2**20), 0, 0)], data=b"\0" * 64), ["truncated", "'w'", "past the end"]),
    "five dims": (_gguf([("w", (1, 1, 1, 1, 1), 0, 0)], data=b"\0" * 32), ["'w'", "5 dimensions"]),
    "misaligned": (_gguf([("w", (4,), 0, 4)], data=b"\0" * 64), ["'w'", "offset 4", "alignment 32"]),
    "past the end": (_gguf([("w", (32,), 0, 0)], data=b"\0" * 64), ["truncated", "'w'", "byte"]),
    "duplicate tensor": (_gguf([("w", (4,), 0, 0), ("w", (4,), 0, 32)], data=b"\0" * 64), ["'w'", "twice"]),
    "duplicate key": (_gguf([], [_kv("k", 4, b"\1\0\0\0")] * 2), ["'k'", "twice"]),
    "huge array": (_gguf([], [_kv("a", 9, struct.pack("<IQ", 0, 2**62))]), ["truncated", "'a'"]),
    "huge string array": (_gguf([], [_kv("a", 9, struct.pack("<IQ", 8, 2**62))]), ["truncated", "'a'"]),
    "huge string": (_gguf([], [_kv("s", 8, struct.pack("<Q", 2**63))]), ["truncated", "'s'"]),
    "nested array": (_gguf([], [_kv("a", 9, struct.pack("<IQIQ", 9, 1, 0, 0))]), ["'a'", "nested or unknown"]),
    "unknown value type": (_gguf([], [_kv("v", 13, b"")]), ["'v'", "unknown value type 13"]),
    "alignment not pow2": (_gguf([], [_kv("general.alignment", 4, struct.pack("<I", 48))]), ["alignment", "48"]),
    "alignment not u32": (_gguf([], [_kv("general.alignment", 10, struct.pack("<Q", 32))]), ["alignment"]),
    "arch not string": (_gguf([], [_kv("general.architecture", 4, b"\1\0\0\0")]), ["general.architecture"]),
    "name not utf-8": (b"GGUF" + struct.pack("<IQQQ", 3, 1, 0, 1) + b"\xff" + b"\0" * 32, ["tensor 0", "UTF-8"]),
    "bad orig_shape": (_gguf([("w", (32,), 0, 0)], [_kv("comfy.gguf.orig_shape.w", 9,
                                                        struct.pack("<IQ2i", 5, 2, 3, 3))], b"\0" * 128),
                       ["orig_shape.w", "[32]"]),
    "count past the end": (b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), ["truncated", "tensor list"]),
    "no magic": (b"GGML" + b"\0" * 60, ["magic"]),
    "version 0": (b"GGUF" + struct.pack("<IQQ", 0, 0, 0), ["version 0"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_files_are_refused_by_name(tmp_path, case):
    data, words = CRAFTED[case]
    path = _file(tmp_path, data)
    with pytest.raises(BadInputError) as err:
        read_gguf_header(path)
    message = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in message and str(path) in message
    assert all(w in message for w in words), message


def test_every_truncation_is_a_bad_input(tmp_path):
    """Every prefix of a valid file (cut in the magic, the counts, a key, a tensor info, the padding, the data) is
    refused with BadInputError; the full file and one with its trailing padding cut are read."""
    data = _valid(q8_rows=3)
    path = tmp_path / "cut.gguf"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(BadInputError):
            read_gguf_header(path)
    path.write_bytes(data)
    assert list(read_gguf_header(path).tensors) == ["a", "b"]


@pytest.mark.parametrize("version, byte_order", [(1, "<"), (3, ">"), (4, "<")])
def test_valid_but_unread_versions(tmp_path, version, byte_order):
    path = _file(tmp_path, b"GGUF" + struct.pack(byte_order + "I", version) + struct.pack("<QQ", 0, 0))
    with pytest.raises(UnsupportedModelError) as err:
        read_gguf_header(path)
    assert err.value.exit_code == 8 and "\n" not in str(err.value)


def test_unsupported_quant_type_is_refused_at_load(tmp_path):
    """IQ2_XXS is a valid type without a dequantizer here: the header reads (inspect can list it), loading names
    the type and the tensor."""
    raw = _random_blocks("IQ2_XXS", 2).tobytes()
    path = _file(tmp_path, _gguf([("blk.w", (256, 2), 16, 0)], data=raw))
    assert read_gguf_header(path).tensors["blk.w"].qtype.name == "IQ2_XXS"
    with pytest.raises(UnsupportedModelError) as err:
        load_gguf_state(path)
    assert "IQ2_XXS" in str(err.value) and "'blk.w'" in str(err.value) and err.value.exit_code == 8


def test_empty_and_unreadable(tmp_path):
    with pytest.raises(BadInputError, match="empty"):
        read_gguf_header(_file(tmp_path, b""))
    with pytest.raises(BadInputError, match="cannot read"):
        read_gguf_header(tmp_path / "missing.gguf")


# --- dequantizers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme-scales"])
@pytest.mark.parametrize("name", BLOCK_TYPES + ["BF16", "F16", "F32"])
def test_dequantize_is_bit_equal_to_gguf(name, extreme):
    t = BY_NAME[name]
    shape = (3, t.block_size * 5) if t.block_size > 1 else (3, 40)
    raw = _random_blocks(name, math.prod(shape) // t.block_size, extreme)
    ref = _reference(raw, name, shape)
    ours = dequantize(torch.from_numpy(raw.copy()), t, shape)
    assert ours.dtype == torch.float32 and _bits_equal(ours.numpy(), ref)
    bf16 = dequantize(torch.from_numpy(raw.copy()), t, shape, torch.bfloat16)
    assert _bits_equal(bf16.float().numpy(), torch.from_numpy(ref.astype(np.float32)).bfloat16().float().numpy())


@pytest.mark.parametrize("name", BLOCK_TYPES + ["F16"])
def test_dequantize_in_pieces_on_a_cpu(monkeypatch, name):
    """Big CPU tensors are dequantized piece by piece (CPU_CHUNK elements): the same bits, the last piece short."""
    import sdcli.quant.dequantize as dq

    monkeypatch.setattr(dq, "CPU_CHUNK", 512)
    t = BY_NAME[name]
    shape = (7, 256 * 3)
    raw = _random_blocks(name, math.prod(shape) // t.block_size)
    ref = _reference(raw, name, shape)
    for dtype in (torch.float32, torch.bfloat16):
        ours = dequantize(torch.from_numpy(raw.copy()), t, shape, dtype)
        assert ours.dtype == dtype and _bits_equal(ours.float().numpy(), torch.from_numpy(ref).to(dtype).float().numpy())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K", "F16"])
def test_dequantize_into_a_given_buffer(monkeypatch, name):
    """`out` (a buffer reused from forward to forward, quant.layers.reused_buffers) gets the bits a fresh tensor
    gets, whatever it held; a buffer of another dtype or size is refused."""
    import sdcli.quant.dequantize as dq

    monkeypatch.setattr(dq, "CPU_CHUNK", 512)
    t, shape = BY_NAME[name], (6, 512)
    raw = torch.from_numpy(_random_blocks(name, math.prod(shape) // t.block_size).copy())
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((math.prod(shape),), float("nan"), dtype=dtype)
        ours = dequantize(raw, t, shape, dtype, out)
        fresh = dequantize(raw, t, shape, dtype)
        assert ours.data_ptr() == out.data_ptr() and _bits_equal(ours.float().numpy(), fresh.float().numpy())
        with pytest.raises(ValueError, match="out must be"):
            dequantize(raw, t, shape, dtype, torch.empty(math.prod(shape) - 1, dtype=dtype))


@pytest.mark.parametrize("name", sorted(DEQUANTIZERS))
def test_dequantize_follows_the_device(name):
    """Every dequantizer runs on the meta device: no host round trip (.item(), numpy) and no CPU-made constant
    in its path, so CUDA inputs stay on CUDA (no GPU here to run them on)."""
    t = BY_NAME[name]
    raw = torch.empty(t.nbytes(4 * 512), dtype=torch.uint8, device="meta")
    for dtype in (torch.float32, torch.bfloat16):
        out = dequantize(raw, t, (4, 512), dtype)
        assert (out.device.type, out.shape, out.dtype) == ("meta", (4, 512), dtype)


def test_dequantize_f64_and_bad_sizes():
    values = RNG.standard_normal(8)
    assert torch.equal(dequantize(torch.from_numpy(values.view(np.uint8).copy()), "F64", (2, 4)),
                       torch.from_numpy(values.astype(np.float32).reshape(2, 4)))  # fmt: skip
    with pytest.raises(ValueError):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))
    with pytest.raises(UnsupportedModelError, match="IQ1_S"):
        dequantize(torch.zeros(50, dtype=torch.uint8), "IQ1_S", (256,))


def _write_all_types(path: Path) -> dict[str, np.ndarray]:
    """A file with one tensor of every type we read: made by gguf.quants.quantize where it can, random blocks
    (K-quants, IQ4) otherwise. Returns name -> the float32 values it holds (by gguf.quants.dequantize)."""
    w = gguf.GGUFWriter(path, "flux")
    values = {}
    for name in BLOCK_TYPES + ["BF16", "F16", "F32"]:
        t = BY_NAME[name]
        shape = (2, 3, max(t.block_size, 32) * 2)
        try:
            data = gguf.quants.quantize(RNG.standard_normal(shape).astype(np.float32), QT(t.id))
        except NotImplementedError:
            data = _random_blocks(name, math.prod(shape) // t.block_size, extreme=True)
            data = data.reshape(*shape[:-1], -1)
        w.add_tensor(f"t.{name}", data, raw_dtype=QT(t.id))
        with np.errstate(all="ignore"):
            values[name] = gguf.quants.dequantize(data, QT(t.id)) if name != "F32" else data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_every_tensor_of_a_written_file(tmp_path):
    """The package's reader and ours see the same bytes; our dequantization equals the reference's bit for bit."""
    path = tmp_path / "all.gguf"
    values = _write_all_types(path)
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    state = load_gguf_state(path)
    for name, expected in values.items():
        ours = state[f"model.diffusion_model.t.{name}"]
        theirs = reader[f"t.{name}"]
        if isinstance(ours, QuantizedTensor):
            assert torch.equal(ours.raw, torch.from_numpy(np.array(theirs.data).reshape(-1)))
            ours = ours.dequantize()
        assert ours.dtype != torch.uint8
        assert _bits_equal(ours.float().numpy(), expected), name


# --- layers --------------------------------------------------------------------------------------------------------

def _quantized(shape: tuple[int, ...], qtype=QT.Q8_0) -> QuantizedTensor:
    """A random weight as GGML blocks over its flattened elements (as city96 stores a 3x3 conv)."""
    values = RNG.standard_normal((math.prod(shape) // 256, 256)).astype(np.float32) * 0.1
    return QuantizedTensor(torch.from_numpy(gguf.quants.quantize(values, qtype).reshape(-1)), int(qtype), shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_and_conv_equal_the_dequantized_op(dtype):
    q = _quantized((64, 128), QT.Q4_1)
    bias = torch.randn(64)
    x = torch.randn(2, 5, 128, dtype=dtype)
    layer = QuantizedLinear(q, bias)
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == torch.uint8
    assert torch.equal(layer(x), F.linear(x, q.dequantize(dtype), bias.to(dtype)))
    like = nn.Conv2d(32, 64, 3, stride=2, padding=1, padding_mode="circular")
    qc = _quantized((64, 32, 3, 3))
    conv = QuantizedConv2d(like, qc)
    x = torch.randn(1, 32, 9, 7, dtype=dtype)
    like.weight = nn.Parameter(qc.dequantize(dtype))
    assert torch.equal(conv(x), like.to(dtype)(x))


def _tiny_unet() -> UNetModel:
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, False),
                     context_dim=64, num_heads=2)  # fmt: skip
    return UNetModel(cfg).eval()


def test_quantize_modules_on_a_unet():
    """Every Linear/Conv2d weight of a tiny UNet as Q8_0 blocks, swapped in at the same attribute paths (on a
    meta-built UNet, biases and the rest loaded after): the same output as the UNet holding the dequantized
    weights, bit for bit. time_embed stays float: UNetModel reads its dtype from time_embed[0].weight."""
    ref = _tiny_unet()
    state = ref.state_dict()
    quantized = {}
    for name, module in ref.named_modules():
        if replaceable(module) and module.weight.numel() % 256 == 0 and "time_embed" not in name:
            flat = module.weight.detach().reshape(-1, 256).numpy()
            raw = torch.from_numpy(gguf.quants.quantize(flat, QT.Q8_0).reshape(-1))
            quantized[name + ".weight"] = QuantizedTensor(raw, "Q8_0", tuple(module.weight.shape))
    assert sum(".conv" in k or "in_layers" in k for k in quantized) and sum("to_q" in k for k in quantized)
    with torch.device("meta"):
        model = UNetModel(ref.config)
    quantize_modules(model, quantized, torch.float32)
    model.load_state_dict({k: v for k, v in state.items() if k not in quantized}, strict=False, assign=True)
    ref.load_state_dict({k: q.dequantize() for k, q in quantized.items()}, strict=False)
    assert set(model.state_dict()) == set(state)
    assert all(isinstance(model.get_submodule(k.removesuffix(".weight")), (QuantizedLinear, QuantizedConv2d))
               for k in quantized)  # fmt: skip
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, ctx), ref(x, t, ctx))


def test_quantize_modules_fits_and_refuses_shapes():
    model = nn.Sequential(nn.Linear(256, 4), nn.Conv2d(256, 4, 1), nn.Embedding(2, 256))
    quantize_modules(model, {"0.weight": _quantized((1, 4, 256)), "1.weight": _quantized((4, 256)),
                             "2.weight": _quantized((2, 256))}, torch.float32)  # fmt: skip
    assert isinstance(model[0], QuantizedLinear) and model[1].weight_shape == (4, 256, 1, 1)
    assert type(model[2]) is nn.Embedding and model[2].weight.dtype == torch.float32  # dequantized, not quantized
    with pytest.raises(BadInputError, match="does not fit"):
        quantize_modules(nn.Sequential(nn.Linear(256, 4)), {"0.weight": _quantized((2, 512))}, torch.float32)
    with pytest.raises(BadInputError, match="no parameter"):
        quantize_modules(nn.Sequential(nn.Linear(256, 4)), {"1.weight": _quantized((4, 256))}, torch.float32)


# --- LoRA at run time ----------------------------------------------------------------------------------------------

def _lora(out_shape: tuple[int, ...], rank: int) -> dict[str, torch.Tensor]:
    out, rest = out_shape[0], out_shape[1:]
    kernel = rest[1:] if len(rest) > 1 else ()
    return {"lora_down.weight": torch.randn(rank, rest[0], *kernel) * 0.1,
            "lora_up.weight": torch.randn(out, rank, *((1, 1) if kernel else ())) * 0.1,
            "alpha": torch.tensor(float(rank) / 2)}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_runtime_lora_equals_merging_into_the_dequantized_weight(dtype, kind):
    """sdcli.loading.lora's merge (the float path) of two LoRAs into the dequantized weight vs the quantized layer adding
    them after dequantization in each forward: the same bits, in float32 and bf16."""
    shape = (64, 128) if kind == "linear" else (64, 32, 3, 3)
    q = _quantized(shape)
    if kind == "linear":
        plain = nn.Linear(128, 64)
        layer = QuantizedLinear(q, plain.bias.detach().clone())
        x = torch.randn(3, 128, dtype=dtype)
    else:
        plain = nn.Conv2d(32, 64, 3, padding=1)
        layer = QuantizedConv2d(plain, q)
        x = torch.randn(1, 32, 6, 6, dtype=dtype)
    plain.weight = nn.Parameter(q.dequantize(dtype), requires_grad=False)
    plain = plain.to(dtype)
    for i in range(2):
        parts, weight = _lora(shape, rank=4 + i), 0.75 - i
        _merge(LoraSpec(Path(f"l{i}.safetensors"), weight), {"m": parts}, {"m": Slot(plain)}, None,
               torch.device("cpu"))  # fmt: skip
        ratio = float(parts["alpha"].item()) / parts["lora_down.weight"].shape[0]  # alpha / rank
        layer.loras.append(RuntimeLora(parts["lora_up.weight"], parts["lora_down.weight"], ratio, weight))
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
    layer.loras.clear()
    assert torch.equal(layer.dequantized_weight(dtype), q.dequantize(dtype))


# --- the writer ----------------------------------------------------------------------------------------------------

def _checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    shapes = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),  # innermost 3: F16
        "model.diffusion_model.input_blocks.1.0.in_layers.2.bias": (320,),
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (320,),  # a GroupNorm
        "model.diffusion_model.time_embed.0.weight": (1280, 320),  # sd.cpp keeps it float
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "model.diffusion_model.tiny.weight": (8, 32),  # 256 elements: small
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512),  # the VAE: never quantized
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1000, 64),
    }
    return {k: torch.randn(s, generator=g).to(torch.float16) for k, s in shapes.items()}


def test_type_rules():
    ckpt = _checkpoint()
    chosen = {k: choose_type(k, tuple(t.shape), t.dtype, "Q8_0").name for k, t in ckpt.items()}
    assert chosen == {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": "Q8_0",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": "Q8_0",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": "F16",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.bias": "F32",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": "F32",
        "model.diffusion_model.time_embed.0.weight": "F16",
        "model.diffusion_model.out.2.weight": "F16",
        "model.diffusion_model.tiny.weight": "F32",
        "first_stage_model.decoder.mid.attn_1.q.weight": "F16",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": "F16",
    }
    rules = parse_type_rules(r"attn2=q4_0, ^first_stage_model\.=q8_0 ,to_q=f16")
    k_attn2, k_q = (next(k for k in ckpt if s in k) for s in ("attn2", "to_q"))
    assert choose_type(k_attn2, (320, 768), torch.float16, "q8_0", rules).name == "Q4_0"
    assert choose_type(k_q, (320, 320), torch.float16, "q8_0", rules).name == "F16"
    assert choose_type("first_stage_model.x.weight", (512, 512), torch.float16, "q8_0", rules).name == "F16"
    assert choose_type("model.diffusion_model.x.weight", (64, 64), torch.bfloat16, "q4_1", ()).name == "Q4_1"
    assert choose_type("model.diffusion_model.x.weight", (4, 4, 3, 3), torch.bfloat16, "q4_1", ()).name == "F32"
    for bad in ("attn", "=q8_0", "x=iq4_xs", "(=q8_0"):
        with pytest.raises(UsageError):
            parse_type_rules(bad)


@pytest.mark.parametrize("qtype, arch", [("Q8_0", None), ("Q4_0", "sd1"), ("Q5_1", None)])
def test_write_read_round_trip(tmp_path, qtype, arch):
    """write_gguf, then the package's GGUFReader and ours: same types, shapes and bytes; dequantized values equal
    gguf.quants' round trip of the input (bit for bit), float tensors equal the input (F16 exactly, F32 too)."""
    ckpt = _checkpoint()
    path = tmp_path / "q.gguf"
    written = write_gguf(path, ckpt, qtype, arch)
    reader = gguf.GGUFReader(path)
    assert ("general.architecture" in reader.fields) == (arch is not None)
    assert {t.name: QT(t.tensor_type).name for t in reader.tensors} == written
    assert {v for v in written.values()} >= {qtype, "F16", "F32"}
    info = read_gguf_header(path)
    assert info.architecture == arch
    state = load_gguf_state(path)
    prefix = "model.diffusion_model." if arch is not None else ""
    for t in reader.tensors:
        source = ckpt[t.name]
        ours = state[t.name if arch is None or t.name.startswith(prefix) else prefix + t.name]
        assert tuple(ours.shape) == tuple(source.shape)
        if isinstance(ours, QuantizedTensor):
            assert torch.equal(ours.raw, torch.from_numpy(np.array(t.data).reshape(-1)))
            expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(source.shape)
            assert _bits_equal(ours.dequantize().numpy(), expected)
            assert np.array_equal(expected, gguf.quants.dequantize(
                gguf.quants.quantize(source.float().numpy(), QT[written[t.name]]), QT[written[t.name]]))
        else:
            assert torch.equal(ours.float(), source.float())


def test_write_refuses(tmp_path):
    with pytest.raises(UsageError, match="IQ4_XS"):
        write_gguf(tmp_path / "k.gguf", _checkpoint(), "IQ4_XS")
    with pytest.raises(BadInputError, match="position_ids"):
        write_gguf(tmp_path / "i.gguf", {"position_ids": torch.arange(4)}, "Q8_0")
    with pytest.raises(OutputError):
        write_gguf(tmp_path / "missing" / "x.gguf", _checkpoint(), "Q8_0")
    assert not list(tmp_path.rglob("*.tmp"))


# --- names -----------------------------------------------------------------------------------------------------

def _named(tmp_path: Path, names: list[str], arch: str | None) -> Path:
    kvs = [_kv("general.architecture", 8, _s(arch))] if arch else []
    return _file(tmp_path, _gguf([(n, (4,), 0, 32 * i) for i, n in enumerate(names)], kvs, b"\0" * 32 * len(names)))


@pytest.mark.parametrize("arch, stored, expected", [
    ("flux", ["double_blocks.0.img_attn.qkv.weight"], ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]),
    ("sdxl", ["input_blocks.0.0.weight"], ["model.diffusion_model.input_blocks.0.0.weight"]),
    (None, ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
     ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"]),
    (None, ["joint_blocks.0.x_block.attn.qkv.weight"], ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]),
    (None, ["encoder.conv_in.weight"], ["encoder.conv_in.weight"]),  # a VAE alone: left to the VAE loader
    # stable-diffusion.cpp's SDXL text encoders, back where an sgm file has them; its SD1 names are the file's
    (None, ["cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "cond_stage_model.1.transformer.text_model.text_projection",
            "cond_stage_model.1.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"],
     ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
      "conditioner.embedders.1.transformer.text_projection",
      "conditioner.embedders.1.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"]),
    (None, ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
     ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]),
    ("t5encoder", ["token_embd.weight", "enc.blk.3.attn_q.weight", "enc.blk.0.attn_rel_b.weight",
                   "enc.blk.1.ffn_gate.weight", "enc.output_norm.weight"],
     ["shared.weight", "encoder.block.3.layer.0.SelfAttention.q.weight",
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      "encoder.block.1.layer.1.DenseReluDense.wi_0.weight", "encoder.final_layer_norm.weight"]),
])  # fmt: skip
def test_names_seen_through_the_ldm_lens(tmp_path, arch, stored, expected):
    assert list(load_gguf_state(_named(tmp_path, stored, arch))) == expected


def test_language_models_are_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match="llama"):
        load_gguf_state(_named(tmp_path, ["blk.0.attn_q.weight"], "llama"))


# --- what the loader relies on ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_scale_check_finds_every_scale(name):
    """QuantizedTensor.scales_finite reads SCALE_OFFSETS only: every listed offset is a scale (a NaN there makes
    that block's values non-finite), and no other field can make them non-finite (random bytes elsewhere, finite
    scales: finite values)."""
    t = BY_NAME[name]
    raw = _random_blocks(name, 64).reshape(64, t.type_size)
    for off in SCALE_OFFSETS[name]:
        raw[:, off:off + 2] = np.array([0x3C00], np.uint16).view(np.uint8)  # 1.0
    shape = (64 * t.block_size // 256, 256) if t.block_size == 256 else (64, t.block_size)
    clean = QuantizedTensor(torch.from_numpy(raw.reshape(-1).copy()), name, shape)
    assert clean.scales_finite() and bool(torch.isfinite(clean.dequantize()).all())
    for off in SCALE_OFFSETS[name]:
        for bad in (0x7E00, 0x7C00, 0xFC00):  # NaN, +Inf, -Inf
            blocks = raw.copy()
            blocks[5, off:off + 2] = np.array([bad], np.uint16).view(np.uint8)
            q = QuantizedTensor(torch.from_numpy(blocks.reshape(-1)), name, shape)
            values = q.dequantize().reshape(-1, t.block_size)
            assert not q.scales_finite() and not bool(torch.isfinite(values[5]).all())


def test_the_header_decides_between_gguf_and_safetensors(tmp_path):
    """is_gguf: a valid safetensors file is safetensors whatever its name; a GGUF named .safetensors is GGUF; a .gguf
    that is neither is explained as a bad GGUF file."""
    from safetensors.torch import save_file

    from sdcli.formats.gguf import is_gguf
    from sdcli.formats.source import open_file

    st = tmp_path / "model.gguf"
    save_file({"a": torch.zeros(2)}, str(st))
    assert not is_gguf(st) and open_file(st).layout == "single"
    gg = _file(tmp_path, _valid(), name="model.safetensors")
    assert is_gguf(gg) and open_file(gg).layout == "gguf"
    junk = _file(tmp_path, b"not a model at all", name="junk.gguf")
    assert is_gguf(junk)
    with pytest.raises(BadInputError, match="not a valid GGUF file"):
        open_file(junk)


def test_unit_dims_added_or_dropped_by_a_writer(tmp_path):
    """A GGUF writer may trim dims of size 1 (ggml keeps trailing ones out of n_dims): a 1x1 conv stored as (C, C),
    float or quantized, loads into the model's (C, C, 1, 1) and computes the same; a non-GGUF file keeps the exact
    shape check."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from make_checkpoint import make_checkpoint

    from sdcli.formats.strict import is_ignored
    from sdcli.loading.checkpoint import load_models

    src = make_checkpoint(tmp_path / "sd1.safetensors", family="sd1", size="tiny", seed=0)
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(src).items() if not is_ignored(k)}
    squeezed = {k: v.reshape(v.shape[:2]) if "skip_connection" in k or ".attn_1." in k and v.dim() == 4 else v
                for k, v in state.items()}  # (proj_in's shape says SD1 or SD2: a writer trimming it would be wrong)
    assert sum(v.dim() == 2 for v in squeezed.values()) > sum(v.dim() == 2 for v in state.values())
    rules = parse_type_rules("skip_connection=q8_0")  # quantized once squeezed (rows of 32, not of 1)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for k in [k for k in state if "skip_connection.weight" in k]:  # A holds B's Q8_0 values as plain floats
        blocks = gguf.quants.quantize(squeezed[k].numpy(), QT.Q8_0)
        state[k] = torch.from_numpy(gguf.quants.dequantize(blocks, QT.Q8_0)).reshape(state[k].shape)
    write_gguf(a, state, "f32")
    write_gguf(b, squeezed, "f32", rules=rules)
    assert read_gguf_header(b).tensors["model.diffusion_model.input_blocks.4.0.skip_connection.weight"].qtype.name \
        == "Q8_0"  # (64, 32) once squeezed: quantized, where (64, 32, 1, 1) has rows of 1
    ma, mb = load_models(a), load_models(b)
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 64, generator=gen)
    with torch.no_grad():
        assert torch.equal(ma.unet(x, torch.tensor([300.0]), ctx), mb.unet(x, torch.tensor([300.0]), ctx))
        z = torch.randn(1, 4, 4, 4, generator=gen)
        assert torch.equal(ma.vae.decode(z), mb.vae.decode(z))
