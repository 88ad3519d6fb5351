"""What thread-count invariance costs: one full-size SD1.5 UNet step (CFG batch 2), wall and CPU time.

    python scripts/bench_threads.py --toggle --size 512 --dtype fp32 --rounds 3 --threads 2
    python scripts/bench_threads.py --base 4e5dd70 --size 512 --dtype fp32 --rounds 3 --steps 2 [--threads 2]

`--toggle`: one process, one model; steps alternate between the invariant forms of models/invariant.py and torch's
own ops swapped back in (PointwiseConv -> nn.Conv2d, GroupNorm -> nn.GroupNorm, the element-wise helpers -> the
plain F ops, GEGLU's gelu on its strided gate as before): the same memory and weights on both sides, so the
difference is the fixes'. `--base`: this tree's sdcli against the package of a base commit, in alternating fresh
processes (A B A B ...). The checkpoint is scripts/make_checkpoint.py's random full-size SD1.5 (made once under
.bench/). On a shared machine only the CPU-time ratio means much (run with OMP_WAIT_POLICY=PASSIVE so waiting
threads do not spin), and that one only roughly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
if int(sys.argv[5]):
    torch.set_num_threads(int(sys.argv[5]))
from sdcli.loading import checkpoint
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]
models = checkpoint.load_models(sys.argv[2], dtype=dtype)
unet, size, steps = models.unet, int(sys.argv[4]), int(sys.argv[6])
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
t = torch.full((2,), 500.0)
walls, cpus = [], []
with torch.inference_mode():
    out = unet(x, t, ctx)
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        out = unet(x, t, ctx)
        walls.append(time.perf_counter() - w); cpus.append(time.process_time() - c)
print(json.dumps({"package": __import__("sdcli").__file__, "wall": walls, "cpu": cpus,
                  "threads": torch.get_num_threads(), "sum": float(out.float().sum())}))
"""


TOGGLE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
from torch import nn
if int(sys.argv[5]):
    torch.set_num_threads(int(sys.argv[5]))
from sdcli.loading import checkpoint
from sdcli.models import invariant
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]
models = checkpoint.load_models(sys.argv[2], dtype=dtype)
unet, size, rounds = models.unet, int(sys.argv[4]), int(sys.argv[6])
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, size // 8, size // 8, generator=g).to(dtype)
ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
t = torch.full((2,), 500.0)
saved = (invariant._plain, invariant.PointwiseConv.forward, invariant.GroupNorm.forward)

def mode(on):
    invariant._plain = saved[0] if on else (lambda x: True)
    invariant.PointwiseConv.forward = saved[1] if on else nn.Conv2d.forward
    invariant.GroupNorm.forward = saved[2] if on else nn.GroupNorm.forward

res = {"on": {"wall": [], "cpu": []}, "off": {"wall": [], "cpu": []}}
with torch.inference_mode():
    for on in (True, False):
        mode(on); unet(x, t, ctx)  # warm-up of both
    for r in range(rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            mode(on)
            w, c = time.perf_counter(), time.process_time()
            unet(x, t, ctx)
            res["on" if on else "off"]["wall"].append(time.perf_counter() - w)
            res["on" if on else "off"]["cpu"].append(time.process_time() - c)
            print(r, on, res, file=sys.stderr, flush=True)
print(json.dumps({"threads": torch.get_num_threads(), **res}))
"""


def toggle(ckpt: Path, a) -> dict:
    out = subprocess.run([sys.executable, "-c", TOGGLE, str(ROOT), str(ckpt), a.dtype, str(a.size), str(a.threads),
                          str(a.rounds)], capture_output=True, text=True, check=True)  # fmt: skip
    res = json.loads(out.stdout.strip().splitlines()[-1])
    med = {k: {m: statistics.median(v) for m, v in res[k].items()} for k in ("on", "off")}
    return {"size": a.size, "dtype": a.dtype, "threads": res["threads"], "steps": res, "median": med,
            "ratio_wall": med["on"]["wall"] / med["off"]["wall"], "ratio_cpu": med["on"]["cpu"] / med["off"]["cpu"]}


def base_package(commit: str, dest: Path) -> Path:
    archive = dest / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), commit, "sdcli"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "base", filter="data")
    return dest / "base"


def checkpoint() -> Path:
    from bench import ensure_checkpoint

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this tree's maker
    return ensure_checkpoint()


def run(package: Path, ckpt: Path, a) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(package), str(ckpt), a.dtype, str(a.size),
                          str(a.threads), str(a.steps)], capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toggle", action="store_true", help="in one process: invariant forms on/off, step by step")
    p.add_argument("--base", help="commit whose sdcli/ is the A side")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per process, after one warm-up step")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    ckpt = checkpoint()
    if a.toggle:
        print(json.dumps(toggle(ckpt, a)))
        return
    if not a.base:
        p.error("give --toggle or --base COMMIT")
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"base": base_package(a.base, Path(tmp)), "this": ROOT}
        times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in sides}
        for r in range(a.rounds):
            for name, package in (sides.items() if r % 2 == 0 else reversed(sides.items())):
                res = run(package, ckpt, a)
                times[name]["wall"] += res["wall"]
                times[name]["cpu"] += res["cpu"]
                print(f"round {r} {name}: wall {res['wall']} cpu {res['cpu']} ({res['threads']} threads)",
                      file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
    print(json.dumps({"size": a.size, "dtype": a.dtype, "median": med,
                      "ratio_wall": med["this"]["wall"] / med["base"]["wall"],
                      "ratio_cpu": med["this"]["cpu"] / med["base"]["cpu"]}))


if __name__ == "__main__":
    main()
