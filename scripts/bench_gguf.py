"""GGUF weights against bf16: file size, peak RSS, load time, step time, PSNR of the image, and the relative error
of one layer's output per quantization type.

    python scripts/bench_gguf.py                       # SD1.5-shaped random fp16 checkpoint, 512x512, 10 steps
    python scripts/bench_gguf.py --family sdxl --size 1024
    python scripts/bench_gguf.py --model real.safetensors --types q8_0,q4_0 --convs --extra q4_k=sd15-q4_k.gguf
    python scripts/bench_gguf.py --rehearse            # tiny model, 64x64, 2 steps: checks the script (~1 min)

Each variant (bf16 from the safetensors file, then each GGUF) loads and renders in its own subprocess
(`--worker`), so load time and peak RSS (the child's own, from os.wait4) are honest. Every variant runs in bf16
(`--dtype`), the same prompt, seed and sampler; PSNR compares its image with the bf16 render. GGUF files are written
once into .bench/ by sdcli's own converter (`convert --quantize`, `--convs` = `--quantize-convs`); K-quants cannot
be written with the gguf package, so a Q4_K file made elsewhere (llama.cpp's llama-quantize, stable-diffusion.cpp's
convert) comes in with --extra NAME=FILE.

The layer table quantizes one UNet Linear and one 3x3 conv of the model with gguf.quants (what convert writes),
dequantizes them with sdcli, and reports ||y_q - y|| / ||y|| of the layer's output on random inputs in float32.
Nothing is downloaded. The table goes to stdout (and to --out FILE as Markdown).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's sdcli, also in the workers (PYTHONPATH below)
BENCH = ROOT / ".bench"
PROMPT, NEGATIVE, SEED = "a photo of a cat, highly detailed", "blurry", 1
LINEAR = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"


# ----------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """Load one model, render one image, print {load_s, sample_s, step_s, decode_s} as JSON; the image to --png."""
    import torch

    from sdcli import pipeline
    from sdcli.formats.images import tensor_to_pil
    from sdcli.loading.checkpoint import load_models

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    models = load_models(args.worker, dtype=dtype, device="cpu", residency="keep")
    load_s = time.perf_counter() - t0
    cond, uncond = pipeline.encode_text(models, PROMPT, NEGATIVE)
    plan = pipeline.make_plan("euler", "auto", args.steps, cfg=7.0, family=models.family)
    t1 = time.perf_counter()
    latents = pipeline.txt2img(models, plan, cond, uncond, [SEED], args.size, args.size)
    sample_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    images = pipeline.decode_latents(models, latents).images
    decode_s = time.perf_counter() - t2
    tensor_to_pil(images[0]).save(args.png)
    print(json.dumps({"load_s": load_s, "sample_s": sample_s, "step_s": sample_s / args.steps,
                      "decode_s": decode_s}))  # fmt: skip


def run_worker(model: Path, png: Path, args: argparse.Namespace) -> dict:
    """One variant in a child process: its JSON line, plus its own peak RSS (os.wait4's ru_maxrss, KiB)."""
    cmd = [sys.executable, __file__, "--worker", str(model), "--png", str(png), "--size", str(args.size),
           "--steps", str(args.steps), "--dtype", args.dtype]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"worker failed on {model} (exit {proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["rss_gb"] = usage.ru_maxrss / 2**20  # Linux: KiB
    return result


# ----------------------------------------------------------------------------------------------- models
def source_model(args: argparse.Namespace) -> Path:
    """--model, or a random checkpoint of the family at that size (fp16, as real files ship), made once."""
    if args.model:
        return Path(args.model)
    size = "tiny" if args.rehearse else "full"
    path = BENCH / f"{args.family}-{size}-fp16.safetensors"
    if not path.exists():
        BENCH.mkdir(exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(path), "--family",
                        args.family, "--size", size, "--dtype", "fp16", "--seed", "0"], check=True)  # fmt: skip
    return path


