"""What dequantizing GGUF weights costs in a step, and what a block holds at its peak: one full-width FLUX.1 double
and single block and one SD3.5 Medium joint block, each run with dense float32 weights and with the same weights
as GGML blocks (Q8_0, Q4_K), dequantized in the forward as sdcli runs a GGUF (quant/layers.py).

A step of these DiTs is its blocks (19 double + 38 single for FLUX.1, 24 joint for SD3.5 Medium; the embedders
and the last layer are <1% of the work), so a block's time ratio is the step's. The weights are random GGML blocks
with small finite scales, the dense weights their dequantization: each quantized output is checked to be the bits
of the dense one. Dequantization costs the same at every image size while the GEMMs grow with the tokens, so the
overhead is given at 512 and 1024 px. Also per type: dequantization speed in ns per weight.

    python scripts/bench_dequant.py                  # both sizes, all blocks, 2 rounds (~5 min quiet on 2 cores)
    python scripts/bench_dequant.py --rehearse       # tiny widths, seconds
    python scripts/bench_dequant.py --fresh          # a fresh buffer per dequantization (before reused_buffers)
    python scripts/bench_dequant.py --dtype bf16     # bf16 compute, against dense bf16 (on a CPU with native bf16)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from sdcli.models import flux, mmdit  # noqa: E402
from sdcli.quant.dequantize import dequantize  # noqa: E402
from sdcli.quant.ggml_types import ggml_type  # noqa: E402
from sdcli.quant.layers import quantize_modules, reused_buffers  # noqa: E402
from sdcli.quant.tensor import QuantizedTensor  # noqa: E402
from sdcli.runtime.device import fix_heap_threshold  # noqa: E402

TYPES = ("Q8_0", "Q4_K")
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}  # f16 d (and dmin)


def random_blocks(qtype: str, shape: tuple[int, ...], gen: torch.Generator) -> QuantizedTensor:
    """Random GGML blocks whose f16 scales are small and finite (a weight's values do not move the timing)."""
    t = ggml_type(qtype)
    n = int(np.prod(shape))
    blocks = torch.randint(0, 256, (n // t.block_size, t.type_size), dtype=torch.uint8, generator=gen)
    scale = torch.from_numpy(np.array([0.002], np.float16).view(np.uint8).copy())
    for off in SCALE_OFFSETS[qtype]:
        start = off % t.type_size
        blocks[:, start : start + 2] = scale
    return QuantizedTensor(blocks.reshape(-1), qtype, shape)


def build(kind: str, rehearse: bool) -> torch.nn.Module:
    """One block at full width (or a tiny one), float32, random small weights."""
    if kind == "sd3":
        cfg = mmdit.MMDiTConfig(hidden_size=256, num_heads=4, mlp_hidden=1024) if rehearse else mmdit.MMDiTConfig()
        block = mmdit.JointBlock(cfg, index=cfg.depth - 2)
    else:
        cfg = flux.FluxConfig(hidden_size=256, mlp_hidden_dim=1024, num_heads=2, axes_dim=(16, 56, 56)) \
            if rehearse else flux.FluxConfig()  # fmt: skip
        block = flux.DoubleStreamBlock(cfg) if kind == "flux-double" else flux.SingleStreamBlock(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in block.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.02
    return block.eval()


def variants(kind: str, rehearse: bool) -> dict[str, torch.nn.Module]:
    """{GGML type: (the block with its weights as blocks of that type, its twin holding their dequantization)}."""
    out = {}
    for qtype in TYPES:
        quant, dense = build(kind, rehearse), build(kind, rehearse)
        gen = torch.Generator().manual_seed(1)
        weights = {k: random_blocks(qtype, tuple(p.shape), gen) for k, p in quant.named_parameters()
                   if k.endswith("weight") and p.dim() == 2 and p.shape[1] % 256 == 0}  # fmt: skip
        quantize_modules(quant, weights, torch.float32)
        for k, q in weights.items():
            dense.get_parameter(k).data = q.dequantize(torch.float32)
        out[qtype] = (quant, dense)
    return out


def inputs(kind: str, block: torch.nn.Module, size: int) -> tuple:
    """The block's inputs at an image size: FLUX 512 text tokens + (size/16)^2 image tokens, SD3.5 333 + (size/16)^2."""
    gen = torch.Generator().manual_seed(2)
    img = (size // 16) ** 2
    if kind == "sd3":
        d = block.x_block.adaLN_modulation[1].in_features
        return torch.randn(1, 333, d, generator=gen), torch.randn(1, img, d, generator=gen), torch.randn(1, d, generator=gen)
    d = block.modulation.lin.in_features if kind == "flux-single" else block.img_mod.lin.in_features
    head = (d // (block.heads if kind == "flux-single" else block.img_attn.heads))
    cfg = flux.FluxConfig(hidden_size=d, num_heads=d // head, axes_dim=flux.default_axes_dim(head))
    latent = size // 8  # image_ids takes the latent's size (2x2 patches)
    ids = torch.cat([flux.text_ids(512)[None], flux.image_ids(latent, latent)[None]], dim=1)
    pe = flux.rope(ids, cfg.axes_dim, cfg.theta)
    vec = torch.randn(1, d, generator=gen)
    if kind == "flux-single":
        return torch.randn(1, 512 + img, d, generator=gen), vec, pe
    return torch.randn(1, img, d, generator=gen), torch.randn(1, 512, d, generator=gen), vec, pe


def cast_inputs(kind: str, args: tuple, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple:
    """inputs() in `dtype` on `device`; FLUX's rotary table (the last) stays float32, as FluxModel passes it."""
    def move(x):
        return tuple(move(t) for t in x) if isinstance(x, tuple) else x.to(device)

    if kind.startswith("flux"):
        return (*(a.to(device, dtype) for a in args[:-1]), move(args[-1]))
    return tuple(a.to(device, dtype) for a in args)


def rss_gib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 2**20
    return float("nan")


def timed(block: torch.nn.Module, args: tuple) -> tuple[float, float, object]:
    """(seconds, GiB added at the peak (VmHWM reset first), output) of one forward."""
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_gib()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = block(*args)
    return time.perf_counter() - t0, rss_gib("VmHWM") - base, out


def same(a, b) -> bool:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a, b))


def bench_block(kind: str, sizes: list[int], rounds: int, rehearse: bool, dtype: torch.dtype) -> list[str]:
    rows = []
    for qtype, (quant, dense) in variants(kind, rehearse).items():
        quant.to(dtype), dense.to(dtype)  # the blocks stay uint8; GGUF dequantizes to the input's dtype
        for size in sizes:
            args = cast_inputs(kind, inputs(kind, dense, size), dtype)
            best = {"dense": (1e9, 0.0), "quant": (1e9, 0.0)}
            for _ in range(rounds):  # alternated, the faster of each
                for label, block in (("dense", dense), ("quant", quant)):
                    secs, peak, out = timed(block, args)
                    best[label] = (min(best[label][0], secs), max(best[label][1], peak))
                    if label == "dense":
                        ref = out
                    elif not same(out, ref):
                        raise SystemExit(f"{kind} {qtype}: the quantized block's output is not the dense one's bits")
            (td, pd), (tq, pq) = best["dense"], best["quant"]
            rows.append(f"| {kind} | {size} px | {qtype} | {td:.2f} s | {tq:.2f} s | {100 * (tq / td - 1):+.1f}% "
                        f"| {pd:.2f} / {pq:.2f} GiB |")
            print(rows[-1], flush=True)
        del quant, dense
    return rows


def dequant_speed(rehearse: bool, dtype: torch.dtype) -> list[str]:
    shape = (256, 1024) if rehearse else (3072, 12288)
    gen, n, rows = torch.Generator().manual_seed(3), shape[0] * shape[1], []
    out = torch.empty(shape, dtype=dtype)
    for qtype in ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"):
        q = random_blocks(qtype, shape, gen)
        fresh = min(_secs(lambda: dequantize(q.raw, qtype, shape, dtype)) for _ in range(3))
        reused = min(_secs(lambda: dequantize(q.raw, qtype, shape, dtype, out)) for _ in range(3))
        rows.append(f"| {qtype} | {fresh / n * 1e9:.2f} ns | {reused / n * 1e9:.2f} ns |")
        print(rows[-1], flush=True)
    return rows


def _secs(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", default="flux-double,flux-single,sd3")
    p.add_argument("--sizes", default="512,1024")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rehearse", action="store_true", help="tiny widths at 64 and 128 px")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    p.add_argument("--fresh", action="store_true", help="a fresh buffer per dequantization (no reused_buffers)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype (bf16: where native)")
    args = p.parse_args()
    fix_heap_threshold()  # as `sdcli generate` runs
    sizes = [64, 128] if args.rehearse else [int(s) for s in args.sizes.split(",")]
    from bench import machine  # scripts/bench.py: CPU model, family/model numbers, flags, threads, date

    buffers = "a fresh buffer per weight" if args.fresh else "one reused buffer (quant.layers.reused_buffers)"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    lines = [f"Machine: {machine()}; {args.dtype} compute; GGUF weights dequantized into {buffers}", "",
             "| block | image | type | dense | GGUF (dequantized per forward) | dequantization adds "
             "| peak RSS added, dense / GGUF |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    with contextlib.nullcontext() if args.fresh else reused_buffers():  # held over all the forwards, as sampling does
        for kind in args.blocks.split(","):
            lines += bench_block(kind, sizes, args.rounds, args.rehearse, dtype)
    lines += ["", f"| type | dequantization to {args.dtype}, per weight: fresh buffer | reused buffer |",
              "|---|---|---|", *dequant_speed(args.rehearse, dtype)]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
