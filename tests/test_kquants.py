"""sdcli's K-quant writer (sdcli/quant/kquants.py): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K blocks from float32 rows.

What is proved here, without ggml's C source (not in this repository; scripts/check_kquants_ggml.py compiles ggml's
own ``quantize_row_q*_K_ref`` and compares every byte: a dev check, run by hand where the source is at hand):
- the blocks read back through the gguf package's numpy dequantizer (``gguf.quants.dequantize``, llama.cpp's own
  reader) and through sdcli's torch dequantizer to the SAME float32 values, bit for bit, on Gaussian, heavy-tailed,
  sparse, constant, all-zero and one-sign rows;
- the vectorized writer gives the bytes of a scalar port of ggml's C (Q4_K, Q6_K: loops over float32 values in C's
  order, branches as C has them), written separately in this file;
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


# --- a scalar port of ggml's C, line by line, as a second implementation ------------------------------------------
# Loops over single float32 values in the order ggml-quants.c writes them (quantize_row_q4_K_ref, make_qkx2_quants,
# quantize_row_q6_K_ref, make_qx_quants): what the vectorized writer reorganizes (element-major arrays, masks in place
# of branches and early returns) is written here as C has it, so a slip in that reorganization (a minimum the search
# moves, a branch taken per sub-block) shows as a different byte. Slow: a few blocks only.

F = np.float32


def _nearest_int(v) -> int:
    return int(np.rint(F(v)))


def _make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    lo, hi, sum_w = x[0], x[0], w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        sum_w += w[i]
        sum_x += w[i] * x[i]
    lo = F(0) if lo > 0 else lo
    if hi == lo:
        return F(0), -lo, [0] * n
    iscale = F(nmax) / (hi - lo)
    scale = F(1) / iscale
    levels = [max(0, min(nmax, _nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
    best = F(0)
    for i in range(n):
        diff = scale * F(levels[i]) + lo - x[i]
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(step) + F(nmax)) / (hi - lo)
        aux = [max(0, min(nmax, _nearest_int(iscale * (x[i] - lo)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            sum_l += w[i] * F(aux[i])
            sum_l2 += w[i] * F(aux[i]) * F(aux[i])
            sum_xl += w[i] * F(aux[i]) * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min, this_scale = F(0), sum_xl / sum_l2
            cur = F(0)
            for i in range(n):
                diff = this_scale * F(aux[i]) + this_min - x[i]
                cur += w[i] * (diff * diff)
            if cur < best:
                levels, best, scale, lo = aux, cur, this_scale, this_min
    return scale, -lo, levels


def _scalar_q4_k(x: np.ndarray) -> bytes:
    out = b""
    for block in x.reshape(-1, 256):
        xs = [F(v) for v in block]
        scales, mins, levels = [], [], []
        for j in range(8):
            sub = xs[32 * j:32 * j + 32]
            sum_x2 = F(0)
            for v in sub:
                sum_x2 += v * v
            av_x = F(np.sqrt(sum_x2 / F(32)))
            sc, mn, lv = _make_qkx2(sub, [av_x + F(abs(v)) for v in sub], 15, -1.0, 0.1, 20)
            scales.append(sc), mins.append(mn), levels.extend(lv)
        max_scale, max_min = max([F(0), *scales]), max([F(0), *mins])
        inv_s = F(63) / max_scale if max_scale > 0 else F(0)
        inv_m = F(63) / max_min if max_min > 0 else F(0)
        ls = [min(63, _nearest_int(inv_s * s) & 0xFF) for s in scales]
        lm = [min(63, _nearest_int(inv_m * m) & 0xFF) for m in mins]
        packed = [0] * 12
        for j in range(8):
            if j < 4:
                packed[j], packed[j + 4] = ls[j], lm[j]
            else:
                packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
                packed[j - 4] |= (ls[j] >> 4) << 6
                packed[j] |= (lm[j] >> 4) << 6
        d, dmin = np.float16(max_scale / F(63)), np.float16(max_min / F(63))
        for j in range(8):
            dj = F(d) * F(ls[j])
            if dj == 0:
                continue
            dm = F(dmin) * F(lm[j])
            for i in range(32):
                levels[32 * j + i] = max(0, min(15, _nearest_int((xs[32 * j + i] + dm) / dj)))
        qs = [levels[k + i] | (levels[k + i + 32] << 4) for k in range(0, 256, 64) for i in range(32)]
        out += d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)
    return out


def _make_qx(x, nmax):
    amax, top = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, top = F(abs(v)), v
    if amax < F(1e-15):
        return F(0), [0] * len(x)

    def attempt(iscale):
        q = [max(-nmax, min(nmax - 1, _nearest_int(iscale * v))) for v in x]
        sumlx = suml2 = F(0)
        for v, l in zip(x, q):
            w = v * v
            sumlx += w * v * F(l)
            suml2 += w * F(l) * F(l)
        return q, sumlx, suml2

    q, sumlx, suml2 = attempt(F(-nmax) / top)
    levels = [l + nmax for l in q]
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        q, sumlx, suml2 = attempt(-(F(nmax) + F(0.1) * F(step)) / top)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            levels, scale = [l + nmax for l in q], sumlx / suml2
            best = scale * sumlx
    return scale, levels


def _scalar_q6_k(x: np.ndarray) -> bytes:
    out = b""
    for block in x.reshape(-1, 256):
        xs = [F(v) for v in block]
        scales, levels = [], []
        for j in range(16):
            sc, lv = _make_qx(xs[16 * j:16 * j + 16], 32)
            scales.append(sc), levels.extend(lv)
        amax, top = F(0), F(0)
        for s in scales:
            if abs(s) > amax:
                amax, top = F(abs(s)), s
        if amax < F(1e-15):
            out += bytes(210)
            continue
        iscale = F(-128) / top
        d = np.float16(F(1) / iscale)
        sc = [min(127, _nearest_int(iscale * s)) for s in scales]
        for j in range(16):
            dj = F(d) * F(sc[j])
            if dj == 0:
                continue
            for i in range(16):
                levels[16 * j + i] = max(-32, min(31, _nearest_int(xs[16 * j + i] / dj))) + 32
        ql, qh = [0] * 128, [0] * 64
        for h in range(2):
            lv = levels[128 * h:128 * h + 128]
            for i in range(32):
                ql[64 * h + i] = (lv[i] & 0xF) | ((lv[i + 64] & 0xF) << 4)
                ql[64 * h + i + 32] = (lv[i + 32] & 0xF) | ((lv[i + 96] & 0xF) << 4)
                qh[32 * h + i] = (lv[i] >> 4) | ((lv[i + 32] >> 4) << 2) | ((lv[i + 64] >> 4) << 4) | \
                    ((lv[i + 96] >> 4) << 6)  # fmt: skip
        out += bytes(ql) + bytes(qh) + np.array(sc, np.int8).tobytes() + d.tobytes()
    return out


@pytest.mark.parametrize("qtype, scalar", [("Q4_K", _scalar_q4_k), ("Q6_K", _scalar_q6_k)])
def test_vectorized_writer_equals_a_scalar_port_of_ggml(qtype, scalar):
    rows = _rows(2)
    x = np.concatenate([rows["gaussian"][:3], rows["weights"][:1, :256], rows["heavy"][:1], rows["sparse"][:1],
                        rows["positive"][:1], rows["zeros"][:1], rows["constant"][:1]])  # fmt: skip
    assert kquants.quantize(x, qtype).tobytes() == scalar(x)


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
