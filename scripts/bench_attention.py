"""Attention at SD1.5's head dims (40 / 80) on the CPU: the ways to compute it, timed against a plain GEMM.

    python scripts/bench_attention.py                  # SD1.5 512x512 shapes, sdcli's default dtype, 2 threads
    python scripts/bench_attention.py --dtype bf16 --shapes all --variants sdpa-flash   # every family, vs flash
    python scripts/bench_attention.py --dtype bf16     # (only where the CPU has native bf16)
    python scripts/bench_attention.py --threads 1 --reps 5
    python scripts/bench_attention.py --rehearse       # small shapes, 1 rep, seconds: checks the script end to end

Shapes (SD1.5 UNet at 512x512, CFG batch 2, 8 heads): self-attention at the 64x64 level (4096 tokens, head dim 40),
at 32x32 (1024 tokens, head dim 80), and cross-attention on the 77 text tokens at both. Variants, each on the same
q/k/v and compared with sdcli's output (exact, or the largest absolute difference):

- sdcli: sdcli.models.unet.attention on (B, N, heads*d) tensors, as the UNet calls it (in bf16 on a CPU without
  AMX models/cpu_attention.py's two GEMMs with the exponentials inside, else torch's SDPA on packed heads);
- exp-gemm: models/cpu_attention.py's two GEMMs (the exponentials inside the first) forced on, AMX or not;
- sdpa-flash / sdpa-math: torch's scaled_dot_product_attention on packed (B, H, N, d) heads, pinned to each CPU
  backend (sdpa_kernel); the efficient/cuDNN backends are CUDA-only and are reported as n/a;
- sdpa-pad48 / sdpa-pad64: head dim zero-padded to 48 / 64 (scale kept at 1/sqrt(d): the zeros add nothing);
- gemm-chunkN: scores as a batched GEMM per chunk of N queries (baddbmm), softmax, a batched GEMM with v;
- gemm-head-chunkN: the same one head at a time, so the (N, Nk) score block stays in cache (OpenVINO's blocking);
- flex-compiled: torch.compile(flex_attention), whose CPU lowering is inductor's C++ flash-attention template; it is
  compiled in a child process under --compile-timeout seconds (default 60) and left out when it takes longer.

Each variant is timed as wall time and process CPU time (all threads), best of --reps calls after one warm-up,
interleaved (every variant once per round). GFLOP/s counts the two GEMMs (4 * B*H * Nq * Nk * d); the reference
is a plain square GEMM of about the same FLOPs in the same dtype and thread count, timed the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# (name, batch, heads, query tokens, key tokens, head dim): SD1.5 at 512x512 with CFG (batch 2, 8 heads)
SHAPES = [("self 64x64", 2, 8, 4096, 4096, 40), ("self 32x32", 2, 8, 1024, 1024, 80),
          ("cross 64x64", 2, 8, 4096, 77, 40), ("cross 32x32", 2, 8, 1024, 77, 80)]  # fmt: skip
# --shapes all adds the other families' self-attention: SDXL at 1024x1024 (CFG; 10 heads of 64 at 64x64, 20 at
# 32x32), SD3.5 Medium at 1024x1024 (CFG; 4096 image + 333 text tokens, 24 heads of 64), FLUX.1 at 1024x1024 (no
# CFG; 4096 + 512 tokens, 24 heads of 128), and the VAE decoder's mid-block attention at 512x512 (one head of 512)
OTHER_FAMILIES = [("sdxl 64x64", 2, 10, 4096, 4096, 64), ("sdxl 32x32", 2, 20, 1024, 1024, 64),
                  ("sd3.5m 1024px", 2, 24, 4429, 4429, 64), ("flux 1024px", 1, 24, 4608, 4608, 128),
                  ("vae 64x64", 1, 1, 4096, 4096, 512)]  # fmt: skip
REHEARSE = [("self (small)", 2, 8, 256, 256, 40), ("self (small, d80)", 2, 8, 64, 64, 80),
            ("cross (small)", 2, 8, 256, 77, 40)]  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sdcli_attention(q, k, v, heads):
    from sdcli.models.unet import attention

    return attention(q, k, v, heads)


def exp_gemm(q, k, v, heads):
    """models/cpu_attention.py's two GEMMs wherever sdcli would run them (bf16; on an AMX CPU too, where sdcli
    takes torch's flash kernel by default: what an AMX run compares)."""
    from sdcli.models import cpu_attention

    if q.dtype != torch.bfloat16:
        raise ValueError("the exponentials-in-the-GEMM path is bf16 only")
    return unpacked(cpu_attention.blocked(packed(q, heads), packed(k, heads), packed(v, heads)))


