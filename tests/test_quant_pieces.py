"""Linear layers computed from row pieces of their weight (sdcli.quant.layers.linear_pieces): the FLUX blocks use
them so that a quantized weight is never dequantized whole, nor a fused projection's output held whole (1024 px).
A piece's GEMM must give the bits of the whole GEMM's columns, and a GGUF must still render the bits of its
dequantized weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdcli.models.flux import FluxConfig, FluxModel, image_ids, text_ids
from sdcli.quant import dequantize as dequantize_module
from sdcli.quant import layers
from sdcli.quant.layers import (QuantizedLinear, RuntimeLora, add_update, linear_pieces, linear_rows,
                                quantize_modules, reused_buffers, row_pieces)  # fmt: skip
from sdcli.quant.quantize import _blocks
from sdcli.quant.ggml_types import BY_NAME
from sdcli.quant.tensor import QuantizedTensor


def _quantized(weight: torch.Tensor, bias: torch.Tensor | None, qtype: str) -> QuantizedLinear:
    stored = weight.reshape(-1, 256) if weight.shape[-1] % 256 else weight  # as the writer stores such rows
    raw = torch.from_numpy(_blocks(stored, BY_NAME[qtype]).reshape(-1).copy())
    return QuantizedLinear(QuantizedTensor(raw, qtype, tuple(weight.shape)), bias)


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 256 rows for a 256-wide fp32 weight."""
    monkeypatch.setattr(layers, "PIECE_BYTES", 256 * 256 * 4)


