"""sdcli vs diffusers on a CUDA GPU: the same SD1.5-shaped random checkpoint, the same shapes, in the same run.

    python scripts/bench_cuda.py --out DIR     # ~4 min on an H100/H200; writes DIR/results-cuda.json and a table

The peer is diffusers in fp16 (what its docs recommend on a GPU), each side in its own process. Besides speed it
checks what a GPU can get wrong: CUDA-graph replays against eager output, sdcli against diffusers, fp16 against
fp32, and CUDA against the CPU renders made here beforehand (`--make-refs`, carried along in .bench/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (BENCH, CKPT, PROMPT, ROOT, SEED, DiffusersSide, SdcliSide, ensure_checkpoint, fmt,  # noqa: E402
                   inputs, psnr, ratio, unet_gflop)  # fmt: skip

# BENCH_CUDA_DRY=1 runs the same code on the CPU at toy sizes: a rehearsal before spending device time
DRY = os.environ.get("BENCH_CUDA_DRY") == "1"
DEV = "cpu" if DRY else "cuda"
SIZE, STEPS = (64, 2) if DRY else (512, 20)
REPS, WARM = (2, 1) if DRY else (20, 3)  # timed and untimed UNet steps per variant
SIDES = [("sdcli", "fp16"), ("diffusers", "fp16"), ("sdcli", "fp32"), ("diffusers", "fp32"), ("sdcli", "bf16"),
         ("diffusers", "bf16")]  # fmt: skip
if DRY:
    SIDES = [s for s in SIDES if s[1] == "fp32"]
REFS = BENCH / "ref"  # CPU renders made by --make-refs, compared with the CUDA ones
TINY = BENCH / "tiny-sd1.safetensors"
TINY_ARGS = ["generate", "a red fox in the snow", "--model", str(TINY), "-W", "128", "-H", "128", "--steps", "8", "--seed", "7",
             "--overwrite", "-q"]  # fmt: skip
CLI_ARGS = ["generate", PROMPT, "--model", str(CKPT), "-W", str(SIZE), "-H", str(SIZE), "--steps", str(STEPS), "--seed",
            str(SEED), "--overwrite", "-q"]  # fmt: skip


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_memory() -> tuple[float, float]:
    """(allocated, reserved) GB at peak on the GPU; the process's peak RSS twice in a dry run."""
    import torch

    if DEV != "cuda":
        from bench import peak_rss_gb

        return peak_rss_gb(), peak_rss_gb()
    return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9