def packed(t, heads):
    """(B, N, H*d) -> (B, H, N, d) contiguous."""
    b, n, inner = t.shape
    return t.reshape(b, n, heads, inner // heads).transpose(1, 2).contiguous()


def unpacked(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, heads):
        with sdpa_kernel(backend):
            return unpacked(F.scaled_dot_product_attention(packed(q, heads), packed(k, heads), packed(v, heads)))

    return run


def sdpa_padded(width: int):
    def run(q, k, v, heads):
        qh, kh, vh = (packed(t, heads) for t in (q, k, v))
        d = qh.shape[-1]
        if d >= width:
            raise ValueError(f"head dim {d} is not below {width}: nothing to pad")
        qh, kh, vh = (F.pad(t, (0, width - d)) for t in (qh, kh, vh))  # zeros: q.k and the output unchanged
        return unpacked(F.scaled_dot_product_attention(qh, kh, vh, scale=1 / math.sqrt(d))[..., :d].contiguous())

    return run


def gemm_chunked(chunk: int):
    def run(q, k, v, heads):
        qh, kh, vh = (packed(t, heads) for t in (q, k, v))
        b, h, n, d = qh.shape
        qf, kt, vf = qh.reshape(b * h, n, d), kh.reshape(b * h, -1, d).transpose(1, 2), vh.reshape(b * h, -1, d)
        out = torch.empty_like(qf)
        scale = 1 / math.sqrt(d)
        buf = torch.empty(b * h, min(chunk, n), kt.shape[-1], dtype=qf.dtype)  # baddbmm with beta=0 ignores it
        for s in range(0, n, chunk):
            rows = qf[:, s:s + chunk]
            scores = torch.baddbmm(buf[:, : rows.shape[1]], rows, kt, beta=0, alpha=scale)  # (BH, chunk, Nk)
            out[:, s:s + chunk] = torch.bmm(scores.float().softmax(-1).to(qf.dtype), vf)
        return unpacked(out.reshape(b, h, n, d))

    return run


def gemm_per_head(chunk: int):
    """One head at a time, `chunk` queries at a time: the score block (chunk, Nk) stays in L2 cache between the two
    GEMMs and the softmax, the blocking OpenVINO's CPU SDPA/MHA kernels use (at the cost of a Python loop)."""

    def run(q, k, v, heads):
        qh, kh, vh = (packed(t, heads) for t in (q, k, v))
        b, h, n, d = qh.shape
        qf, kt, vf = qh.reshape(b * h, n, d), kh.reshape(b * h, -1, d).transpose(1, 2), vh.reshape(b * h, -1, d)
        out = torch.empty_like(qf)
        scores = torch.empty(min(chunk, n), kt.shape[-1], dtype=qf.dtype)
        scale = 1 / math.sqrt(d)
        for i in range(b * h):
            for s in range(0, n, chunk):
                rows = qf[i, s:s + chunk]
                block = torch.mm(rows, kt[i], out=scores[: rows.shape[0]]).mul_(scale)  # (chunk, Nk)
                torch.mm(torch.softmax(block, -1), vf[i], out=out[i, s:s + chunk])
        return unpacked(out.reshape(b, h, n, d))

    return run


def flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, heads):
        return unpacked(compiled(packed(q, heads), packed(k, heads), packed(v, heads)))

    return run


