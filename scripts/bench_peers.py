"""sdcli against what CPU users pick instead: OpenVINO (through optimum-intel) and stable-diffusion.cpp.

    make bench-peers                                  # installs the peers under .bench/ once, then the full run
    python scripts/bench_peers.py --prepare           # only the one-time work: checkpoint, diffusers folder, OV export
    python scripts/bench_peers.py                     # 512x512, 4 steps timed, 2 interleaved runs, 2 threads
    python scripts/bench_peers.py --threads 1 --write # one thread each; the table into docs/benchmarks.md
    python scripts/bench_peers.py --rehearse          # tiny shapes end to end (~3-6 min; see below)

The same random SD1.5-shaped weights for all three (scripts/bench.py's fp16 checkpoint: the .safetensors file for
sdcli and stable-diffusion.cpp, a diffusers folder converted from it and exported to OpenVINO IR for optimum-intel),
the same prompt and negative prompt, 512x512, CFG 7, euler over the same k-diffusion sigmas, the same initial noise
(A1111's NV/Philox noise of the seed: sdcli `--rng nv`, stable-diffusion.cpp's default `--rng cuda`, and for OpenVINO
the same tensor passed as `latents`). So the three compute nearly the same image, and the table says how nearly.

Each peer is one cold process per image, as a user runs it: `sdcli generate`, stable-diffusion.cpp's `sd-cli`, and a
small optimum-intel script (static shape: `reshape` to batch 1 at the image size, then `compile`, as FastSD CPU
does; the precision is OpenVINO's default for the CPU: bf16 where it has AVX512-BF16/AMX, else fp32). This script
reads each process's output as it comes: at every sampling step (sdcli's JSON step events, the optimum script's
step callback, sd-cli's progress bar) it notes the wall clock and the process's CPU time (/proc/PID/stat). Per CFG
step = the mean over steps 2..N (step 1 carries first-call costs); the whole image = the cold process's wall time,
plus (20 - N) steps when fewer than 20 were run (labelled "extrapolated"). Peak RSS comes from os.wait4.
The peers run interleaved (sdcli, OpenVINO, sd.cpp, sdcli, ...), and each cell is the better of the runs.

Quality guard: sdcli's image in its default dtype against its fp32 image (PSNR, 8-bit PNGs), and each peer's image
against sdcli's fp32 image (mean and max absolute difference in levels of 255).

--rehearse: 64x64, 2 steps, one run. sdcli and OpenVINO take the tiny random SD1 model; stable-diffusion.cpp
cannot (its UNet, VAE and CLIP shapes are fixed per model version, not read from the file), so it rehearses on the
full-size SD1.5 checkpoint at 64x64, its smallest useful size, against sdcli fp32 on that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
WORK = BENCH / "peers"
OV_PYTHON = BENCH / "openvino-venv" / "bin" / "python"
SD_CLI = BENCH / "sdcpp" / "sd-cli"
TINY_CKPT = BENCH / "tiny-sd1-fp16.safetensors"
PEERS = ("sdcli", "openvino", "sdcpp")
TITLES = {"sdcli": "sdcli", "openvino": "OpenVINO (optimum-intel)", "sdcpp": "stable-diffusion.cpp (sd-cli)"}
SDCPP_TYPES = ("auto", "f32", "f16", "q8_0")
WHOLE_STEPS = 20  # the whole image the table reports: a 20-step image

sys.path.insert(0, str(ROOT / "scripts"))
from bench import NEGATIVE, PROMPT, SEED  # noqa: E402 - scripts/bench.py: the same prompt and seed everywhere


# ----------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Install the peers first: `make bench-peers-install` (or `make bench-peers`).")
    p.add_argument("--peers", default=",".join(PEERS), type=peer_list,
                   help="comma-separated subset of sdcli,openvino,sdcpp (default: all three)")
    p.add_argument("--steps", type=int, default=4,
                   help="sampling steps timed per image (>= 2; default 4: the 20-step image is extrapolated)")
    p.add_argument("--runs", type=int, default=2, help="interleaved runs of each peer; the better is kept (default 2)")
    p.add_argument("--threads", type=int, default=2, help="threads for every peer (default 2; try 1)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--sdcpp-type", choices=SDCPP_TYPES, default="auto",
                   help="stable-diffusion.cpp weight type; auto: f32 where sdcli runs fp32, f16 where it runs bf16 "
                        "(the best type not lossier than sdcli's)")
    p.add_argument("--sdcpp-args", default="", help="extra sd-cli arguments, e.g. '--diffusion-fa' (quoted)")
    p.add_argument("--prepare", action="store_true",
                   help="only the one-time work (checkpoint, diffusers folder, OpenVINO export), then stop")
    p.add_argument("--rehearse", action="store_true",
                   help="tiny shapes, 2 steps, 1 run: checks the script end to end (implies no --write)")
    p.add_argument("--write", action="store_true", help="put the table into docs/benchmarks.md")
    a = p.parse_args(argv)
    if a.rehearse:
        a.size, a.steps, a.runs, a.write = 64, 2, 1, False
    if a.steps < 2:
        p.error("--steps must be at least 2 (the step time is taken over steps 2..N)")
    if a.runs < 1 or a.threads < 1 or a.size < 64 or a.size % 64:
        p.error("--runs and --threads must be >= 1, --size a multiple of 64")
    return a


def peer_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [n for n in names if n not in PEERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown peer(s) {', '.join(bad) or '(none)'}; choose from {', '.join(PEERS)}")
    return names


# ----------------------------------------------------------------------------------------------- preparation
@dataclass(frozen=True)
class Model:
    """One random checkpoint in the three forms the peers read."""

    name: str  # "sd15" or "tiny"
    ckpt: Path  # the single .safetensors file (sdcli, sd.cpp)

    @property
    def diffusers(self) -> Path:
        return WORK / f"diffusers-{self.name}"

    @property
    def openvino(self) -> Path:
        return WORK / f"openvino-{self.name}"


def models_for(a) -> dict[str, Model]:
    """Which checkpoint each peer runs: the full SD1.5 shapes, or in a rehearsal the tiny model where the peer
    takes one (sd.cpp does not: its network shapes are fixed per SD version)."""
    from bench import ensure_checkpoint

    def full() -> Model:
        return Model("sd15", ensure_checkpoint())  # scripts/bench.py's checkpoint, made once

    if not a.rehearse:
        return {p: full() for p in a.peers}
    if not TINY_CKPT.exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(TINY_CKPT), "--family",
                        "sd1", "--size", "tiny", "--dtype", "fp16", "--seed", "0"], check=True, cwd=ROOT)
    return {p: full() if p == "sdcpp" else Model("tiny", TINY_CKPT) for p in a.peers}


def check_installed(peers) -> None:
    missing = [f"{p} ({path})" for p, path in (("openvino", OV_PYTHON), ("sdcpp", SD_CLI))
               if p in peers and not path.exists()]
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}. Run `make bench-peers-install` (or "
                         "scripts/setup_bench_peers.sh), or leave them out with --peers")


def write_diffusers_folder(model: Model) -> Path:
    """The single file converted to a diffusers folder (sdcli's rename table, scripts/make_checkpoint.py), with a
    CLIP tokenizer written from sdcli's own vocabulary: what optimum-intel exports from."""
    out = model.diffusers
    if (out / "model_index.json").exists():
        return out
    from safetensors.torch import load_file

    from make_checkpoint import to_diffusers, write_diffusers

    print(f"  converting {model.ckpt.name} to a diffusers folder ...", file=sys.stderr, flush=True)
    size = "tiny" if model.name == "tiny" else "full"
    tmp = out.with_name(out.name + ".tmp")
    comps = to_diffusers(load_file(str(model.ckpt)), "sd1", size)
    # the published SD1.5 folders keep CLIPTextModel's `text_model.` level in the file (transformers releases before
    # 5.2x, as optimum-intel pins, load nothing without it and silently initialise the encoder at random)
    comps["text_encoder"] = {f"text_model.{k}": t for k, t in comps["text_encoder"].items()}
    write_diffusers(tmp, comps, "sd1", size, None)
    write_clip_tokenizer(tmp / "tokenizer")
    tmp.rename(out)
    return out


def write_clip_tokenizer(out: Path) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer from sdcli/data's BPE file (as tests/_fixtures_pipeline
    does), with SD1.5's tokenizer settings: 77 tokens, padded with <|endoftext|>."""
    import gzip
    from importlib import resources

    from sdcli.text.clip_tokenizer import N_MERGES, VOCAB_FILE, _bytes_to_unicode

    lines = gzip.decompress(resources.files("sdcli").joinpath("data", VOCAB_FILE).read_bytes()).decode().split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is the "#version" header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                      "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    eot = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": eot, "unk_token": eot, "pad_token": eot, "do_lower_case": True}))  # fmt: skip