def gguf_variants(src: Path, args: argparse.Namespace) -> dict[str, Path]:
    """type label -> GGUF file: written here for the writable types (once), given with --extra for the others."""
    from sdcli.app.convert import run_convert

    out = {}
    for qtype in filter(None, args.types.split(",")):
        label = qtype.upper() + ("+convs" if args.convs else "")
        path = BENCH / f"{src.stem}-{qtype.lower()}{'-convs' if args.convs else ''}.gguf"
        if not path.exists():
            run_convert(src, path, overwrite=False, quantize=qtype, convs=args.convs)
        out[label] = path
    for item in args.extra:
        label, _, path = item.partition("=")
        out[label.upper()] = Path(path)
    return out


# ----------------------------------------------------------------------------------------------- the numbers
def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def layer_errors(src: Path, types: list[str]) -> list[tuple[str, str, float]]:
    """(layer, type, relative error of its output) for LINEAR and CONV of the source model, each quantized by
    gguf.quants and dequantized by sdcli; the conv as --quantize-convs stores it (256-wide rows)."""
    import gguf
    import torch
    import torch.nn.functional as F

    from sdcli.formats.diffusers import open_source
    from sdcli.quant.dequantize import dequantize
    from sdcli.quant.ggml_types import BY_NAME

    source = open_source(src)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for key in (LINEAR, CONV):
        if key not in source.entries:
            continue
        w = source.get(key).float()
        x = torch.randn(16, w.shape[1], *(8, 8) if w.dim() == 4 else (), generator=gen)

        def apply(weight):
            return F.conv2d(x, weight, padding=1) if w.dim() == 4 else x @ weight.t()

        ref = apply(w)
        flat = w.reshape(-1, 256) if w.shape[-1] % 32 else w
        for name in types:
            qt = BY_NAME[name.upper()]
            blocks = gguf.quants.quantize(flat.numpy(), gguf.GGMLQuantizationType(qt.id))
            back = dequantize(torch.from_numpy(blocks.reshape(-1)), qt, tuple(w.shape))
            rows.append((key.removeprefix("model.diffusion_model."), qt.name,
                         float((apply(back) - ref).norm() / ref.norm())))  # fmt: skip
    source.close()
    return rows


def table(results: dict[str, dict], errors: list, args: argparse.Namespace, src: Path) -> str:
    lines = [f"GGUF vs bf16: {src.name}, {args.size}x{args.size}, {args.steps} steps euler, compute {args.dtype}, "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads default", "",
             "| weights | file MB | peak RSS GB | load s | step s | decode s | PSNR vs bf16 dB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in results.items():
        lines.append(f"| {label} | {r['file_mb']:.1f} | {r['rss_gb']:.2f} | {r['load_s']:.2f} | {r['step_s']:.3f} | "
                     f"{r['decode_s']:.2f} | {r['psnr']:.1f} |")  # fmt: skip
    lines += ["", "| layer | type | relative error of the output |", "|---|---|---|"]
    lines += [f"| {layer} | {qtype} | {err:.2e} |" for layer, qtype, err in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .safetensors checkpoint (default: a random one of --family, made once)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--types", default="q8_0,q4_0", help="GGUF types sdcli writes, comma-separated")
    p.add_argument("--convs", action="store_true", help="quantize conv kernels too (convert --quantize-convs)")
    p.add_argument("--extra", action="append", default=[], help="NAME=FILE.gguf made elsewhere (Q4_K...)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--rehearse", action="store_true", help="tiny model, 64x64, 2 steps")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--png", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    native = 1024 if args.family == "sdxl" else 512
    args.size = args.size or (64 if args.rehearse else native)
    args.steps = args.steps or (2 if args.rehearse else 10)
    src = source_model(args)
    variants = {args.dtype: src, **gguf_variants(src, args)}
    results = {}
    for label, path in variants.items():
        png = BENCH / f"bench-gguf-{label.replace('+', '-')}.png"
        results[label] = {**run_worker(path, png, args), "file_mb": path.stat().st_size / 2**20, "png": png}
        results[label]["psnr"] = psnr(png, results[args.dtype]["png"])
        print(f"{label}: {json.dumps({k: v for k, v in results[label].items() if k != 'png'})}", file=sys.stderr)
    types = sorted({label.split("+")[0] for label in variants if label.split("+")[0] in ("Q8_0", "Q5_1", "Q5_0",
                                                                                         "Q4_1", "Q4_0")})  # fmt: skip
    report = table(results, layer_errors(src, types), args, src)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