def sync_timed(fn, reps: int, warmup: int) -> tuple[float, object]:
    """Median wall time of `reps` calls, each waited for on the GPU, after `warmup` untimed calls."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------- one side
def run_worker(side_name: str, dtype_name: str, out: Path) -> dict:
    import torch

    from sdcli.runtime import cuda_graphs

    from sdcli.runtime import device

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    device.configure(device.Placement(DEV, dtype_name))  # fp32 means no TF32, for both sides alike
    sync()
    t0 = time.perf_counter()
    side = (SdcliSide if side_name == "sdcli" else DiffusersSide)(dtype, DEV)
    sync()
    res = {"load": time.perf_counter() - t0, "mem_load": peak_memory()[0]}
    res["text"], (cond, _) = sync_timed(side.text, 10, warmup=2)
    torch.save(cond.float().cpu(), out / f"text-{side_name}-{dtype_name}.pt")
    x, t, ctx, z = (v.to(DEV) for v in inputs(SIZE))
    x, ctx, z = x.to(dtype), ctx.to(dtype), z.to(dtype)
    res["unet"], eps = sync_timed(lambda: side.unet_step(x, t, ctx), REPS, warmup=WARM)
    torch.save(eps.cpu(), out / f"eps-{side_name}-{dtype_name}.pt")
    if side_name == "sdcli":
        res.update(sdcli_levers(side, x, t, ctx, eps, cuda_graphs))
    res["vae"], _ = sync_timed(lambda: side.decode(z), 5, warmup=1)
    if side_name == "sdcli":
        side.models.vae.to(memory_format=torch.channels_last)
        zc = z.contiguous(memory_format=torch.channels_last)
        res["vae_channels_last"], _ = sync_timed(lambda: side.decode(zc), 5, warmup=1)
        side.models.vae.to(memory_format=torch.contiguous_format)

    def image():
        return side.image(SIZE, STEPS).float().cpu()

    res["image"], img = sync_timed(image, 3, warmup=1)
    torch.save(img, out / f"image-{side_name}-{dtype_name}.pt")
    if side_name == "sdcli":  # the same render with graphs off: what the graphs are worth end to end
        os.environ["SDCLI_CUDA_GRAPHS"] = "0"
        res["image_eager"], img_eager = sync_timed(image, 3, warmup=1)
        res["image_graphs_vs_eager_maxdiff"] = (img - img_eager).abs().max().item()
        os.environ["SDCLI_CUDA_GRAPHS"] = "1"
    res["mem_peak"], res["mem_reserved"] = peak_memory()
    return res


def sdcli_levers(side, x, t, ctx, eps, cuda_graphs) -> dict:
    """UNet-step variants measured on the same inputs: CUDA graphs (sdcli's default on CUDA), channels_last."""
    import torch

    unet = side.models.unet
    res = {}
    with torch.inference_mode():
        graphed = cuda_graphs.graphed(unet)
        res["unet_graphs"], g_out = sync_timed(lambda: graphed(x, t, ctx).float(), REPS, warmup=WARM)
        res["graphs_error"] = graphed.error
        res["graphs_vs_eager_maxdiff"] = (g_out - eps).abs().max().item()
        cuda_graphs.forget(unet)
        unet.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        res["unet_channels_last"], c_out = sync_timed(lambda: unet(xc, t, ctx).float(), REPS, warmup=WARM)
        res["channels_last_rel"] = rel(c_out, eps)
        unet.to(memory_format=torch.contiguous_format)
    return res


def compile_worker(out: Path) -> dict:
    """torch.compile of the sdcli UNet (opt-in lever): compile time, step time, agreement with eager."""
    import torch

    dtype = torch.float32 if DRY else torch.float16
    side = SdcliSide(dtype, DEV)
    x, t, ctx, _ = (v.to(DEV) for v in inputs(SIZE))
    x, ctx = x.to(dtype), ctx.to(dtype)
    eager_t, eager = sync_timed(lambda: side.unet_step(x, t, ctx), 10, warmup=2)
    compiled = torch.compile(side.models.unet)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x, t, ctx)
        sync()
    res = {"compile_s": time.perf_counter() - t0, "eager": eager_t}
    with torch.inference_mode():
        res["compiled"], c_out = sync_timed(lambda: compiled(x, t, ctx).float(), REPS, warmup=WARM)
    res["compiled_rel"] = rel(c_out, eager)
    return res


# ----------------------------------------------------------------------------------------------- main side
def spawn(args: list[str], timeout: float) -> dict:
    print(f"  {' '.join(args)} ...", flush=True)
    try:
        out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "stderr": out.stderr[-4000:]}  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli(args: list[str], png: Path) -> float:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sdcli", *args, "-o", str(png)], capture_output=True, text=True,
                         cwd=ROOT)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"sdcli {' '.join(args[:2])}: exit {out.returncode}: {out.stderr.strip()[-500:]}")
    return time.perf_counter() - t


def png_psnr(a: Path, b: Path) -> dict:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return {"psnr": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse),
            "max_level_diff": int(np.abs(x - y).max())}  # fmt: skip


def cli_checks(out: Path) -> dict:
    """The real command on CUDA: cold time to first image, --help, and CUDA renders against the CPU's."""
    r = {}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdcli", "--help"], capture_output=True, check=True, cwd=ROOT)
    r["help"] = time.perf_counter() - t
    if not DRY:
        r["ttfi_fp16"] = cli(CLI_ARGS + ["--device", DEV], out / "full-cuda-fp16.png")
    r["ttfi_fp32"] = cli(CLI_ARGS + ["--device", DEV, "--dtype", "fp32"], out / "full-cuda-fp32.png")
    if not DRY and (REFS / "full-cpu-fp32.png").exists():  # the reference is 512px; a dry run renders 64px
        r["full_fp32_vs_cpu"] = png_psnr(out / "full-cuda-fp32.png", REFS / "full-cpu-fp32.png")
        if not DRY:
            r["full_fp16_vs_cpu"] = png_psnr(out / "full-cuda-fp16.png", REFS / "full-cpu-fp32.png")
    for dt in ("fp32",) if DRY else ("fp32", "fp16"):
        cli(TINY_ARGS + ["--device", DEV, "--dtype", dt], out / f"tiny-cuda-{dt}.png")
        r[f"tiny_{dt}_vs_cpu"] = png_psnr(out / f"tiny-cuda-{dt}.png", REFS / "tiny-cpu-fp32.png")
    return r


