"""SDXL base on a CUDA GPU: sdcli vs diffusers fp16 at 1024x1024, and `--offload` inside an 8 GB memory cap.

    python scripts/bench_cuda_sdxl.py --out DIR          # on the GPU machine (~6 min on an H200)
    BENCH_CUDA_DRY=1 python scripts/bench_cuda_sdxl.py --out /tmp/x   # rehearsal on the CPU, tiny SDXL, 64px

Issue 17's GPU targets: the SDXL 1024x1024 step against diffusers fp16 (and the published 21.6 it/s of stable-fast
on an H100), and a whole SDXL 1024x1024 render with `--offload` within 8 GB of GPU memory
(torch.cuda.set_per_process_memory_fraction caps the process, so exceeding it is an out-of-memory error, not a
number read afterwards). Each run is its own process: sdcli keep (the GPU default), sdcli offload under the cap,
diffusers fp16, diffusers with enable_model_cpu_offload under the same cap when accelerate is installed.
The checkpoint is bench_sdxl.py's random full-size SDXL file (made there in ~30 s; 7 GB, too large to carry).
Results: DIR/results-cuda-sdxl.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench import fmt, ratio  # noqa: E402
from bench_cuda import DEV, DRY, sync, sync_timed  # noqa: E402  (BENCH_CUDA_DRY=1: the CPU rehearsal)
from bench_sdxl import CFG, NEGATIVE, PROMPT, SEED, DiffusersSide, ensure_checkpoint, step_inputs  # noqa: E402

PRESET = "tiny" if DRY else "full"
SIZE, STEPS, REPS = (64, 2, 2) if DRY else (1024, 20, 10)
CAP_GB = 8.0


def cap_memory(gb: float) -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.set_per_process_memory_fraction(gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)


def peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None


def sdcli_worker(policy: str, capped: bool) -> dict:
    """Load, one timed UNet CFG step (keep only), a whole STEPS-step render through the pipeline, peak memory."""
    import torch

    from sdcli import pipeline

    from sdcli.loading import checkpoint
    from sdcli.app.refine import sized
    from sdcli.config import RunConfig

    if capped:
        cap_memory(CAP_GB)
    t0 = time.perf_counter()
    models = checkpoint.load_models(ensure_checkpoint(PRESET), dtype=torch.float16 if DEV == "cuda" else
                                    torch.float32, device=DEV, residency=policy)  # fmt: skip
    res = {"load": time.perf_counter() - t0}
    if policy == "keep":
        x, t, ctx, pooled = (v.to(DEV) for v in step_inputs(PRESET, SIZE))
        from sdcli.models.unet import sdxl_vector

        unet, d = models.unet, next(models.unet.parameters()).dtype
        y = sdxl_vector(pooled, (SIZE, SIZE, 0, 0, SIZE, SIZE), unet.config.adm_in_channels).to(d)
        with torch.inference_mode():
            res["unet"], _ = sync_timed(lambda: unet(x.to(d), t, ctx.to(d), y=y), REPS, warmup=2)
    sync()
    t1 = time.perf_counter()
    cond, uncond = pipeline.encode_text(models, PROMPT, NEGATIVE)
    cond, uncond = sized(models, RunConfig(), (cond, uncond), (SIZE, SIZE))
    plan = pipeline.make_plan("euler", "karras", STEPS, cfg=CFG, family=models.family)
    lat = pipeline.txt2img(models, plan, cond, uncond, [SEED], SIZE, SIZE)
    models.parts.done_sampling()  # as the render loop says it: lean lets the UNet go before the decode
    img = pipeline.decode_latents(models, lat).images
    sync()
    res.update(image=time.perf_counter() - t1, peak=peak_gb(), finite=bool(torch.isfinite(img).all()))
    return res


def diffusers_worker(offload: bool) -> dict:
    import torch

    dtype = torch.float16 if DEV == "cuda" else torch.float32
    if offload:
        cap_memory(CAP_GB)
    t0 = time.perf_counter()
    side = DiffusersSide(ensure_checkpoint(PRESET), dtype, PRESET)
    if offload:
        side.pipe.enable_model_cpu_offload()  # needs accelerate; the models wait in CPU RAM
    else:
        side.pipe.to(DEV)
    res = {"load": time.perf_counter() - t0}
    if not offload:
        x, t, ctx, pooled = (v.to(DEV) for v in step_inputs(PRESET, SIZE))
        res["unet"], _ = sync_timed(lambda: side.unet_step(x, t, ctx, pooled, SIZE), REPS, warmup=2)
    sync()
    t1 = time.perf_counter()
    side.image(SIZE, STEPS)
    sync()
    res.update(image=time.perf_counter() - t1, peak=peak_gb())
    return res


def spawn(kind: str, arg: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--arg", arg, "--out", str(out)]
    print(f"  {kind} {arg} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        oom = "OutOfMemoryError" in res.stderr or "out of memory" in res.stderr.lower()
        return {"error": "out of memory" if oom else res.stderr.strip().splitlines()[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def render(r: dict) -> str:
    s, d, so, do = r["sdcli-keep"], r["diffusers"], r["sdcli-offload"], r["diffusers-offload"]
    cell = lambda w, k, unit="s": w.get("error") or fmt(w.get(k), unit)  # noqa: E731
    rows = [
        ["UNet step, CFG batch 2", cell(s, "unet"), cell(d, "unet"), ratio(s.get("unet"), d.get("unet"))],
        [f"whole image, {STEPS} steps + decode", cell(s, "image"), cell(d, "image"),
         ratio(s.get("image"), d.get("image"))],
        ["peak GPU memory allocated", cell(s, "peak", "GB"), cell(d, "peak", "GB"), ""],
        [f"offload, capped at {CAP_GB:.0f} GB: whole image", cell(so, "image"), cell(do, "image"),
         ratio(so.get("image"), do.get("image"))],
        ["offload: peak GPU memory allocated", cell(so, "peak", "GB"), cell(do, "peak", "GB"), ""],
    ]  # fmt: skip
    head = [f"SDXL base {SIZE}px ({'fp16' if DEV == 'cuda' else 'fp32, dry run'})", "sdcli", "diffusers", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
    its = f"{1 / s['unet']:.1f} it/s" if s.get("unet") else "-"
    return "\n".join(lines) + f"\n\n- sdcli UNet CFG steps: {its} (published: stable-fast 21.6 it/s on an H100).\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--worker", choices=["sdcli", "diffusers"])
    p.add_argument("--arg", default="")
    a = p.parse_args()
    if a.worker == "sdcli":
        print(json.dumps(sdcli_worker(a.arg, capped=a.arg == "offload")))
        return
    if a.worker == "diffusers":
        print(json.dumps(diffusers_worker(a.arg == "offload")))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(PRESET)
    r = {"device": DEV, "size": SIZE, "steps": STEPS, "cap_gb": CAP_GB}
    r["sdcli-keep"] = spawn("sdcli", "keep", a.out)
    r["diffusers"] = spawn("diffusers", "", a.out)
    r["sdcli-offload"] = spawn("sdcli", "offload", a.out)
    r["diffusers-offload"] = spawn("diffusers", "offload", a.out) if DEV == "cuda" else {"error": "GPU only"}
    if DEV == "cuda":
        import torch

        r["gpu"] = torch.cuda.get_device_name(0)
    (a.out / "results-cuda-sdxl.json").write_text(json.dumps(r, indent=1))
    print(render(r))


if __name__ == "__main__":
    main()
