"""Upscaler benchmark: sdcli's RRDBNet (ESRGAN x4 at full size: 23 blocks, 64 features, the shape of
RealESRGAN_x4plus and 4x-UltraSharp) untiled and tiled, against spandrel's direct call, on one random-weight file.

    python scripts/bench_upscale.py                        # 512 -> 2048, tile 256 (minutes per run on a CPU)
    python scripts/bench_upscale.py --size 64 --tile 32 --blocks 2 --features 16    # rehearsal, seconds
    python scripts/bench_upscale.py --write                # ... and the table into docs/benchmarks.md

Each run is its own subprocess (``--worker``), so its load time and peak RSS are its own. The file is written
once to .bench/ in the original ESRGAN layout (model.N, as 4x-UltraSharp): sdcli renames it, spandrel converts
it. Pixels are compared as 8-bit images against spandrel's. Prints a markdown table and the machine.
spandrel is the oracle (scripts/spandrel_oracle.py: installed without dependencies, stub torchvision if needed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # this checkout's sdcli, and the makers


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6  # KiB -> GB
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB


def model_file(blocks: int, features: int) -> Path:
    from make_upscaler import write_rrdb
    from sdcli.models.esrgan import RRDBConfig

    path = BENCH / f"rrdb-x4-b{blocks}-f{features}.pth"
    if not path.exists():
        BENCH.mkdir(exist_ok=True)
        write_rrdb(path, RRDBConfig(num_features=features, num_blocks=blocks), layout="old")
    return path


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_worker(a) -> dict:
    """Load the model one way, upscale the test image `reps` times, save the 8-bit result; report times and RSS."""
    import numpy as np
    import torch

    from make_upscaler import smooth_image

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    if a.worker == "spandrel":
        from spandrel_oracle import import_spandrel

        model = import_spandrel().ModelLoader(device=a.device).load_from_file(a.model).to(dtype=dtype).eval()
        call = lambda x: model(x.to(a.device, dtype))  # noqa: E731
    else:
        from sdcli.upscale.files import load_upscaler
        from sdcli.upscale.tiled import upscale

        model = load_upscaler(a.model, dtype=dtype, device=a.device)
        call = lambda x: upscale(model, x, tile=a.tile or None, overlap=a.overlap)  # noqa: E731
    load_s, loaded_rss = time.perf_counter() - t0, rss_gb()
    image = smooth_image(a.size, a.size, seed=1)
    times, out = [], None
    for _ in range(a.reps):
        t = time.perf_counter()
        with torch.inference_mode():
            out = call(image)
        _sync(a.device)
        times.append(time.perf_counter() - t)
    arr = (out[0].float().clamp(0, 1).cpu().permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.save(a.out, arr)
    cuda_peak = torch.cuda.max_memory_allocated() / 1e9 if a.device.startswith("cuda") else None
    return {"load_s": load_s, "run_s": statistics.median(times), "loaded_rss_gb": loaded_rss,
            "peak_rss_gb": peak_rss_gb(), "cuda_peak_gb": cuda_peak, "threads": torch.get_num_threads()}


def worker(a, side: str, tile: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", str(a.model), "--out", str(out),
           "--size", str(a.size), "--tile", str(tile), "--overlap", str(a.overlap), "--reps", str(a.reps),
           "--dtype", a.dtype, "--device", a.device, "--threads", str(a.threads or 0)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if res.returncode:
        sys.exit(f"worker {side} (tile {tile}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(ours: Path, theirs: Path) -> str:
    import numpy as np

    d = np.abs(np.load(ours).astype(np.int16) - np.load(theirs).astype(np.int16))
    return f"{(d == 0).mean():.2%} / {(d <= 2).mean():.2%} (max {d.max()})"


def machine(threads: int) -> str:
    import torch

    from bench import cpu_name  # scripts/bench.py: model name with CPU family and model numbers

    used = threads or torch.get_num_threads()
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {used} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="input side in pixels (output: 4x)")
    p.add_argument("--tile", type=int, default=256, help="tile side for the tiled run")
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--blocks", type=int, default=23)
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--reps", type=int, default=1, help="timed upscales per run (median)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--write", action="store_true", help="also write the table into docs/benchmarks.md "
                   "(its bench-upscale section)")
    p.add_argument("--worker", choices=["sdcli", "spandrel"], help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(run_worker(a)))
        return
    a.model = model_file(a.blocks, a.features)
    runs = [("spandrel, direct call", "spandrel", 0), ("sdcli, untiled", "sdcli", 0),
            (f"sdcli, tile {a.tile} / overlap {min(a.overlap, a.tile // 4)}", "sdcli", a.tile)]  # fmt: skip
    results = []
    for name, side, tile in runs:
        out = BENCH / f"upscale-{side}-{tile}.npy"
        results.append((name, worker(a, side, tile, out), out))
    report = table(a, results)
    print(report)
    if a.write:
        from bench import write_section  # scripts/bench.py: replaces one generated section of docs/benchmarks.md

        write_section("bench-upscale", f"## Upscalers (`scripts/bench_upscale.py`)\n\n{report}\n")


def table(a, results: list) -> str:
    """The run's heading line and its markdown table."""
    base = results[0][1]["run_s"]
    cuda = a.device.startswith("cuda")
    lines = [f"RRDBNet x4 ({a.blocks} blocks, {a.features} features), {a.size} -> {4 * a.size} px, {a.dtype} on "
             f"{a.device}; {machine(a.threads)}", "",
             "| run | load (s) | upscale (s) | vs spandrel | RSS loaded (GB) | peak RSS (GB) |"
             + (" CUDA peak (GB) |" if cuda else "") + " pixels equal / within 2 levels of spandrel |",
             "|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|"]  # fmt: skip
    for name, r, out in results:
        extra = f" {r['cuda_peak_gb']:.2f} |" if cuda else ""
        lines.append(f"| {name} | {r['load_s']:.2f} | {r['run_s']:.2f} | {r['run_s'] / base:.2f}x | "
                     f"{r['loaded_rss_gb']:.2f} | {r['peak_rss_gb']:.2f} |{extra} {compare(out, results[0][2])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