def cuda_paths(out: Path) -> dict:
    """The other CUDA code paths, through the real command on the tiny model (fp16, the CUDA default): a batch
    (graphs over 4 rows) against single renders, hires fix (two graph shapes), seamless, img2img, a stochastic
    sampler, and verify re-rendering its own output."""
    common = ["--model", str(TINY), "--steps", "8", "--overwrite", "-q", "--device", DEV]
    base = ["-W", "128", "-H", "128", *common]
    runs = {
        "batch": ["generate", "a red fox", *base, "--seed", "7", "-n", "2", "--batch-size", "2", "-o", str(out / "b-{seed}.png")],
        "single": ["generate", "a red fox", *base, "--seed", "8", "-o", str(out / "s-8.png")],
        "hires": ["generate", "a red fox", *base, "--seed", "7", "--hires-scale", "2", "--hires-steps", "4",
                  "-o", str(out / "hires.png")],
        "seamless": ["generate", "a red fox", *base, "--seed", "7", "--seamless", "-o", str(out / "seamless.png")],
        "dpmpp_sde": ["generate", "a red fox", *base, "--seed", "7", "--sampler", "dpm++_sde",
                      "-o", str(out / "sde.png")],
        "img2img": ["img2img", "a red fox", "-i", str(out / "s-8.png"), *common, "--seed", "7", "--strength", "0.6",
                    "-o", str(out / "i2i.png")],
        "verify": ["verify", str(out / "s-8.png"), "--model", str(TINY), "--device", DEV, "-q"],
    }  # fmt: skip
    r = {}
    for name, args in runs.items():
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "sdcli", *args], capture_output=True, text=True, cwd=ROOT)
        r[name] = {"rc": p.returncode, "s": round(time.perf_counter() - t, 2), "err": p.stderr.strip()[-300:]}
    if r["batch"]["rc"] == 0 and r["single"]["rc"] == 0:  # image 2 of the batch (seed 8) vs seed 8 alone
        r["batch_vs_single"] = png_psnr(out / "b-8.png", out / "s-8.png")
    return r


def load_profile() -> dict:
    """Where load time goes on the GPU: CUDA start-up, then a cold and a warm load_models (no probe)."""
    import torch

    from sdcli.loading import checkpoint

    t = time.perf_counter()
    torch.empty(1, device=DEV)
    sync()
    r = {"cuda_init": time.perf_counter() - t}
    for name in ("load_first", "load_again"):
        t = time.perf_counter()
        models = checkpoint.load_models(CKPT, dtype=torch.float16, device=DEV, prediction="eps")
        sync()
        r[name] = time.perf_counter() - t
        del models
    t = time.perf_counter()
    checkpoint.load_models(CKPT, dtype=torch.float16, device=DEV)  # with the v-prediction probe
    sync()
    r["load_with_probe"] = time.perf_counter() - t
    return r


def ensure_tiny() -> None:
    if not TINY.exists():
        subprocess.run([sys.executable, "scripts/make_checkpoint.py", str(TINY), "--family", "sd1", "--size",
                        "tiny", "--seed", "0"], check=True, cwd=ROOT)  # fmt: skip


def make_refs() -> None:
    """Here, on the CPU: the fp32 renders the GPU's are compared with (same commands, --device cpu)."""
    REFS.mkdir(parents=True, exist_ok=True)
    ensure_tiny()
    cli(TINY_ARGS + ["--device", "cpu", "--dtype", "fp32"], REFS / "tiny-cpu-fp32.png")
    cli(CLI_ARGS + ["--device", "cpu", "--dtype", "fp32"], REFS / "full-cpu-fp32.png")


def environment() -> dict:
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError as e:
        smi = str(e)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    t, _ = sync_timed(lambda: a @ b, 10, warmup=WARM)
    return {"gpu": props.name, "sms": props.multi_processor_count, "smi": smi,
            "torch": torch.__version__, "cuda": torch.version.cuda, "fp16_tflops": 2 * 8192**3 / t / 1e12}