def variants(with_flex: bool) -> dict:
    from torch.nn.attention import SDPBackend

    out = {"sdcli": sdcli_attention, "exp-gemm": exp_gemm, "sdpa-flash": sdpa_backend(SDPBackend.FLASH_ATTENTION),
           "sdpa-math": sdpa_backend(SDPBackend.MATH), "sdpa-efficient": sdpa_backend(SDPBackend.EFFICIENT_ATTENTION),
           "sdpa-pad48": sdpa_padded(48), "sdpa-pad64": sdpa_padded(64), "gemm-chunk1024": gemm_chunked(1024),
           "gemm-chunk256": gemm_chunked(256), "gemm-head-chunk64": gemm_per_head(64),
           "gemm-head-chunk256": gemm_per_head(256)}  # fmt: skip
    if with_flex:
        out["flex-compiled"] = flex_compiled()
    return out


def inputs(shape, dtype):
    _, b, h, nq, nk, d = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, nq, h * d, generator=g).to(dtype)
    k = torch.randn(b, nk, h * d, generator=g).to(dtype)
    v = torch.randn(b, nk, h * d, generator=g).to(dtype)
    return q, k, v, h


def clock():
    return time.perf_counter(), time.process_time()


def time_round(fn) -> tuple[float, float, torch.Tensor]:
    (w0, c0) = clock()
    out = fn()
    (w1, c1) = clock()
    return w1 - w0, c1 - c0, out


def gemm_reference(flops: float, dtype, reps: int) -> tuple[float, float]:
    """(wall GFLOP/s, CPU GFLOP/s) of a square GEMM of about `flops` FLOPs, best of `reps`."""
    n = max(64, round((flops / 2) ** (1 / 3) / 16) * 16)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best_w = best_c = float("inf")
    for _ in range(reps):
        w, c, _ = time_round(lambda: a @ b)
        best_w, best_c = min(best_w, w), min(best_c, c)
    return 2 * n**3 / best_w / 1e9, 2 * n**3 / best_c / 1e9


def bench_shape(shape, dtype, reps: int, fns: dict) -> dict:
    q, k, v, heads = inputs(shape, dtype)
    _, b, h, nq, nk, d = shape
    flops = 4 * b * h * nq * nk * d
    with torch.inference_mode():
        ref = fns["sdcli"](q, k, v, heads)
        res = {}
        for name, fn in fns.items():  # warm-up, correctness, and whether the variant applies at all
            try:
                out = fn(q, k, v, heads)
            except (RuntimeError, ValueError) as e:  # a CUDA-only SDPA backend ("No available kernel"), no padding
                res[name] = {"error": str(e).splitlines()[0][:100]}
                continue
            diff = (out.float() - ref.float()).abs().max().item()
            res[name] = {"wall": float("inf"), "cpu": float("inf"), "max_abs_diff": diff,
                         "exact": bool(torch.equal(out, ref))}  # fmt: skip
        for _ in range(reps):  # interleaved rounds, best of each
            for name, r in res.items():
                if "error" in r:
                    continue
                w, c, _ = time_round(lambda: fns[name](q, k, v, heads))
                r["wall"], r["cpu"] = min(r["wall"], w), min(r["cpu"], c)
        gemm_w, gemm_c = gemm_reference(flops, dtype, reps)
    for r in res.values():
        if "error" not in r:
            r["gflops"] = flops / r["wall"] / 1e9
            r["pct_gemm"] = 100 * r["gflops"] / gemm_w
            r["pct_gemm_cpu"] = 100 * (flops / r["cpu"] / 1e9) / gemm_c
    return {"shape": shape[0], "dims": list(shape[1:]), "gflop": flops / 1e9, "gemm_gflops": gemm_w,
            "gemm_gflops_cpu": gemm_c, "variants": res}  # fmt: skip


