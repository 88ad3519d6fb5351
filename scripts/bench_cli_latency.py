"""How long the cheap answers take (issue 30, item 5): each command in a fresh `python -m sdcli` process, the
median wall time of --repeat runs, next to `python -c "import torch"` (what they no longer wait for) and a full
tiny render (what does). A cheap answer is a usage error (no model, output exists, unknown sampler/schedule),
`--sampler help` or `inspect IMAGE`.

    python scripts/bench_cli_latency.py [--repeat 5] [--model FILE]   # default: a tiny random checkpoint

Prints one line per command: median and min seconds, exit code, and whether torch was imported."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PROBE = ("import sys; from sdcli.cli import main; sys.argv = ['sdcli', *sys.argv[1:]]\n"
          "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
          "sys.stderr.write(f\"\\nTORCH={'torch' in sys.modules}\\n\"); sys.exit(code)")


def timed(args: list[str], cwd: Path, code: str = _PROBE) -> tuple[float, int, bool]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CONFIG_HOME=str(cwd / "xdg"), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode, "TORCH=True" in proc.stderr


def cases(model: str) -> dict[str, list[str]]:
    fast = ["--steps", "1", "-W", "64", "-H", "64", "--dtype", "fp32", "--device", "cpu"]
    return {
        "no model given": ["generate", "a cat"],
        "output exists": ["generate", "a cat", "-m", model, "-o", "made.png"],
        "unknown --sampler": ["generate", "a cat", "-m", model, "--sampler", "eulr"],
        "unknown --schedule": ["generate", "a cat", "-m", model, "--schedule", "kars"],
        "--sampler help": ["generate", "a cat", "--sampler", "help"],
        "inspect IMAGE": ["inspect", "made.png"],
        "tiny render (reference)": ["generate", "a cat", "-m", model, *fast, "-o", "again.png", "--overwrite"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", help="checkpoint for the cases that need one (default: a tiny random one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "scripts"))
            from make_checkpoint import make_checkpoint

            model = str(cwd / "tiny.safetensors")
            make_checkpoint(Path(model), size="tiny", seed=0, family="sd1", layout="single")
        fast = ["--steps", "1", "-W", "64", "-H", "64", "--dtype", "fp32", "--device", "cpu"]
        timed(["generate", "a cat", "-m", model, *fast, "-o", "made.png"], cwd)
        print(f"{'command':28} {'median s':>9} {'min s':>7}  exit  torch")
        times = [timed([], cwd, "import torch")[0] for _ in range(args.repeat)]
        print(f"{'import torch (baseline)':28} {statistics.median(times):9.3f} {min(times):7.3f}     0  True")
        for name, argv in cases(model).items():
            runs = [timed(argv, cwd) for _ in range(args.repeat)]
            walls = [r[0] for r in runs]
            print(f"{name:28} {statistics.median(walls):9.3f} {min(walls):7.3f}  {runs[0][1]:4}  {runs[0][2]}")


if __name__ == "__main__":
    main()