def export_openvino(model: Model) -> Path:
    """optimum-intel's export of the diffusers folder to OpenVINO IR (once; minutes at full size). The CPU plugin
    computes in its own default precision whatever the IR holds."""
    out = model.openvino
    if (out / "model_index.json").exists():
        return out
    src = write_diffusers_folder(model)
    print(f"  exporting {src.name} to OpenVINO IR (once) ...", file=sys.stderr, flush=True)
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([str(OV_PYTHON), __file__, "--worker", "openvino-export", "--src", str(src), "--out", str(tmp)],
                   check=True, cwd=ROOT)
    tmp.rename(out)
    return out


def initial_noise(size: int) -> Path:
    """The seed's first NV (Philox) draw at the latent shape, as sdcli `--rng nv` and sd.cpp `--rng cuda` draw
    it, saved for the OpenVINO worker (which takes it as `latents`)."""
    import numpy as np

    from sdcli.sampling.rng import ImageNoise

    path = WORK / f"noise-nv-{SEED}-{size}.npy"
    if not path.exists():
        np.save(path, ImageNoise((4, size // 8, size // 8), [SEED], "nv")().numpy())
    return path


def euler_sigmas(steps: int) -> list[float]:
    """sdcli's euler sigmas (k-diffusion's "normal" schedule over SD's training sigmas, ending with 0): handed to
    diffusers' EulerDiscreteScheduler so OpenVINO steps through the same noise levels."""
    from sdcli import pipeline

    return [float(s) for s in pipeline.make_plan("euler", "auto", steps, cfg=7.0).sigmas]


# ----------------------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    peer: str
    wall: float  # whole process, s
    cpu: float  # whole process CPU s (user + system, from wait4)
    rss: float  # peak RSS, GB (KiB / 1e6, as scripts/bench.py)
    marks: list[tuple[int, float, float]] = field(default_factory=list)  # (step, wall since start, CPU s)
    notes: dict = field(default_factory=dict)  # what the peer said about itself (precision, compile time, ...)
    png: str = ""

    def per_step(self) -> tuple[float, float]:
        """Mean wall and CPU seconds of steps 2..N (step 1 carries first-call costs)."""
        first, last = self.marks[0], self.marks[-1]
        n = last[0] - first[0]
        return (last[1] - first[1]) / n, (last[2] - first[2]) / n


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of all the process's threads so far, from /proc/PID/stat (fields 14 and 15)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


OV_STEP = re.compile(r"STEP (\d+)$")
SDCPP_STEP = re.compile(r"(\d+)/(\d+) - [\d.]+(?:s/it|it/s)")


def step_of(peer: str, line: str, steps: int) -> int | None:
    """The step number a line of the peer's output announces, or None."""
    if peer == "sdcli" and line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        return int(event["step"]) if event.get("event") == "step" else None
    if peer == "openvino":
        m = OV_STEP.search(line)  # after a progress bar's \r too
        return int(m.group(1)) if m else None
    if peer == "sdcpp":
        m = SDCPP_STEP.search(line)
        if m and int(m.group(2)) == steps:  # the sampling bar (loading bars count bytes, not steps)
            return int(m.group(1))
    return None


def run_once(peer: str, cmd: list[str], steps: int, log: Path, env: dict) -> RunResult:
    """Run one cold process; note wall and CPU time at each step it announces; peak RSS and CPU from wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env=env)
    marks, notes, buf, text = [], {}, b"", []
    fd = proc.stdout.fileno()
    while chunk := os.read(fd, 65536):
        now, cpu = time.perf_counter() - t0, proc_cpu_seconds(proc.pid)
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        # a progress bar redraws its line after a \r and ends it only at the next one: read the unfinished line too
        for raw, done in [(raw, True) for raw in lines] + [(buf, False)]:
            line = raw.decode(errors="replace").strip()
            step = step_of(peer, line, steps)
            if step is not None and (not marks or step > marks[-1][0]):
                marks.append((step, now, cpu))
            if done:
                text.append(line)
                if line.startswith("NOTE "):
                    notes.update(json.loads(line[5:]))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log.write_text("\n".join(line for line in text if line) + "\n")
    if proc.returncode != 0:
        raise SystemExit(f"{peer} failed (exit {proc.returncode}); its output: {log}\n" + "\n".join(text[-15:]))
    if len(marks) < 2 or marks[-1][0] != steps:
        raise SystemExit(f"{peer}: saw steps {[m[0] for m in marks]} of {steps} in its output ({log})")
    return RunResult(peer, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6, marks, notes)


def command(peer: str, model: Model, a, dtype: str, png: Path) -> list[str]:
    size, steps = str(a.size), str(a.steps)
    if peer == "sdcli":  # the real CLI, from this checkout
        return [sys.executable, "-m", "sdcli", "generate", PROMPT, "--negative", NEGATIVE, "--model", str(model.ckpt),
                "-W", size, "-H", size, "--steps", steps, "--cfg", "7", "--sampler", "euler", "--seed", str(SEED),
                "--rng", "nv", "--dtype", dtype, "--progress", "json", "-o", str(png), "--overwrite"]  # fmt: skip
    if peer == "openvino":
        return [str(OV_PYTHON), __file__, "--worker", "openvino-run", "--src", str(model.openvino), "--out", str(png),
                "--size", size, "--threads", str(a.threads), "--noise", str(initial_noise(a.size)),
                "--sigmas", ",".join(repr(s) for s in euler_sigmas(a.steps))]  # fmt: skip
    return [str(SD_CLI), "-m", str(model.ckpt), "-p", PROMPT, "-n", NEGATIVE, "-W", size, "-H", size,
            "--steps", steps, "--cfg-scale", "7", "--sampling-method", "euler", "--scheduler", "discrete",
            "--seed", str(SEED), "--rng", "cuda", "-t", str(a.threads), "--type", a.sdcpp_type_used,
            "-o", str(png), *shlex.split(a.sdcpp_args)]  # fmt: skip


# ----------------------------------------------------------------------------------------------- the run
def collect(a) -> dict:
    from sdcli.runtime.device import auto_dtype

    check_installed(a.peers)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    models = models_for(a)
    default = auto_dtype("cpu")  # what `sdcli generate` runs here: bf16 with AVX512-BF16/AMX, else fp32
    a.sdcpp_type_used = a.sdcpp_type if a.sdcpp_type != "auto" else ("f32" if default == "fp32" else "f16")
    if "openvino" in a.peers:
        export_openvino(models["openvino"])
    if a.prepare:
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    jobs = [(p, default) for p in a.peers]
    # the fp32 references: sdcli fp32 on every model a peer runs (its default run already is one where fp32 is default)
    refs = {m.name: m for m in models.values()}
    for name, m in refs.items():
        if default != "fp32" or models.get("sdcli") != m:
            jobs.append((f"sdcli-fp32-{name}", "fp32"))
    runs: dict[str, list[RunResult]] = {}
    for k in range(a.runs):
        for job, dtype in jobs:
            peer = "sdcli" if job.startswith("sdcli") else job
            model = refs[job.rsplit("-", 1)[1]] if job.startswith("sdcli-fp32-") else models[peer]
            if job.startswith("sdcli-fp32-") and k > 0:
                continue  # a reference image, not a timing: once is enough
            png = WORK / f"{job}-{model.name}-{a.size}-{k}.png"
            print(f"  run {k + 1}/{a.runs}: {job} ({dtype}, {model.name}, {a.size}px, {a.steps} steps, "
                  f"{a.threads} threads) ...", file=sys.stderr, flush=True)
            res = run_once(peer, command(peer, model, a, dtype, png), a.steps, WORK / "logs" / f"{job}-{k}.log", env)
            res.png, res.notes["model"], res.notes["dtype"] = str(png), model.name, dtype
            runs.setdefault(job, []).append(res)
    return {"runs": runs, "default": default, "models": {p: m.name for p, m in models.items()}}


def reference_png(r: dict, model: str) -> str:
    """sdcli's fp32 image on `model`: the default run when that is fp32 on the same model, else the reference run."""
    key = f"sdcli-fp32-{model}"
    if key in r["runs"]:
        return r["runs"][key][0].png
    return r["runs"]["sdcli"][0].png


def image_diff(png_a: str, png_b: str) -> tuple[float, int, float]:
    """(mean |a - b|, max |a - b|) in levels of 255, and PSNR in dB, over two 8-bit RGB images."""
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(png_a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(png_b).convert("RGB"), dtype=np.float64)
    d = np.abs(x - y)
    mse = float((d**2).mean())
    return float(d.mean()), int(d.max()), float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def summarize(a, r: dict) -> list[dict]:
    """One row per timed job: the better of its runs in each column, and its image against sdcli fp32."""
    rows = []
    for job, results in r["runs"].items():
        steps = [res.per_step() for res in results]
        best = {
            "job": job, "peer": results[0].peer, "dtype": results[0].notes["dtype"], "model": results[0].notes["model"],
            "step": min(s[0] for s in steps), "cpu_step": min(s[1] for s in steps),
            "wall": min(res.wall for res in results), "cpu": min(res.cpu for res in results),
            "rss": min(res.rss for res in results), "runs": len(results), "notes": results[0].notes,
        }  # fmt: skip
        best["fixed"] = min(res.wall - a.steps * res.per_step()[0] for res in results)
        best["whole"] = best["wall"] + max(0, WHOLE_STEPS - a.steps) * best["step"]
        best["diff"] = image_diff(results[0].png, reference_png(r, best["model"]))
        rows.append(best)
    return rows


def render(a, r: dict, rows: list[dict]) -> str:
    sd = next((x for x in rows if x["job"] == "sdcli"), None)
    base = {x["model"]: x for x in rows if x["job"].startswith("sdcli-fp32-")}
    base.update({x["model"]: x for x in rows if x["job"] == "sdcli"})  # sdcli in its default dtype, where it ran
    n = f"{WHOLE_STEPS}-step image" + (" (extrapolated)" if a.steps < WHOLE_STEPS else "")
    head = ["peer", "weights / compute", "per CFG step", "CPU s per step", f"whole {n}, cold process",
            "fixed: load, compile, text, VAE", "peak RSS", "step time / sdcli's", "image vs sdcli fp32 (mean / max levels)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        mean, mx, _ = x["diff"]
        ref = base.get(x["model"])
        vs = f"{x['step'] / ref['step']:.2f}x" if ref else "n/a"
        lines.append(f"| {label(x, a)} | {precision(x, a)} | {x['step']:.2f} s | {x['cpu_step']:.2f} s | "
                     f"{x['whole']:.1f} s | {x['fixed']:.1f} s | {x['rss']:.2f} GB | {vs} | {mean:.2f} / {mx} |")
    notes = [f"{a.size}x{a.size}, CFG 7, euler, same prompt, seed and initial noise; {a.steps} steps timed per image, "
             f"{a.threads} thread(s) each; {a.runs} interleaved run(s) of each, every cell the better of them. "
             "Per CFG step: mean of steps 2..N from each process's own step reports (wall; CPU time from /proc). "
             "Whole image: the cold process's wall time" +
             (f" + {WHOLE_STEPS - a.steps} x the step time" if a.steps < WHOLE_STEPS else "") +
             "; fixed = that wall time less the steps. Peak RSS: os.wait4 (GB = 10^6 KiB, as the other tables). "
             "\"step time / sdcli's\" above 1: sdcli is faster per step."]  # fmt: skip
    if sd is not None:
        notes.append(guard_note(a, r, rows, sd))
    if a.rehearse:
        notes.append("REHEARSAL: tiny shapes, the timings mean nothing." + (
            " stable-diffusion.cpp ran the full-size SD1.5 checkpoint at 64x64 (it cannot load the tiny model: its "
            "network shapes are fixed per SD version), compared with sdcli fp32 on that checkpoint."
            if "sdcpp" in a.peers else ""))
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"


def label(x: dict, a) -> str:
    if x["job"].startswith("sdcli-fp32-"):
        return f"sdcli fp32 (reference{', ' + x['model'] + ' model' if a.rehearse else ''})"
    return TITLES[x["peer"]] + (f" ({x['model']} model)" if a.rehearse else "")


def precision(x: dict, a) -> str:
    notes = x["notes"]
    if x["peer"] == "sdcli":
        return f"fp16 file, {x['dtype']}"
    if x["peer"] == "openvino":
        return (f"fp32 IR, {notes.get('precision', '?')} (OpenVINO {notes.get('version', '?')} default), static "
                f"{a.size}x{a.size}, compile {notes.get('compile_s', float('nan')):.1f} s")
    extra = f", `{a.sdcpp_args}`" if a.sdcpp_args else ""
    return f"fp16 file, --type {a.sdcpp_type_used}{extra}"


def guard_note(a, r: dict, rows: list[dict], sd: dict) -> str:
    if r["default"] == "fp32":
        head = "Quality guard: sdcli's default dtype on this CPU is fp32, so default vs fp32 is the same image (inf dB)"
    else:
        _, _, db = image_diff(r["runs"]["sdcli"][0].png, reference_png(r, sd["model"]))
        head = f"Quality guard: sdcli {r['default']} vs sdcli fp32, same seed: PSNR {db:.1f} dB (8-bit PNGs)"
    return (head + "; the last column compares each image with sdcli's fp32 image of the same seed and model "
            "(mean / max absolute difference in 8-bit levels): the peers compute nearly the same image.")


# ----------------------------------------------------------------------------------------------- workers (peer side)
def worker_main(argv: list[str]) -> None:
    """Runs inside the OpenVINO venv (only optimum-intel, diffusers, torch there: no sdcli import)."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["openvino-export", "openvino-run"])
    p.add_argument("--src")
    p.add_argument("--out")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--noise")
    p.add_argument("--sigmas")
    a = p.parse_args(argv)
    if a.worker == "openvino-export":
        ov_export(a.src, a.out)
    else:
        ov_run(a)


def ov_export(src: str, out: str) -> None:
    """optimum-cli export openvino, as a user runs it. fp32 weights: optimum's default for a model under 1B parameters
    per part (SD1.5's UNet has 0.86B); `fp16` would also round every other float constant of the graph to fp16 (the
    timestep embedding's frequencies among them), and above 1B the default is int8 weights."""
    cli = Path(sys.executable).with_name("optimum-cli")
    subprocess.run([str(cli), "export", "openvino", "--model", src, "--task", "text-to-image", "--weight-format",
                    "fp32", out], check=True)  # fmt: skip


def note(**kw) -> None:
    print("NOTE " + json.dumps(kw), flush=True)


def ov_run(a) -> None:
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler
    from optimum.intel import OVStableDiffusionPipeline
    from PIL import Image

    torch.set_num_threads(a.threads)  # the scheduler's and the pipeline's own torch ops
    pipe = OVStableDiffusionPipeline.from_pretrained(a.src, compile=False,
                                                     ov_config={"INFERENCE_NUM_THREADS": str(a.threads)})
    # k-diffusion's euler: x = noise * sigma_0 (diffusers' "linspace" spacing scales the latents by sigma_max)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    pipe.reshape(batch_size=1, height=a.size, width=a.size, num_images_per_prompt=1)  # static shape (FastSD CPU)
    pipe.compile()
    note(compile_s=time.perf_counter() - t0, precision=ov_precision(pipe), version=ov_version())

    def on_step(_pipe, i, _t, kwargs):
        print(f"STEP {i + 1}", flush=True)
        return kwargs

    sigmas = [float(s) for s in a.sigmas.split(",")]
    out = pipe(PROMPT, negative_prompt=NEGATIVE, height=a.size, width=a.size, guidance_scale=7.0, sigmas=sigmas,
               latents=torch.from_numpy(np.load(a.noise)), output_type="np", callback_on_step_end=on_step)
    Image.fromarray((out.images[0] * 255).round().astype("uint8")).save(a.out)


def ov_precision(pipe) -> str:
    """The UNet's compiled INFERENCE_PRECISION_HINT: what the CPU plugin computes in (optimum-intel keeps the
    CompiledModel as `request`)."""
    try:
        hint = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type
        return hint.to_string() if hasattr(hint, "to_string") else str(hint)
    except Exception:  # noqa: BLE001 - a report, not a check: optimum's attribute names move between releases
        return "?"


def ov_version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    r = collect(a)
    if a.prepare:
        print("prepared", file=sys.stderr)
        return
    rows = summarize(a, r)
    table = render(a, r, rows)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    (WORK / f"results-{a.size}-{a.threads}t.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(a).items()}, "rows": rows}, indent=1, default=str))
    if a.write:
        from bench import machine, write_section

        write_section(f"bench-peers-{a.threads}t",
                      f"## sdcli vs OpenVINO and stable-diffusion.cpp, {a.threads} thread(s)\n\n"
                      f"Machine: {machine()}\n\n{table}")


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_main(sys.argv[1:])
    else:
        main()
