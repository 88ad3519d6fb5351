"""A shell loop of 20 prompts rendered three ways, wall time each: a cold `sdcli generate` per prompt, the same loop
with `--server` (one warm `sdcli serve`), and one `sdcli generate --prompts-file`; then the server's own overhead
per request (HTTP round trip minus the render, measured with A1111's /sdapi/v1/txt2img).

    python scripts/bench_serve.py                          # tiny random SD1 model, 64x64, 4 steps (a rehearsal)
    python scripts/bench_serve.py --model sd15.safetensors --size 512 --steps 20 --write
    python scripts/bench_serve.py --model sd15.safetensors --device cuda --dtype fp16 --write   # on a GPU

Every command is a fresh process, as a shell loop runs it; the server's start (its model load) is timed apart and
counted in the --server total. The three ways write the same files (prompt i uses seed 1000+i), checked byte for
byte at the end. The server binds 127.0.0.1 on a free port and is stopped at the end. `--write` puts the table into
docs/benchmarks.md between the bench-serve markers.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- bench-serve:start -->", "<!-- bench-serve:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint (default: a tiny random SD1 made here)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="pixels per side (default 64 tiny, 512 otherwise)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 4 tiny, 20 otherwise)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--requests", type=int, default=20, help="A1111 requests for the overhead measurement")
    ap.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    args = ap.parse_args()
    size = args.size or (512 if args.model else 64)
    steps = args.steps or (20 if args.model else 4)
    with tempfile.TemporaryDirectory(prefix="sdcli-bench-serve-") as tmp:
        work = Path(tmp)
        model = args.model or _tiny_model(work)
        common = ["-m", str(model), "-W", str(size), "-H", str(size), "--steps", str(steps), "--dtype", args.dtype,
                  "--device", args.device, "--quiet"]
        prompts = [f"a picture of thing number {i}" for i in range(args.prompts)]
        cold = _loop(prompts, common, work / "cold", [])
        server = Server(["-m", str(model), "--dtype", args.dtype, "--device", args.device])
        try:
            warm = _loop(prompts, common, work / "warm", ["--server", server.url])
            overhead = _overhead(server, prompts[0], size, steps, args.requests)
        finally:
            server.stop()
        batch = _prompts_file(prompts, common, work / "file")
        same = _same(work, len(prompts))
    table = _table(args, model, size, steps, cold, server.start_s, warm, batch, overhead, same)
    print(table)
    if args.write:
        _write(table)


def _tiny_model(work: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_checkpoint import make_checkpoint

    out = work / "tiny-sd1.safetensors"
    make_checkpoint(out, family="sd1", size="tiny", seed=0)
    return out


def _sdcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdcli", *args]


def _loop(prompts: list[str], common: list[str], out: Path, extra: list[str]) -> float:
    """for each prompt: `sdcli generate PROMPT ... -o out/i.png` (a fresh process each); the total wall time."""
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        subprocess.run(_sdcli("generate", prompt, *common, "--seed", str(1000 + i), "-o", str(out / f"{i}.png"),
                              *extra), cwd=ROOT, check=True)
    return time.perf_counter() - started


def _prompts_file(prompts: list[str], common: list[str], out: Path) -> float:
    jobs = out.parent / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": p, "seed": 1000 + i}) + "\n" for i, p in enumerate(prompts)))
    started = time.perf_counter()
    subprocess.run(_sdcli("generate", "--prompts-file", str(jobs), *common, "-o", f"{out}/{{index}}.png"), cwd=ROOT,
                   check=True)
    return time.perf_counter() - started


def _same(work: Path, n: int) -> bool:
    return all((work / "cold" / f"{i}.png").read_bytes() == (work / way / f"{i}.png").read_bytes()
               for i in range(n) for way in ("warm", "file"))


class Server:
    """`sdcli serve --port 0` on 127.0.0.1; its start (process, imports, model load) timed until it listens."""

    def __init__(self, args: list[str]):
        started = time.perf_counter()
        self.proc = subprocess.Popen(_sdcli("serve", "--host", "127.0.0.1", "--port", "0", *args), cwd=ROOT,
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.port = None
        for line in self.proc.stderr:
            if "listening on http://127.0.0.1:" in line:
                self.port = int(line.split("127.0.0.1:")[1].split()[0])
                break
        if self.port is None:
            raise SystemExit("the server did not start")
        self.start_s = time.perf_counter() - started
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep it drained
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: dict) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _overhead(server: Server, prompt: str, size: int, steps: int, n: int) -> dict:
    """Per A1111 request: the round trip seen by the client minus the job's own time on the device (parsing,
    queueing, base64, JSON and HTTP); medians over `n` requests after one warm-up."""
    body = {"prompt": prompt, "seed": 1, "steps": steps, "width": size, "height": size}
    server.post("/sdapi/v1/txt2img", body)
    rounds, jobs = [], []
    for _ in range(n):
        started = time.perf_counter()
        info = json.loads(server.post("/sdapi/v1/txt2img", body)["info"])
        rounds.append(time.perf_counter() - started)
        jobs.append(info["job_finished"] - info["job_started"])
    png = base64.b64decode(server.post("/sdapi/v1/txt2img", body)["images"][0])
    return {"round_s": statistics.median(rounds), "job_s": statistics.median(jobs),
            "overhead_ms": statistics.median(r - j for r, j in zip(rounds, jobs)) * 1000, "png_kb": len(png) / 1024}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", load average %.1f at the end" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}"


def _table(args, model, size, steps, cold, start_s, warm, batch, overhead, same) -> str:
    n = args.prompts
    name = Path(model).name if args.model else "tiny random SD1 (scripts/make_checkpoint.py --size tiny)"
    rows = [("cold `sdcli generate` per prompt", cold, cold / n),
            ("`--server` per prompt (server start included)", warm + start_s, (warm + start_s) / n),
            ("`--server` per prompt (server already warm)", warm, warm / n),
            ("one `--prompts-file`", batch, batch / n)]
    lines = [START, f"## A shell loop of {n} prompts: cold, `--server`, one prompts file (`scripts/bench_serve.py`)",
             "", f"{name}, {size}x{size}, {steps} steps, dtype {args.dtype}, device {args.device}; {_machine()}; "
             f"{time.strftime('%Y-%m-%d')}. Files identical across the three ways: **{'yes' if same else 'NO'}**.",
             "", "| way | wall, total | per prompt |", "|---|---|---|"]
    lines += [f"| {label} | {total:.1f} s | {each:.2f} s |" for label, total, each in rows]
    lines += ["", f"Server start (process, imports, model load, until it listens): {start_s:.1f} s. Per A1111 "
              f"request ({args.requests} after a warm-up, medians): round trip {overhead['round_s'] * 1000:.0f} ms, "
              f"the job on the device {overhead['job_s'] * 1000:.0f} ms, so the server's own overhead (parse, queue, "
              f"base64 of a {overhead['png_kb']:.0f} KB PNG, JSON, HTTP) is **{overhead['overhead_ms']:.1f} ms**.",
              END]
    return "\n".join(lines)


def _write(table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + table + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    DOC.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
