"""scripts/bench_peers.py and scripts/bench_attention.py: the command lines parse, and the step reports of each peer's
output are read as the benchmark expects (the benchmarks themselves are run by hand: docs/benchmarks.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_peers  # noqa: E402


@pytest.mark.parametrize("script", ["bench_peers.py", "bench_attention.py"])
def test_help_runs(script):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_defaults_and_rehearse():
    a = bench_peers.parse_args([])
    assert (a.peers, a.steps, a.runs, a.threads, a.size, a.sdcpp_type, a.write) == (
        ("sdcli", "openvino", "sdcpp"), 4, 2, 2, 512, "auto", False)
    r = bench_peers.parse_args(["--rehearse", "--write", "--threads", "1"])
    assert (r.size, r.steps, r.runs, r.threads, r.write) == (64, 2, 1, 1, False)  # a rehearsal never writes docs


def test_peer_list():
    assert bench_peers.parse_args(["--peers", "sdcpp, sdcli,sdcpp"]).peers == ("sdcpp", "sdcli")


@pytest.mark.parametrize("argv", [["--peers", "diffusers"], ["--peers", ","], ["--steps", "1"], ["--size", "500"],
                                  ["--runs", "0"], ["--sdcpp-type", "q4_0"]])  # fmt: skip
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_peers.parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_step_reports():
    step = bench_peers.step_of
    assert step("sdcli", '{"event": "step", "seeds": [1], "step": 3, "total": 4, "elapsed_s": 1.2}', 4) == 3
    assert step("sdcli", '{"event": "done"}', 4) is None
    assert step("sdcli", "loading x.safetensors (cpu, fp32)", 4) is None
    assert step("openvino", "STEP 2", 4) == 2
    assert step("openvino", 'NOTE {"compile_s": 1.0}', 4) is None
    # sd-cli's progress bar (src/util.cpp print_progress_line): sampling in s/it or it/s; the total must be the steps
    assert step("sdcpp", "|==================>               | 2/4 - 21.53s/it", 4) == 2
    assert step("sdcpp", "|==================================| 4/4 - 1.25it/s", 4) == 4
    assert step("sdcpp", "|=====>     | 120/1130 - 512.00MB/s", 4) is None
    assert step("sdcpp", "|=====>     | 3/9 - 2.00s/it", 4) is None


def test_per_step_skips_the_first_step():
    r = bench_peers.RunResult("x", wall=20.0, cpu=30.0, rss=1.0, marks=[(1, 5.0, 8.0), (2, 7.0, 12.0), (3, 9.5, 17.0)])
    assert r.per_step() == (2.25, 4.5)


def test_proc_cpu_seconds_of_this_process():
    before = bench_peers.proc_cpu_seconds(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.05:
        pass
    assert bench_peers.proc_cpu_seconds(os.getpid()) >= before


def test_run_once_times_a_progress_bar_step_when_it_is_drawn(tmp_path):
    """sd-cli redraws its bar after a \\r and ends the line only at the next step: each step is timed when its bar
    appears, not one step late; peak RSS and CPU time come back from wait4."""
    fake = ("import sys, time\n"
            "for i in (1, 2, 3):\n"
            "    sys.stdout.write(f'\\r|====| {i}/3 - 0.30s/it\\033[K' + ('\\n' if i == 3 else ''))\n"
            "    sys.stdout.flush()\n"
            "    time.sleep(0.3)\n")  # fmt: skip
    r = bench_peers.run_once("sdcpp", [sys.executable, "-c", fake], 3, tmp_path / "log.txt", dict(os.environ))
    assert [m[0] for m in r.marks] == [1, 2, 3]
    wall, _ = r.per_step()
    assert 0.2 < wall < 1.5, r.marks
    assert r.rss > 0 and r.wall >= 0.9
    assert "3/3" in (tmp_path / "log.txt").read_text()


def test_run_once_reports_a_failing_peer(tmp_path):
    with pytest.raises(SystemExit, match="exit 3"):
        bench_peers.run_once("sdcli", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 2,
                             tmp_path / "log.txt", dict(os.environ))  # fmt: skip
