"""Token merging (--tome-ratio) speed per ratio on the full-size SD1.5 UNet step, with what it costs in accuracy.

    python scripts/bench_tome.py                         # 512x512, fp32 or --dtype, ratios 0,0.3,0.5,0.7 (~3 min)
    python scripts/bench_tome.py --image-steps 10        # also a 10-step image per ratio and its PSNR vs ratio 0
    python scripts/bench_tome.py --size 128 --no-docs    # rehearsal

One process and one model: the ratios alternate round by round (0, 0.3, 0.5, 0.7, 0, 0.3, ...) so that a change in
the machine's load hits every ratio alike, and each ratio's fastest CFG step (batch 2) is kept. Beside the time:
the relative error ||eps_r - eps_0|| / ||eps_0|| of the step's noise prediction, and with --image-steps the PSNR of
the decoded image against the ratio-0 image on the same seed. Random weights make both weak as quality measures
(a trained model's tokens are more alike, so merging them costs less there): they show that merging happens and
how it grows with the ratio, not what a user would see. The checkpoint is bench.py's random SD1.5 (.bench/).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import SdcliSide, ensure_checkpoint, inputs, machine, psnr, write_section  # noqa: E402


def step_times(side: SdcliSide, ratios: list[float], size: int, rounds: int) -> tuple[dict, dict]:
    """Fastest CFG step per ratio over interleaved rounds, and each ratio's noise prediction."""
    import torch

    from sdcli.models.tome import token_merging

    x, t, ctx, _ = inputs(size)
    best, eps = {r: float("inf") for r in ratios}, {}
    side.unet_step(x, t, ctx)  # warm-up: first-call allocations and kernel choice
    for _ in range(rounds):
        for r in ratios:
            with torch.inference_mode(), token_merging(side.models.unet, r):
                start = time.perf_counter()
                eps[r] = side.unet_step(x, t, ctx)
                best[r] = min(best[r], time.perf_counter() - start)
    return best, eps


def images(side: SdcliSide, ratios: list[float], size: int, steps: int) -> dict:
    from sdcli import pipeline

    cond, uncond = side.text()
    out = {}
    for r in ratios:
        plan = dataclasses.replace(pipeline.make_plan("euler", "auto", steps, cfg=7.0), token_merging=r)
        lat = pipeline.txt2img(side.models, plan, cond, uncond, [1], size, size)
        out[r] = pipeline.decode_latents(side.models, lat).images
    return out


def table(a, best: dict, eps: dict, imgs: dict) -> str:
    base = eps[0.0]
    rows = ["| ratio | CFG step | speed vs 0 | noise prediction rel. error | image PSNR vs 0 |", "|---|---|---|---|---|"]
    for r, s in best.items():
        err = ((eps[r] - base).norm() / base.norm()).item()
        img = f"{psnr(imgs[r], imgs[0.0]):.1f} dB" if imgs else "-"
        rows.append(f"| {r:g} | {s:.2f} s | {best[0.0] / s:.2f}x | {err:.3g} | {img} |")
    return (f"SD1.5-shaped random weights, {a.size}x{a.size}, {a.dtype}, fastest of {a.rounds} interleaved rounds"
            f"{f', {a.image_steps}-step euler images' if imgs else ''}.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 only where the CPU has it")
    p.add_argument("--ratios", default="0,0.3,0.5,0.7", help="comma-separated; 0 is always included")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image-steps", type=int, default=0, help="also render an image per ratio (0: no)")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = p.parse_args()
    import torch

    ratios = sorted({0.0, *(float(r) for r in a.ratios.split(","))})
    ensure_checkpoint()
    side = SdcliSide({"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype])
    best, eps = step_times(side, ratios, a.size, a.rounds)
    imgs = images(side, ratios, a.size, a.image_steps) if a.image_steps else {}
    body = f"## Token merging per ratio\n\nMachine: {machine()}\n\n{table(a, best, eps, imgs)}"
    print(body)
    if not a.no_docs:
        write_section("bench-tome", body)


if __name__ == "__main__":
    main()
