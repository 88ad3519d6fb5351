"""GGUF weights on a CUDA GPU (issue 26): what a user with `flux1-dev-Q4_K_S.gguf` on a 12-16 GB card gets.

    python scripts/bench_cuda_gguf.py --out DIR          # on the device machine, ~3 min on an H100
    BENCH_CUDA_DRY=1 python scripts/bench_cuda_gguf.py   # rehearsal on the CPU, tiny widths, seconds

1. Every dequantizer sdcli has, on random GGML blocks on the GPU: the bits of the same blocks dequantized on the
   CPU (which tests/test_gguf.py holds to gguf-py's numpy), in float32 and bf16 (NaN-aware bit comparison).
2. One full-width FLUX.1 double and single block and one SD3.5 Medium joint block at 1024 px in bf16, with dense
   weights and as Q8_0 / Q4_K blocks dequantized in each forward (scripts/bench_dequant.py builds them): the
   median time of a forward, the peak GPU memory it allocates (torch.cuda.max_memory_allocated after a reset, the
   weights included) and whether the quantized output has the bits of the dense one holding the dequantized
   weights.

Prints one JSON object and, with --out, writes it to DIR/results-cuda-gguf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_dequant import cast_inputs, inputs, variants  # noqa: E402
from sdcli.quant.dequantize import DEQUANTIZERS, dequantize  # noqa: E402
from sdcli.quant.ggml_types import ggml_type  # noqa: E402

DRY = os.environ.get("BENCH_CUDA_DRY") == "1"
DEV = torch.device("cpu" if DRY else "cuda")
SIZE, REPS = (64, 2) if DRY else (1024, 10)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality with NaNs of the same pattern equal (random blocks hold NaN and Inf scales)."""
    a, b = a.contiguous(), b.contiguous()
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.view(view).cpu(), b.view(view).cpu())


def dequantizers() -> dict[str, bool]:
    """type -> its GPU result (fp32 and bf16) has the CPU result's bits."""
    gen, out = torch.Generator().manual_seed(0), {}
    for name in sorted(DEQUANTIZERS):
        t = ggml_type(name)
        shape = (64, 4 * t.block_size if t.block_size > 1 else 1024)
        n_bytes = t.nbytes(shape[0] * shape[1])
        raw = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=gen)
        ok = True
        for dtype in (torch.float32, torch.bfloat16):
            ok &= same_bits(dequantize(raw.to(DEV), t, shape, dtype), dequantize(raw, t, shape, dtype))
        out[name] = ok
    return out


def timed_forward(block: torch.nn.Module, args: tuple) -> tuple[float, float, object]:
    """(median seconds of a forward, peak GB allocated during one, the output)."""
    with torch.no_grad():
        out = block(*args)  # warm-up (kernels, cuBLAS workspaces)
        sync()
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(REPS):
            t0 = time.perf_counter()
            out = block(*args)
            sync()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def blocks() -> list[dict]:
    rows = []
    for kind in ("flux-double", "flux-single", "sd3"):
        for qtype, (quant, dense) in variants(kind, DRY).items():
            args = cast_inputs(kind, inputs(kind, dense, SIZE), torch.bfloat16, DEV)
            row = {"block": kind, "type": qtype, "size": SIZE}
            for label, block in (("dense", dense), ("quant", quant)):
                block.to(DEV, torch.bfloat16)
                secs, peak, out = timed_forward(block, args)
                row[f"{label}_s"], row[f"{label}_peak_gb"] = secs, peak
                row[f"{label}_out"] = out
                block.to("cpu")
            d, q = row.pop("dense_out"), row.pop("quant_out")
            d, q = (d if isinstance(d, tuple) else (d,)), (q if isinstance(q, tuple) else (q,))
            row["same_bits"] = all(x is None and y is None or same_bits(x, y) for x, y in zip(d, q))
            row["adds"] = row["quant_s"] / row["dense_s"] - 1
            print(json.dumps(row), flush=True)
            rows.append(row)
            del quant, dense
            if DEV.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for results-cuda-gguf.json")
    a = p.parse_args()
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (dry run)"
    result = {"device": name, "torch": torch.__version__, "dequantizers": dequantizers(), "blocks": blocks()}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "results-cuda-gguf.json").write_text(text + "\n")
    bad = [k for k, ok in result["dequantizers"].items() if not ok] + [
        f"{r['block']} {r['type']}" for r in result["blocks"] if not r["same_bits"]]
    if bad:
        raise SystemExit(f"not the CPU's / dense bits: {', '.join(bad)}")


if __name__ == "__main__":
    main()
