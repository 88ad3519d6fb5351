"""Peak RSS and wall time of cold `sdcli generate` runs under each model-residency policy, in the same run.

    python scripts/bench_memory.py                 # SD1.5 512px and SDXL 1024px, bf16 where native (~12 min)
    python scripts/bench_memory.py --only sd15     # SD1.5 only (~3 min)
    python scripts/bench_memory.py --sd15-size 64 --sdxl-size 128 --no-docs   # rehearsal (~1 min)

Each render is its own `sdcli generate` process (`SDCLI_RESIDENCY=keep|lean|offload`), timed from the outside,
its peak RSS read from the kernel (getrusage of the child): every stage, as a user runs it. The policies
(README "Memory"): keep = every part loaded up front and kept (the GPU default); lean = the CPU default (text
encoders freed once encoded, the VAE loaded when decoding, the UNet freed after the last sampling); offload =
one of text / UNet / VAE resident at a time (`--offload`). A second SD1.5 row renders two images in one process,
so the cost of offload's reloads between images shows. The same seed must give the same pixels under every
policy: the script compares the PNGs and fails if they differ. The checkpoints are bench.py's and
bench_sdxl.py's random ones (made once in .bench/).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import BENCH, CKPT, cold_render_rss, cpu_name, ensure_checkpoint, fmt, machine, write_section  # noqa: E402

POLICIES = ("keep", "lean", "offload")
TARGETS = {"sd15": 2.6, "sdxl": {"lean": 8.0, "offload": 6.0}}  # GB, issue 17's targets


def same_pixels(paths: list[Path]) -> bool:
    from PIL import Image

    first = Image.open(paths[0]).tobytes()
    return all(Image.open(p).tobytes() == first for p in paths[1:])


def measure(name: str, model: Path, size: int, steps: int, dtype: str, images: int = 1) -> dict:
    rows, outs = {}, []
    for policy in POLICIES:
        out = BENCH / f"mem-{name}-{policy}-{{index}}.png"
        print(f"  {model.name} {size}px {steps} step(s) x{images} {dtype} {policy} ...", file=sys.stderr, flush=True)
        rows[policy] = cold_render_rss(size, steps, dtype, model, out, images, env={"SDCLI_RESIDENCY": policy})
        outs.append(BENCH / f"mem-{name}-{policy}-0.png")
    if not same_pixels(outs):
        raise SystemExit(f"{name}: the policies gave different pixels for the same seed: a residency bug")
    return {"size": size, "steps": steps, "images": images, "dtype": dtype, "policies": rows}


def collect(a) -> dict:
    import torch

    from sdcli.runtime.device import auto_dtype

    dtype = auto_dtype("cpu")
    r = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "dtype": dtype, "runs": {}}
    if a.only in (None, "sd15"):
        ensure_checkpoint()
        r["runs"]["sd15"] = measure("sd15", CKPT, a.sd15_size, 2, dtype)
        r["runs"]["sd15-two-images"] = measure("sd15-2", CKPT, a.sd15_size, 2, dtype, images=2)
    if a.only in (None, "sdxl"):
        from bench_sdxl import ensure_checkpoint as ensure_xl

        r["runs"]["sdxl"] = measure("sdxl", ensure_xl("full"), a.sdxl_size, 1, dtype)
    return r


def render(r: dict) -> str:
    head = ["render (cold process)", *(f"{p}: peak RSS / wall" for p in POLICIES)]
    rows = []
    for name, run in r["runs"].items():
        what = (f"{'SDXL base' if name.startswith('sdxl') else 'SD1.5'} {run['size']}px, {run['steps']} step(s), "
                f"{run['images']} image(s), {run['dtype']}")
        rows.append([what, *(f"{fmt(run['policies'][p]['rss'], 'GB')} / {fmt(run['policies'][p]['wall'])}"
                             for p in POLICIES)])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
    notes = [
        f"CPU: {r['cpu']}, {r['threads']} threads. Each cell is one `sdcli generate` process with "
        "`SDCLI_RESIDENCY` set; peak RSS from getrusage of the child; wall includes imports and loading.",
        "Every policy gave the same PNG pixels for the same seed (checked by the script).",
        f"Targets (issue 17): SD1.5 512px bf16 render <= {TARGETS['sd15']} GB; SDXL 1024px bf16 < "
        f"{TARGETS['sdxl']['lean']} GB by default and < {TARGETS['sdxl']['offload']} GB with --offload.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["sd15", "sdxl"])
    p.add_argument("--sd15-size", type=int, default=512)
    p.add_argument("--sdxl-size", type=int, default=1024)
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = p.parse_args()
    t0 = time.perf_counter()
    r = collect(a)
    (BENCH / "results-memory.json").write_text(__import__("json").dumps(r, indent=1))
    table = render(r)
    print(table)
    print(f"(memory bench, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if not a.no_docs:
        write_section("bench-memory", f"## Memory: residency policies\n\nMachine: {machine()}\n\n{table}")


if __name__ == "__main__":
    main()
