"""Page faults and CPU time of full-size UNet calls with and without the sampling heap (runtime/device.py
`sampling_heap`), each mode in its own fresh process, alternated A/B/A/B (issue 31).

    python scripts/bench_heap.py                           # 512px fp32, 2 threads, 2 rounds of held/pinned
    python scripts/bench_heap.py --size 64 --rounds 1      # rehearsal (the full-size model, tiny latent)
    python scripts/bench_heap.py --render --steps 4        # whole `sdcli generate` renders instead

Each process loads the SD1.5-shaped UNet under the pinned thresholds (device.fix_heap_threshold, as a render
does), then runs a warm-up call and `--calls` measured calls of one CFG batch-2 step, inside `sampling_heap`
("held") or with SDCLI_SAMPLING_HEAP=0 ("pinned"). Per measured call: minor page faults, user and system CPU
seconds (getrusage), the RSS after it; for the whole sampling: its peak RSS (VmHWM, reset after the load) and the
RSS after the stage ends. On a shared machine compare CPU seconds and faults, not wall time. Every process's
output bytes (sha256 of the last call) must be the same.

--render: whole cold `python -m sdcli generate` processes (fp32, lean, as a user runs them) under
`/usr/bin/time -v`, held and pinned alternated: minor faults, user and system CPU, max RSS (the peak of the load,
the steps and the decode), and the PNG files' bytes, which must be identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(a) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    from sdcli.loading import checkpoint
    from sdcli.runtime import device

    torch.set_num_threads(a.threads)
    device.fix_heap_threshold()
    unet = checkpoint.load_models(a.model, dtype=torch.float32).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.size // 8, a.size // 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.context_dim, generator=g)
    t = torch.full((2,), 500.0)
    device.trim_heap()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the sampling's peak, not the load's
    calls = []
    with torch.inference_mode(), device.sampling_heap(torch.device("cpu")):
        for i in range(a.calls + 1):
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            out = unet(x, t, ctx)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            calls.append({"minflt": r1.ru_minflt - r0.ru_minflt, "user": r1.ru_utime - r0.ru_utime,
                          "sys": r1.ru_stime - r0.ru_stime, "rss_gb": status_kb("VmRSS") / 1e6})
    print(json.dumps({"calls": calls, "peak_gb": status_kb("VmHWM") / 1e6, "after_gb": status_kb("VmRSS") / 1e6,
                      "sha256": hashlib.sha256(out.numpy().tobytes()).hexdigest()[:16]}))


def render(a) -> None:
    """Cold `sdcli generate` processes, held and pinned alternated, measured by /usr/bin/time -v."""
    fields = {"Minor (reclaiming a frame) page faults": "minflt", "User time (seconds)": "user",
              "System time (seconds)": "sys", "Maximum resident set size (kbytes)": "maxrss_kb",
              "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall"}
    digests = set()
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in range(a.rounds):
        for mode in ("held", "pinned"):
            png = out_dir / f"heap-{mode}-{r}.png"
            cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "sdcli", "generate", "a lighthouse at dusk", "-m",
                   a.model, "-W", str(a.size), "-H", str(a.size), "--steps", str(a.steps), "--seed", "7",
                   "--dtype", a.dtype, "--threads", str(a.threads), "--device", "cpu", "-o", str(png),
                   "--overwrite", "-q"]  # fmt: skip
            env = dict(os.environ, SDCLI_SAMPLING_HEAP="1" if mode == "held" else "0")
            res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"sdcli generate failed ({mode}):\n{res.stderr[-3000:]}")
            got = {}
            for line in res.stderr.splitlines():
                key, _, value = line.strip().rpartition(": ")
                if key in fields:
                    got[fields[key]] = value
            digest = hashlib.sha256(png.read_bytes()).hexdigest()[:16]
            digests.add(digest)
            minflt = int(got["minflt"])
            print(f"round {r} {mode:6}: {minflt:8d} minor faults ({minflt * 4096 / 1e9:.2f} GB), user "
                  f"{float(got['user']):7.2f} s, sys {float(got['sys']):6.2f} s, max RSS "
                  f"{int(got['maxrss_kb']) / 1e6:.2f} GB, wall {got['wall']} (under load), PNG {digest}", flush=True)
    print("PNG files:", "identical" if len(digests) == 1 else f"DIFFER {sorted(digests)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".bench" / "sd15-full-fp16.safetensors"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=2, help="measured calls per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--render", action="store_true", help="whole `sdcli generate` processes instead of UNet calls")
    p.add_argument("--steps", type=int, default=4, help="--render: sampling steps")
    p.add_argument("--dtype", default="fp32", help="--render: the render's --dtype")
    p.add_argument("--out-dir", default="/tmp/sdcli-bench-heap", help="--render: where the PNG files go")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.render:
        return render(a)
    args = [sys.executable, __file__, "--child", "--model", a.model, "--size", str(a.size),
            "--threads", str(a.threads), "--calls", str(a.calls)]
    digests = set()
    for r in range(a.rounds):
        for mode in ("held", "pinned"):
            env = dict(os.environ, SDCLI_SAMPLING_HEAP="1" if mode == "held" else "0")
            res = json.loads(subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout)
            digests.add(res["sha256"])
            for i, c in enumerate(res["calls"]):
                print(f"round {r} {mode:6} call {i}{' (warm-up)' if i == 0 else ''}: {c['minflt']:7d} minor faults "
                      f"({c['minflt'] * 4096 / 1e9:.2f} GB), user {c['user']:6.2f} s, sys {c['sys']:5.2f} s, "
                      f"RSS {c['rss_gb']:.2f} GB", flush=True)
            print(f"round {r} {mode:6} sampling peak RSS {res['peak_gb']:.2f} GB, after the stage "
                  f"{res['after_gb']:.2f} GB, output {res['sha256']}", flush=True)
    print("outputs:", "identical" if len(digests) == 1 else f"DIFFER {sorted(digests)}")


if __name__ == "__main__":
    main()
