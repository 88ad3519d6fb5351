"""Throughput of `sdcli generate --prompts-file` on one machine: the plain local run against `--ray local` with 1
and 2 workers, in images/min (start-up included, as a user sees it, and the steady rate after the first image).

    python scripts/bench_ray.py                       # tiny random model, 24 jobs at 64x64 (a smoke run, ~2 min)
    python scripts/bench_ray.py --model M.safetensors --jobs 40 --size 512 --steps 20 --dtype fp16
    python scripts/bench_ray.py --workers 1 2 4 --gpus-per-worker 1    # one box with several GPUs

Each run is a fresh `sdcli` process (so Ray's start and every model load are counted); the three outputs are
compared byte for byte at the end (same device and dtype: they must be equal). Needs `pip install 'sdcli[ray]'`.

How it scales with nodes
------------------------
Per image the driver does almost nothing: it sends one batch description (the Job: prompt and resolved config,
a few hundred bytes pickled) to a worker, receives the PNG bytes back, and writes them (temp file, fsync,
rename). The model is loaded once per worker and never crosses the network (each node reads it from its own path
or the hub). Over the network go ~0.5 KB per job out and the PNG back: ~0.4-0.6 MB for a 512x512 image, ~1.5-2 MB
for 1024x1024 (PNG of a natural image compresses ~2x from 3 bytes/pixel), plus the metadata (a few KB).

At 100 GPUs rendering SD1.5 512x512 at ~1 s/image (20 steps, an H100-class card) the driver receives ~100 images/s:
~50 MB/s of PNG through one process and one NIC, and 100 fsync'ed writes/s on one disk. The first bottleneck is
the driver's single output path: the fsync per image (a local NVMe does thousands/s, a network file system tens
to hundreds), then its one Python thread unpickling ~50 MB/s and its 1-10 GbE link (1 GbE = ~120 MB/s saturates
near 200 GPUs at 512px, or near 60 GPUs at 1024px). Model loading is a start-up cost per worker (seconds from a
local disk, minutes if 100 nodes pull one hub file at once: pre-seed the cache). Past that, `--ray-write-on-worker`
onto shared storage (writes spread over the nodes; the driver then only keeps the plan) is the way out, and the
prompts file itself (checked whole before any work) stays cheap: a million lines are checked in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: a tiny random SD1 made here)")
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpus-per-worker", type=float, default=None)
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdcli-bench-ray-") as tmp:
        work = Path(tmp)
        model = args.model or _tiny_model(work)
        prompts = work / "jobs.txt"
        prompts.write_text("".join(f"a picture of thing number {i}\n" for i in range(args.jobs)), encoding="utf-8")
        base = [sys.executable, "-m", "sdcli", "generate", "--prompts-file", str(prompts), "-m", str(model),
                "--steps", str(args.steps), "-W", str(args.size), "-H", str(args.size), "--dtype", args.dtype,
                "--seed", "1", "--progress", "json"]
        # The local run gets the workers' thread count, so the bytes can be compared (see README).
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(args.cpus_per_worker)))}
        rows = [_run("local", base + ["-o", f"{work}/local/{{index}}.png"], work / "local", args.jobs, env)]
        for n in args.workers:
            extra = ["--ray", "local", "--workers", str(n), "--cpus-per-worker", str(args.cpus_per_worker)]
            if args.gpus_per_worker is not None:
                extra += ["--gpus-per-worker", str(args.gpus_per_worker)]
            out = work / f"ray{n}"
            rows.append(_run(f"ray x{n}", base + extra + ["-o", f"{out}/{{index}}.png"], out, args.jobs, env))
        _report(rows, work)


def _tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_checkpoint import make_checkpoint

    out = work / "tiny-sd1.safetensors"
    make_checkpoint(out, family="sd1", size="tiny", seed=0, layout="single")
    return out


def _run(label: str, cmd: list[str], out: Path, jobs: int, env: dict) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{label}: sdcli exited {done.returncode}: {done.stderr[-2000:]}")
    images = sorted(out.glob("*.png"))
    assert len(images) == jobs, f"{label}: {len(images)} of {jobs} images"
    # Steady rate: from the first image's end to the last's, from the progress events' elapsed_s.
    times = [json.loads(line).get("elapsed_s") for line in done.stderr.splitlines() if line.startswith('{"event": "image"')]
    steady = (len(times) - 1) / (times[-1] - times[0]) * 60 if len(times) > 2 and times[-1] > times[0] else None
    row = {"run": label, "wall_s": round(wall, 1), "img_per_min": round(jobs / wall * 60, 1),
           "steady_img_per_min": round(steady, 1) if steady else None}
    print(json.dumps(row), flush=True)
    return row


def _report(rows: list[dict], work: Path) -> None:
    local = {p.name: p.read_bytes() for p in (work / "local").glob("*.png")}
    for row in rows[1:]:
        n = row["run"].split("x")[-1]
        same = local == {p.name: p.read_bytes() for p in (work / f"ray{n}").glob("*.png")}
        print(f"{row['run']}: bytes equal to the local run: {same}")
    print("\n| run | wall s | images/min (with start-up) | images/min (steady) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['wall_s']} | {row['img_per_min']} | {row['steady_img_per_min'] or '-'} |")


if __name__ == "__main__":
    main()