def collect(out: Path, budget: float, only_cli: bool = False, dtypes: list[str] | None = None,
            skip_paths: bool = False) -> dict:
    t0 = time.perf_counter()
    r: dict = {}

    def save():
        (out / "results-cuda.json").write_text(json.dumps(r, indent=1, default=str))

    r["env"] = environment() if not DRY else {"fp16_tflops": 1.0}
    print(json.dumps(r["env"]), flush=True)
    t = time.perf_counter()
    ensure_checkpoint()
    ensure_tiny()
    r["make_checkpoint_s"] = time.perf_counter() - t
    r["checkpoint_sha256"] = sha256(CKPT)  # the CPU references were made from the same seeded file: same hash
    r["gflop_unet"] = unet_gflop(SIZE)
    save()
    for side, dt in [s for s in SIDES if dtypes is None or s[1] in dtypes] if not only_cli else []:
        r[f"{side}-{dt}"] = spawn(["--worker", side, "--dtype", dt, "--out", str(out)], timeout=150)
        print(f"    {json.dumps(r[f'{side}-{dt}'])[:600]}", flush=True)
        save()
    try:
        r["cli"] = cli_checks(out)
    except Exception as e:  # noqa: BLE001 - the rest of the run is still worth having
        r["cli"] = {"error": str(e)}
    print(f"    {json.dumps(r['cli'])}", flush=True)
    r["checks"] = agreement(out)
    save()
    if not skip_paths:
        r["paths"] = cuda_paths(out)
    r["load_profile"] = spawn(["--load-profile", "--out", str(out)], timeout=120)
    save()
    left = budget - (time.perf_counter() - t0)
    if not only_cli and dtypes is None:
        r["compile"] = spawn(["--compile", "--out", str(out)], timeout=left - 20) if left > 120 else {"error": "skipped"}
    save()
    return r


def sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def agreement(out: Path) -> dict:
    import torch

    def load(name):
        p = out / name
        return torch.load(p) if p.exists() else None

    c = {}
    for dt in ("fp16", "fp32", "bf16"):
        for what in ("eps", "text"):
            a, b = load(f"{what}-sdcli-{dt}.pt"), load(f"{what}-diffusers-{dt}.pt")
            if a is not None and b is not None:
                c[f"{what}_sdcli_vs_diffusers_{dt}_rel"] = rel(a, b)
    ref = load("image-sdcli-fp32.pt")
    for dt in ("fp16", "bf16"):
        a = load(f"image-sdcli-{dt}.pt")
        if a is not None and ref is not None:
            c[f"image_{dt}_vs_fp32_psnr"] = psnr(a, ref)
    cpu = BENCH / "eps-sdcli-fp32-512.pt"  # from the CPU full-mode run, same inputs
    if not DRY and cpu.exists() and load("eps-sdcli-fp32.pt") is not None:
        c["eps_cuda_fp32_vs_cpu_fp32_rel"] = rel(load("eps-sdcli-fp32.pt"), torch.load(cpu))
    return c