def test_row_pieces_cover_the_rows_in_aligned_ranges(small_pieces):
    lin, x = nn.Linear(256, 1000), torch.zeros(1, 256)
    pieces = row_pieces(lin, x, 24, 1000)
    assert pieces[0][0] == 24 and pieces[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    assert all(stop - start == 256 for start, stop in pieces[:-1]) and len(pieces) == 4
    assert row_pieces(lin, x.bfloat16(), 0, 1000) == [(0, 512), (512, 1000)]  # half the bytes per row


@pytest.mark.parametrize("threads", [1, 3])
def test_pieces_give_the_whole_gemms_bits(small_pieces, threads):
    torch.manual_seed(0)
    lin = nn.Linear(256, 1100)
    x = torch.randn(2, 333, 256)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert torch.equal(linear_pieces(lin, x), lin(x))
            assert torch.equal(linear_rows(lin, x, 300, 700), lin(x)[..., 300:700])
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_quantized_pieces_dequantize_only_their_rows(small_pieces, monkeypatch, qtype):
    torch.manual_seed(1)
    weight, bias = torch.randn(1100, 256) * 0.05, torch.randn(1100)
    q = _quantized(weight, bias, qtype)
    dense = nn.Linear(256, 1100)
    dense.weight.data, dense.bias.data = q.dequantized_weight(torch.float32), bias.clone()
    seen = []
    real = layers.dequantize
    monkeypatch.setattr(layers, "dequantize", lambda raw, t, shape, dtype, out=None: seen.append(shape) or real(raw, t, shape, dtype, out))
    x = torch.randn(1, 77, 256)
    with torch.no_grad():
        out = linear_pieces(q, x)
        assert torch.equal(out, dense(x))
    assert [s[0] for s in seen] == [256, 256, 256, 256, 76]  # never the whole weight


def test_rows_that_are_not_whole_blocks_fall_back_to_the_whole_weight():
    torch.manual_seed(2)
    weight = torch.randn(64, 96) * 0.05  # 96 is no whole Q4_K block: stored as 256-element rows
    q = _quantized(weight, None, "Q4_K")
    x = torch.randn(5, 96)
    assert torch.equal(linear_rows(q, x, 10, 40), torch.nn.functional.linear(x, q.dequantized_weight(x.dtype))[:, 10:40])


def _tiny_flux() -> FluxModel:
    cfg = FluxConfig(in_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=256, mlp_hidden_dim=1024,
                     num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(16, 56, 56))
    torch.manual_seed(3)
    model = FluxModel(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(1, 64, 64, generator=g), torch.randn(1, 7, 64, generator=g)
    return (img, image_ids(16, 16)[None], txt, text_ids(7)[None], torch.tensor([0.7]), torch.randn(1, 32, generator=g),
            torch.tensor([3.5]))


def _q8_0_flux_twins() -> tuple[FluxModel, FluxModel]:
    """(the tiny FLUX holding the dequantization of its block Linears' Q8_0 blocks, the same FLUX holding the blocks)."""
    dense, quant = _tiny_flux(), _tiny_flux()
    weights = {k: QuantizedTensor(torch.from_numpy(_blocks(p.data, BY_NAME["Q8_0"]).reshape(-1).copy()), "Q8_0",
                                  tuple(p.shape))
               for k, p in quant.named_parameters() if k.endswith(".weight") and p.dim() == 2 and "blocks" in k}
    quantize_modules(quant, weights, torch.float32)
    for k, q in weights.items():
        dense.get_parameter(k).data = q.dequantize(torch.float32)
    return dense, quant


def test_flux_gguf_in_pieces_has_the_bits_of_its_dequantized_weights(monkeypatch):
    """A Q8_0 FLUX (every block Linear quantized) against the same model with the dequantized weights, with
    pieces smaller than every weight, and against the dense model run whole."""
    dense, quant = _q8_0_flux_twins()
    with torch.no_grad():
        whole = dense(*_inputs())
        monkeypatch.setattr(layers, "PIECE_BYTES", 256 * 256 * 4)
        assert torch.equal(quant(*_inputs()), dense(*_inputs()))
        assert torch.equal(dense(*_inputs()), whole)


def test_flux_gguf_with_reused_buffers_has_the_same_bits(monkeypatch):
    """The tiny Q8_0 FLUX inside reused_buffers (as sampling runs it), every weight dequantized into the one reused
    buffer (CPU_CHUNK lowered so that the tiny weights take that path): the dense model's bits, and the buffer
    freed when the context closes."""
    dense, quant = _q8_0_flux_twins()
    monkeypatch.setattr(dequantize_module, "CPU_CHUNK", 1024)
    buffers = []
    real = layers.dequantize
    monkeypatch.setattr(layers, "dequantize", lambda raw, t, shape, dtype, out=None: buffers.append(
        None if out is None else out.untyped_storage().data_ptr()) or real(raw, t, shape, dtype, out))
    with torch.no_grad():
        expected = dense(*_inputs())
        with reused_buffers():
            first = quant(*_inputs())
            with reused_buffers():  # nested: the same buffer, kept until the outer one closes
                second = quant(*_inputs())
            assert layers._REUSE.buffer is not None
        assert layers._REUSE.buffer is None
        outside = quant(*_inputs())
    assert torch.equal(first, expected) and torch.equal(second, expected) and torch.equal(outside, expected)
    used = buffers[: len(buffers) * 2 // 3]  # the two calls inside the contexts
    assert None not in used and len(set(used)) == 1  # one buffer: the largest weight was the first one asked
    assert set(buffers[len(used):]) == {None}  # outside: a fresh tensor each time


def test_reused_buffers_are_per_thread_and_capped():
    from concurrent.futures import ThreadPoolExecutor

    with reused_buffers():
        mine = layers._reused_buffer(4096, torch.float32, torch.device("cpu"))
        assert mine is not None and mine.numel() == 4096 and mine.dtype == torch.float32
        with ThreadPoolExecutor(1) as pool:  # another thread has no context open: it allocates
            assert pool.submit(layers._reused_buffer, 4096, torch.float32, torch.device("cpu")).result() is None
        too_big = layers.REUSE_MAX_BYTES // 4 + 1
        assert layers._reused_buffer(too_big, torch.float32, torch.device("cpu")) is None
        assert layers._reused_buffer(16, torch.bfloat16, torch.device("meta")) is None


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_runtime_loras_in_pieces_add_only_their_rows(small_pieces, monkeypatch, qtype):
    """A quantized Linear with two run-time LoRAs, one over all rows and one written for two parts of a fused
    weight (rows 200-499 and 700-999, as a to_q / to_v LoRA on a fused qkv), run in row pieces: the bits of
    F.linear with both merged into the dequantized weight, and no piece dequantizes (or updates) the whole."""
    torch.manual_seed(5)
    q = _quantized(torch.randn(1100, 256) * 0.05, torch.randn(1100) * 0.1, qtype)
    full = RuntimeLora(torch.randn(1100, 4) * 0.1, torch.randn(4, 256) * 0.1, 0.5, 0.8)
    fused = RuntimeLora(torch.randn(600, 8) * 0.1, torch.randn(8, 256) * 0.1, 0.25, -1.0,
                        rows=((0, 200, 300), (300, 700, 300)))  # fmt: skip
    merged = q.dequantized_weight(torch.float32)
    merged = add_update(merged, full.ratio * (full.up @ full.down), full.weight, None)
    merged = add_update(merged, fused.ratio * (fused.up @ fused.down), fused.weight, fused.rows)
    q.loras += [full, fused]
    seen = []
    real = layers.dequantize
    monkeypatch.setattr(layers, "dequantize", lambda raw, t, shape, dtype, out=None: seen.append(shape[0]) or real(
        raw, t, shape, dtype, out))
    x = torch.randn(1, 77, 256)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, merged, q.bias)
        assert torch.equal(linear_pieces(q, x), expected)
        assert seen == [256, 256, 256, 256, 76]
        assert torch.equal(q(x), expected)
