"""sdcli's K-quant writer (sdcli/quant/kquants.py): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K blocks from float32 rows.

What is proved here, without ggml's C source (not in this repository; scripts/check_kquants_ggml.py compiles ggml's
own ``quantize_row_q*_K_ref`` and compares every byte: a dev check, run by hand where the source is at hand):
- the blocks read back through the gguf package's numpy dequantizer (``gguf.quants.dequantize``, llama.cpp's own
  reader) and through sdcli's torch dequantizer to the SAME float32 values, bit for bit, on Gaussian, heavy-tailed,
  sparse, constant, all-zero and one-sign rows;
- the round trip is close: each type's relative error on Gaussian rows is below a bound measured for it (the
  ordering Q8_0 < Q6_K < Q5_K < Q4_K < Q3_K < Q2_K follows, with Q4_K below Q4_0, as ggml's quantizers give);
- ``write_gguf`` / ``convert --quantize q4_k`` write files the package's GGUFReader reads, which load in sdcli and
  render exactly what their dequantized weights render through the ordinary float path.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _cli import invoker, pixels
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli.formats.gguf import load_gguf_state, read_gguf_header
from sdcli.quant import kquants
from sdcli.quant.dequantize import dequantize
from sdcli.quant.ggml_types import BY_NAME
from sdcli.quant.quantize import check_writable, write_gguf
from sdcli.quant.tensor import QuantizedTensor
from sdcli.runtime.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# ||dequantized - x|| / ||x|| on the N(0, 1) rows of _rows(): measured Q2_K 0.293, Q3_K 0.152, Q4_K 0.0710,
# Q5_K 0.0362, Q6_K 0.0177 (Q8_0 0.0053, Q4_0 0.0860 through gguf.quants); the bounds are those plus ~3%
MAX_REL_ERROR = {"Q2_K": 0.302, "Q3_K": 0.157, "Q4_K": 0.0732, "Q5_K": 0.0373, "Q6_K": 0.0182}


def _rows(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cases = {
        "gaussian": rng.standard_normal((64, 256)), "weights": rng.standard_normal((8, 768)) * 0.02,
        "heavy": rng.standard_t(2, (16, 256)), "sparse": np.where(rng.random((8, 256)) < 0.8, 0.0,
                                                                   rng.standard_normal((8, 256))),
        "positive": np.abs(rng.standard_normal((8, 256))) + 1.0, "negative": -np.abs(rng.standard_normal((8, 256))),
        "zeros": np.zeros((2, 256)), "constant": np.full((2, 256), -0.75), "integers": rng.integers(-3, 4, (8, 256)),
    }  # fmt: skip
    return {k: v.astype(np.float32) for k, v in cases.items()}


def _sdcli_values(blocks: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return dequantize(torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1)), qtype, shape).numpy()


def _gguf_values(blocks: np.ndarray, qtype: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(BY_NAME[qtype].id))


@pytest.mark.parametrize("qtype", K_TYPES)
def test_blocks_read_back_the_same_through_gguf_and_sdcli(qtype):
    for case, x in _rows().items():
        blocks = kquants.quantize(x, qtype)
        assert blocks.dtype == np.uint8 and blocks.shape == (x.shape[0], x.shape[1] // 256 * BY_NAME[qtype].type_size)
        theirs, ours = _gguf_values(blocks, qtype), _sdcli_values(blocks, qtype, x.shape)
        assert np.isfinite(theirs).all(), (qtype, case)
        assert np.array_equal(theirs.view(np.uint32), ours.view(np.uint32)), (qtype, case)
        if case in ("zeros",):
            assert not theirs.any()


def _rel_error(x: np.ndarray, back: np.ndarray) -> float:
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


def test_relative_error_per_type_and_its_order():
    x = _rows()["gaussian"]
    errors = {q: _rel_error(x, _gguf_values(kquants.quantize(x, q), q)) for q in K_TYPES}
    for q in ("Q8_0", "Q4_0"):
        errors[q] = _rel_error(x, _gguf_values(gguf.quants.quantize(x, gguf.GGMLQuantizationType[q]), q))
    for q, bound in MAX_REL_ERROR.items():
        assert errors[q] < bound, (q, errors[q])
    order = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    assert [errors[q] for q in order] == sorted(errors[q] for q in order), errors
    assert errors["Q4_K"] < errors["Q4_0"]  # same 4.5 bits per weight: the per-32 scales and minimums pay off


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="256"):
        kquants.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="finite"):
        kquants.quantize(np.full((1, 256), np.nan, np.float32), "Q4_K")
    assert check_writable("q4_k").name == "Q4_K"
    with pytest.raises(UsageError, match="llama-quantize"):
        check_writable("iq4_xs")


# --- files --------------------------------------------------------------------------------------------------------

def _dit_like() -> dict[str, torch.Tensor]:
    """Tensors named and shaped as in a Flux DiT (rows of 256 and more), plus what the rules keep float."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"double_blocks.0.img_attn.qkv.weight": (768, 256), "double_blocks.0.img_attn.qkv.bias": (768,),
              "double_blocks.0.img_mlp.0.weight": (1024, 256), "double_blocks.0.img_mlp.2.weight": (256, 1024),
              "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "img_in.weight": (256, 64),
              "single_blocks.0.linear2.weight": (256, 1280)}  # fmt: skip
    return {k: torch.randn(v, generator=gen) * 0.05 for k, v in shapes.items()}