def render(r: dict) -> str:
    s, d = r.get("sdcli-fp16", {}), r.get("diffusers-fp16", {})
    e = r["env"]
    eff = lambda secs: f"{100 * r['gflop_unet'] / 1e3 / secs / e['fp16_tflops']:.0f}%" if secs else ""  # noqa: E731
    rows = [
        ["load to ready (fp16 file, to GPU)", fmt(s.get("load")), fmt(d.get("load")), ratio(s.get("load"), d.get("load")), ""],
        ["text encoding (cond + uncond)", ms(s.get("text")), ms(d.get("text")), ratio(s.get("text"), d.get("text")), ""],
        ["UNet step, CFG batch 2, CUDA graphs (default)", ms(s.get("unet_graphs")), ms(d.get("unet")),
         ratio(s.get("unet_graphs"), d.get("unet")), eff(s.get("unet_graphs"))],
        ["UNet step, CFG batch 2, eager", ms(s.get("unet")), ms(d.get("unet")), ratio(s.get("unet"), d.get("unet")),
         eff(s.get("unet"))],
        ["UNet step, eager, channels_last", ms(s.get("unet_channels_last")), ms(d.get("unet")),
         ratio(s.get("unet_channels_last"), d.get("unet")), ""],
        ["VAE decode", ms(s.get("vae")), ms(d.get("vae")), ratio(s.get("vae"), d.get("vae")), ""],
        ["VAE decode, channels_last", ms(s.get("vae_channels_last")), ms(d.get("vae")),
         ratio(s.get("vae_channels_last"), d.get("vae")), ""],
        [f"whole image, {STEPS} steps euler + decode", ms(s.get("image")), ms(d.get("image")),
         ratio(s.get("image"), d.get("image")), ""],
        ["the same, sdcli with CUDA graphs off", ms(s.get("image_eager")), ms(d.get("image")),
         ratio(s.get("image_eager"), d.get("image")), ""],
        ["peak GPU memory allocated", fmt(s.get("mem_peak"), "GB"), fmt(d.get("mem_peak"), "GB"),
         ratio(s.get("mem_peak"), d.get("mem_peak")), ""],
    ]  # fmt: skip
    for dt in ("fp32", "bf16"):
        s2, d2 = r.get(f"sdcli-{dt}", {}), r.get(f"diffusers-{dt}", {})
        rows.append([f"{dt}: UNet step (graphs) / whole image", f"{ms(s2.get('unet_graphs'))} / {ms(s2.get('image'))}",
                     f"{ms(d2.get('unet'))} / {ms(d2.get('image'))}",
                     f"{ratio(s2.get('unet_graphs'), d2.get('unet'))} / {ratio(s2.get('image'), d2.get('image'))}", ""])
    head = ["what (512x512, fp16 unless named)", "sdcli", "diffusers", "sdcli speed-up", "% of fp16 matmul peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def notes(r: dict) -> list[str]:
    e, c, s = r["env"], r.get("checks", {}), r.get("sdcli-fp16", {})
    out = [f"Measured fp16 matmul peak (8192^3, median of 10): {e['fp16_tflops']:.0f} TFLOP/s; UNet batch 2 at "
           f"{SIZE}px: {r['gflop_unet']:.0f} GFLOP (FlopCounterMode). Speed-up = diffusers time / sdcli time."]
    if c:
        out.append("Same inputs, same weights: sdcli's UNet output vs diffusers' relative difference "
                   + ", ".join(f"{dt} {c[f'eps_sdcli_vs_diffusers_{dt}_rel']:.1e}" for dt in ("fp16", "fp32", "bf16")
                               if f"eps_sdcli_vs_diffusers_{dt}_rel" in c)
                   + f"; CUDA fp32 vs the CPU's fp32 output: {c.get('eps_cuda_fp32_vs_cpu_fp32_rel', float('nan')):.1e}. "
                   "Text encoder (sdcli's own) vs transformers' CLIPTextModel: "
                   + ", ".join(f"{dt} {c[f'text_sdcli_vs_diffusers_{dt}_rel']:.1e}" for dt in ("fp16", "fp32", "bf16")
                               if f"text_sdcli_vs_diffusers_{dt}_rel" in c) + ".")
    if s:
        out.append(f"CUDA graph replays vs eager: max |difference| {s.get('graphs_vs_eager_maxdiff')} for the UNet step "
                   f"and {s.get('image_graphs_vs_eager_maxdiff')} for the whole image (bit-identical).")
    if "image_fp16_vs_fp32_psnr" in c:
        out.append(f"Quality guard (whole image, same seed): fp16 vs fp32 PSNR {c['image_fp16_vs_fp32_psnr']:.1f} dB, "
                   f"bf16 vs fp32 {c['image_bf16_vs_fp32_psnr']:.1f} dB.")
    cli = r.get("cli", {})
    if "full_fp32_vs_cpu" in cli:
        f32, f16 = cli["full_fp32_vs_cpu"], cli["full_fp16_vs_cpu"]
        out.append(f"Same seed everywhere, through `sdcli generate` ({SIZE}px, {STEPS} steps, the default sampler): the "
                   f"CUDA fp32 PNG vs the CPU fp32 PNG {f32['psnr']:.1f} dB, at most {f32['max_level_diff']} level "
                   f"apart; CUDA fp16 vs CPU fp32 {f16['psnr']:.1f} dB, at most {f16['max_level_diff']} level(s).")
        out.append(f"Cold `sdcli generate` to a PNG on the GPU ({SIZE}px, {STEPS} steps, process start included): "
                   f"fp16 {cli['ttfi_fp16']:.1f} s (first run: also hashes the 2.1 GB checkpoint), fp32 "
                   f"{cli['ttfi_fp32']:.1f} s; `sdcli --help` {cli['help']:.2f} s.")
    if "load_profile" in r:
        lp = r["load_profile"]
        out.append(f"Load profile in one process: CUDA start {lp['cuda_init']:.2f} s, load_models {lp['load_first']:.2f} s "
                   f"(again {lp['load_again']:.2f} s), with the v-prediction probe {lp['load_with_probe']:.2f} s. The "
                   "'load to ready' row also counts importing the libraries in a fresh worker.")
    paths = r.get("paths", {})
    if paths:
        ok = [k for k, v in paths.items() if isinstance(v, dict) and v.get("rc") == 0]
        out.append(f"CUDA paths through the CLI (tiny model, fp16), exit 0: {', '.join(ok)}; image 2 of a batch of 2 "
                   f"vs the same seed alone: max difference {paths.get('batch_vs_single', {}).get('max_level_diff')} "
                   "levels.")
    comp = r.get("compile", {})
    if "compiled" in comp:
        out.append(f"torch.compile (inductor, default mode) of the UNet, not adopted: {comp['compile_s']:.0f} s to "
                   f"compile, then {ms(comp['compiled'])} per step vs {ms(comp['eager'])} eager and "
                   f"{ms(s.get('unet_graphs'))} with sdcli's CUDA graphs (relative difference to eager "
                   f"{comp['compiled_rel']:.1e}).")
    return out


def render_docs(files: list[Path]) -> None:
    """Merge saved result files (a later file fills what an earlier one lacks or failed at) and write the CUDA
    section of docs/benchmarks.md."""
    from bench import write_section

    r: dict = {}
    for f in files:
        for k, v in json.loads(f.read_text()).items():
            if k not in r or not r[k] or isinstance(r[k], dict) and "error" in r[k]:
                r[k] = v
            elif isinstance(r[k], dict) and isinstance(v, dict) and "error" not in v:
                r[k] = {**v, **r[k]}  # e.g. checks: the earlier file's values, plus what only the later one has
    e = r["env"]
    body = (f"## Latest CUDA run\n\nMachine: {e['gpu']} ({e['sms']} SMs; {e['smi']}), torch {e['torch']}, CUDA "
            f"{e['cuda']}; diffusers fp16 is the peer. Raw results: {', '.join(f'`{f}`' for f in files)}.\n\n"
            + render(r) + "\n" + "".join(f"- {n}\n" for n in notes(r)))
    write_section("bench-cuda", body)
    print(body)


def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{1000 * x:.1f} ms" if x < 1 else f"{x:.2f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=BENCH / "cuda")
    p.add_argument("--budget", type=float, default=420, help="seconds; the compile lever runs only if time is left")
    p.add_argument("--make-refs", action="store_true", help="make the CPU reference renders here and stop")
    p.add_argument("--worker", choices=["sdcli", "diffusers"])
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--load-profile", action="store_true")
    p.add_argument("--render", type=Path, nargs="+", help="write docs/benchmarks.md's CUDA section from these results")
    p.add_argument("--dtypes", nargs="+", choices=["fp16", "fp32", "bf16"], help="only these sides; no compile lever")
    p.add_argument("--no-paths", action="store_true", help="skip the CUDA path smoke runs")
    p.add_argument("--only-cli", action="store_true", help="skip the side-by-side workers and the compile lever")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.render:
        return render_docs(a.render)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.make_refs:
        return make_refs()
    if a.load_profile:
        return print(json.dumps(load_profile()))
    if a.worker or a.compile:
        res = compile_worker(a.out) if a.compile else run_worker(a.worker, a.dtype, a.out)
        print(json.dumps(res))
        return
    r = collect(a.out, a.budget, a.only_cli, a.dtypes, a.no_paths)
    if a.only_cli:
        return print(json.dumps(r, default=str))
    table = render(r)
    (a.out / "table-cuda.md").write_text(table)
    print(json.dumps({k: r[k] for k in ("checks", "cli", "compile") if k in r}, default=str))
    print(table)


if __name__ == "__main__":
    main()