def flex_compiles(dtype_name: str, timeout: float, small: bool) -> tuple[bool, str]:
    """Whether torch.compile(flex_attention) compiles and runs here within `timeout` s (in a child process, so a
    slow compile cannot hang the run)."""
    code = ("import sys, time; sys.path.insert(0, 'scripts'); import bench_attention as b; "
            "t = time.perf_counter(); f = b.flex_compiled(); "
            "shape = (b.REHEARSE if sys.argv[2] == '1' else b.SHAPES)[0]; "
            "q, k, v, h = b.inputs(shape, b.DTYPES[sys.argv[1]]); f(q, k, v, h); "
            "print(round(time.perf_counter() - t, 1))")
    try:
        out = subprocess.run([sys.executable, "-c", code, dtype_name, str(int(small))], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"did not compile within {timeout:.0f} s"
    if out.returncode != 0:
        return False, "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:120]
    return True, f"compiled and ran in {out.stdout.strip()} s (cold)"


def render(r: dict) -> str:
    lines = [f"Attention on the CPU: {r['machine']}; {r['dtype']}, {r['threads']} thread(s), best of {r['reps']} "
             f"interleaved calls. GFLOP/s counts QK^T and PV; \"% GEMM\" = against a square {r['dtype']} GEMM of the "
             "same FLOPs timed the same way (wall; CPU time in brackets). torch.compile(flex_attention): "
             f"{r['flex']}.", ""]
    head = ["shape (B, H, Nq, Nk, d)", "variant", "wall", "GFLOP/s", "% GEMM (CPU)", "vs sdcli", "output vs sdcli"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in r["shapes"]:
        base = s["variants"]["sdcli"]["wall"]
        for name, v in s["variants"].items():
            dims = f"{s['shape']} {tuple(s['dims'])}"
            if "error" in v:
                lines.append(f"| {dims} | {name} | n/a | | | | {v['error']} |")
                continue
            same = "exact" if v["exact"] else f"max abs diff {v['max_abs_diff']:.2g}"
            lines.append(f"| {dims} | {name} | {v['wall'] * 1e3:.1f} ms | {v['gflops']:.0f} | {v['pct_gemm']:.0f}% "
                         f"({v['pct_gemm_cpu']:.0f}%) | {base / v['wall']:.2f}x | {same} |")
        lines.append(f"| {s['shape']} | plain GEMM, same FLOPs | | {s['gemm_gflops']:.0f} | 100% | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from sdcli.runtime.device import auto_dtype

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: sdcli's default on this CPU")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed calls per variant (best kept; default 3)")
    p.add_argument("--compile-timeout", type=float, default=60.0,
                   help="seconds torch.compile(flex_attention) may take before it is left out (0: skip it)")
    p.add_argument("--shapes", choices=["sd15", "all"], default="sd15", help="all: also SDXL, SD3.5, FLUX, the VAE")
    p.add_argument("--variants", help="comma-separated subset of the variants (sdcli always runs: the reference)")
    p.add_argument("--rehearse", action="store_true", help="small shapes, 1 rep: checks the script")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    dtype_name = auto_dtype("cpu") if a.dtype == "auto" else a.dtype
    if a.rehearse:
        a.reps = 1
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import machine

    ok, flex = flex_compiles(dtype_name, a.compile_timeout, a.rehearse) if a.compile_timeout > 0 else (False, "skipped")
    fns = variants(with_flex=ok)
    if a.variants:
        fns = {name: fn for name, fn in fns.items() if name == "sdcli" or name in a.variants.split(",")}
    shapes = REHEARSE if a.rehearse else SHAPES + (OTHER_FAMILIES if a.shapes == "all" else [])
    r = {"machine": machine(), "dtype": dtype_name, "threads": torch.get_num_threads(), "reps": a.reps, "flex": flex,
         "shapes": [bench_shape(s, DTYPES[dtype_name], a.reps, fns) for s in shapes]}
    table = render(r)
    print(table)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