@pytest.mark.parametrize("qtype", K_TYPES)
def test_write_gguf_k_quants_read_by_gguf_and_sdcli(tmp_path, qtype):
    state = _dit_like()
    path = tmp_path / f"dit-{qtype}.gguf"
    chosen = write_gguf(path, state, qtype.lower(), arch="flux")
    assert {k for k, t in chosen.items() if t == qtype} == {k for k in state if k.endswith(".weight") and
                                                             "img_in" not in k}  # fmt: skip
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    ours = load_gguf_state(path)
    for name, t in reader.items():
        assert t.tensor_type.name == chosen[name]
        loaded = ours["model.diffusion_model." + name]
        if chosen[name] != qtype:
            assert torch.equal(loaded, state[name])  # F32 kept as is
            continue
        assert isinstance(loaded, QuantizedTensor)
        blocks = np.array(t.data)
        assert np.array_equal(blocks.reshape(-1), kquants.quantize(state[name].numpy(), qtype).reshape(-1))
        theirs = _gguf_values(blocks, qtype).reshape(state[name].shape)
        assert np.array_equal(loaded.dequantize().numpy().view(np.uint32), theirs.view(np.uint32))
    assert read_gguf_header(path).tensors["double_blocks.0.img_attn.qkv.weight"].qtype.name == qtype


def test_convert_q4_k_renders_its_dequantized_weights(tiny_sd1, tmp_path):  # noqa: F811
    """`convert --quantize q4_k --quantize-convs` (the tiny UNet's rows are 32/64 wide: only as 256-element rows
    do its kernels take K-quant blocks), then the file back to safetensors: the two render the same bytes."""
    q4k, deq = tmp_path / "sd1-q4_k.gguf", tmp_path / "sd1-q4_k-deq.safetensors"
    run = invoker({})
    run("convert", str(tiny_sd1), "-o", str(q4k), "--quantize", "q4_k", "--quantize-convs")
    run("convert", str(q4k), "-o", str(deq))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4k).tensors}
    assert sum(v == "Q4_K" for k, v in types.items() if k.startswith("model.diffusion_model.")) >= 10
    assert all(v in ("F32", "F16") for k, v in types.items() if k.startswith("first_stage_model."))
    original = load_file(tiny_sd1)
    back = load_file(deq)
    k = next(k for k, v in types.items() if v == "Q4_K")
    assert 0 < float((back[k] - original[k]).norm() / original[k].norm()) < MAX_REL_ERROR["Q4_K"]
    images = []
    for model in (q4k, deq):
        out = tmp_path / f"{model.stem}.png"
        run("generate", "a cat", "-m", str(model), "-o", str(out), "--steps", "2", "-W", "64", "-H", "64",
            "--sampler", "euler", "--seed", "3")  # fmt: skip
        images.append(pixels(out))
    assert np.array_equal(images[0], images[1])
