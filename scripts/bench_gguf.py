"""GGUF weights against bf16: file size, peak RSS, load time, step time, PSNR of the image, and the relative error
of one layer's output per quantization type.

    python scripts/bench_gguf.py                       # SD1.5-shaped random fp16 checkpoint, 512x512, 10 steps
    python scripts/bench_gguf.py --family sdxl --size 1024
    python scripts/bench_gguf.py --model real.safetensors --types q8_0,q4_0 --convs --extra q4_k=sd15-q4_k.gguf
    python scripts/bench_gguf.py --rehearse            # tiny model, 64x64, 2 steps: checks the script (~1 min)
    python scripts/bench_gguf.py --family flux --rehearse --types q8_0,q4_k      # a small Flux-shaped DiT
    python scripts/bench_gguf.py --family sd3 --types q8_0,q4_k --size 1024     # SD3.5-Medium-shaped, full size
    python scripts/bench_gguf.py --family flux --types q4_k --t5-type q4_k --no-baseline --size 1024 --steps 1 \
        --tile-rows 64 --dtype fp32                    # the headline: FLUX.1-dev size at Q4_K (one variant)

Each variant (bf16 from the safetensors file, then each GGUF) loads and renders in its own subprocess
(`--worker`), so load time and peak RSS (the child's own, from os.wait4) are honest. Every variant runs in bf16
(`--dtype`), the same prompt, seed and sampler; PSNR compares its image with the bf16 render. GGUF files are written
once into .bench/ by sdcli's own converter (`convert --quantize`, `--convs` = `--quantize-convs`); K-quants cannot
be written with the gguf package, so a Q4_K file made elsewhere (llama.cpp's llama-quantize, stable-diffusion.cpp's
convert) comes in with --extra NAME=FILE.

The layer table quantizes one UNet Linear and one 3x3 conv of the model with gguf.quants (what convert writes),
dequantizes them with sdcli, and reports ||y_q - y|| / ||y|| of the layer's output on random inputs in float32.
Nothing is downloaded. The table goes to stdout (and to --out FILE as Markdown).

--family flux / sd3 (a FLUX.1-dev-shaped DiT, an SD3.5-Medium-shaped MMDiT): the DiT is written as city96 ships it
(the DiT alone, bare names, general.architecture flux / sd3) by sdcli's own writer (quant.quantize.write_gguf, K-quants
by quant/kquants.py), once per type, the unquantized reference as a BF16 (or F32, with --dtype fp32) GGUF of the
same random weights; beside it the 16-channel VAE and CLIP-L (SD3: CLIP-G) as safetensors files and the T5 encoder as
a GGUF under llama.cpp's names (--t5-type, Q8_0 by default), all random, made once. Each variant runs in lean
residency (sdcli's CPU default: the text encoders are released before the DiT is built, the DiT before the decode);
the worker also reports its RSS after each stage (`rss_after`). `load s` is the DiT's build from the file.
--tile-rows N (for full-size files, whose quantization in numpy takes hours): each quantized tensor's blocks are
those of its first N random rows, repeated; the file's types, shapes and sizes are the real ones, its values are
not independent (fine for memory and time, meaningless for PSNR).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import re
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's sdcli, also in the workers (PYTHONPATH below)
BENCH = ROOT / ".bench"
PROMPT, NEGATIVE, SEED = "a photo of a cat, highly detailed", "blurry", 1
LINEARS = ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",  # SD 1.x/2.x
           "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight")  # SDXL: none at level 1
CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
DIT_FAMILIES = ("flux", "sd3")
DIT_LINEAR = {"flux": "double_blocks.0.img_attn.qkv.weight", "sd3": "joint_blocks.0.x_block.attn.qkv.weight"}
LAYER_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K", "Q2_K")  # the DiT layer table, best to worst


# ----------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """Load one model, render one image, print {load_s, sample_s, step_s, decode_s} as JSON; the image to --png."""
    import torch

    if args.family in DIT_FAMILIES:
        return dit_worker(args)

    from sdcli import pipeline
    from sdcli.families.base import SizeCond
    from sdcli.formats.images import tensor_to_pil
    from sdcli.loading.checkpoint import load_models

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    models = load_models(args.worker, dtype=dtype, device="cpu", residency="keep")
    load_s = time.perf_counter() - t0
    cond, uncond = pipeline.encode_text(models, PROMPT, NEGATIVE)
    size = SizeCond((args.size, args.size))  # SDXL's vector y (the pooled text with the size embeddings)
    cond, uncond = (pipeline.with_size_vector(models, c, size, neg) for c, neg in ((cond, False), (uncond, True)))
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


def rss_gb() -> float:
    """This process's resident set now (VmRSS), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


class _Stages(dict):
    """stage -> RSS GB after it; each one also printed at once to stderr with the peak so far (a long full-size
    run shows where it is, and what it held, before it ends)."""

    def __setitem__(self, stage: str, value: float) -> None:
        import resource

        super().__setitem__(stage, value)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        when = time.strftime("%H:%M:%S")
        print(f"[{when}] {stage}: RSS {value:.2f} GiB, peak so far {peak:.2f} GiB", file=sys.stderr, flush=True)


def dit_worker(args: argparse.Namespace) -> None:
    """A DiT family: lean residency, each stage timed, the RSS after each; the DiT's build is the load time."""
    import torch

    from sdcli import pipeline
    from sdcli.formats.images import tensor_to_pil
    from sdcli.loading.checkpoint import load_models
    from sdcli.runtime.device import fix_heap_threshold

    fix_heap_threshold()  # as `sdcli generate` runs (device.configure): the heap's mmap threshold pinned
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    parts = json.loads(args.parts)
    rss = _Stages()
    rss["start"] = rss_gb()
    t0 = time.perf_counter()
    models = load_models(args.worker, parts.pop("vae"), dtype=dtype, device="cpu", residency="lean",
                         text_files=parts)  # fmt: skip
    t1 = time.perf_counter()
    rss["loaded"] = rss_gb()
    guided = models.family.default_cfg > 1  # FLUX: no negative pass; SD3: its cfg
    cond, uncond = pipeline.encode_text(models, PROMPT, NEGATIVE if guided else None)
    cond, uncond = (pipeline.with_guidance(models, pipeline.with_size_vector(models, c, None)) for c in (cond, uncond))
    rss["text"] = rss_gb()
    t2 = time.perf_counter()
    models.stage("unet")  # lean: the text encoders go, then the DiT is read from its file
    rss["dit_built"] = rss_gb()
    t3 = time.perf_counter()
    plan = pipeline.make_plan("euler", "auto", args.steps, family=models.family, size=(args.size, args.size))
    latents = pipeline.txt2img(models, plan, cond, uncond, [SEED], args.size, args.size)
    rss["sampled"] = rss_gb()
    t4 = time.perf_counter()
    models.parts.done_sampling()
    images = pipeline.decode_latents(models, latents).images
    rss["decoded"] = rss_gb()
    t5 = time.perf_counter()
    tensor_to_pil(images[0]).save(args.png)
    print(json.dumps({"load_s": (t1 - t0) + (t3 - t2), "text_s": t2 - t1, "sample_s": t4 - t3,
                      "step_s": (t4 - t3) / args.steps, "decode_s": t5 - t4,
                      "rss_after": {k: round(v, 2) for k, v in rss.items()}}))  # fmt: skip


def run_worker(model: Path, png: Path, args: argparse.Namespace, parts: dict | None = None) -> dict:
    """One variant in a child process: its JSON line, plus its own peak RSS (os.wait4's ru_maxrss, KiB)."""
    cmd = [sys.executable, __file__, "--worker", str(model), "--png", str(png), "--size", str(args.size),
           "--steps", str(args.steps), "--dtype", args.dtype, "--family", args.family,
           "--parts", json.dumps({k: str(v) for k, v in (parts or {}).items()})]  # fmt: skip
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


# ----------------------------------------------------------------------------------------------- DiT families
def _make_checkpoint():
    """scripts/make_checkpoint.py (its presets and random initialisation) as a module."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_checkpoint

    return make_checkpoint


def dit_parts(family: str, full: bool) -> dict:
    """part -> (module config, file kind): the DiT, the 16-channel VAE, CLIP-L (SD3: and CLIP-G), T5. Rehearsal
    sizes keep rows of 256 in the DiT's Linears, so K-quants have something to quantize."""
    from sdcli.models import TextConfig, VAEConfig
    from sdcli.models.flux import FluxConfig
    from sdcli.models.mmdit import MMDiTConfig
    from sdcli.models.t5 import T5Config

    mc = _make_checkpoint()
    if full:
        clip_l = TextConfig(projection_dim=768)
        clip_g = TextConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, hidden_act="gelu",
                            pad_id=0, projection_dim=1280)  # fmt: skip
        dit, t5 = mc.dit_config(family, "full"), T5Config()
        vae = VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False)
    else:
        clip_l, clip_g, t5, vae = mc.TINY_CLIP_L, mc.TINY_CLIP_G, mc.tiny_t5(), mc.TINY_VAE16
        clip_l = TextConfig(**{**clip_l.__dict__, "projection_dim": clip_l.hidden_size})
        if family == "sd3":
            dit = MMDiTConfig(depth=2, hidden_size=256, num_heads=4, pos_embed_max_size=16, mlp_hidden=1024,
                              adm_in_channels=clip_l.hidden_size + clip_g.projection_dim, context_dim=t5.d_model,
                              dual_attention_layers=(0,), qk_norm=True)  # fmt: skip
        else:
            dit = FluxConfig(vec_in_dim=clip_l.hidden_size, context_in_dim=t5.d_model, hidden_size=256,
                             mlp_hidden_dim=1024, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=(16, 56, 56))
    parts = {"dit": dit, "vae": vae, "clip_l": clip_l, "t5": t5}
    if family == "sd3":
        parts["clip_g"] = clip_g
    return parts


def _shapes(part: str, cfg, family: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a part as its file holds them (built on the meta device)."""
    import torch

    from sdcli.formats.gguf import T5_LAYERS, T5_NAMES
    from sdcli.models import AutoencoderKL, TextEncoder
    from sdcli.models.flux import FluxModel
    from sdcli.models.mmdit import MMDiT
    from sdcli.models.t5 import T5Encoder

    builders = {"dit": MMDiT if family == "sd3" else FluxModel, "vae": AutoencoderKL, "t5": T5Encoder}
    build = builders.get(part, TextEncoder)
    with torch.device("meta"):
        state = {k: tuple(v.shape) for k, v in build(cfg).state_dict().items()}
    if part.startswith("clip"):  # ComfyUI's clip_l/clip_g files: transformers names, and logit_scale
        state = {k.replace("transformer.text_model.", "text_model.").replace("transformer.", "text_model."): v
                 for k, v in state.items()}  # fmt: skip
        state["logit_scale"] = ()
    if part == "t5":  # city96's T5 GGUF: llama.cpp's names (formats/gguf.py T5_LAYERS), one embedding
        layers, names, out = {v: k for k, v in T5_LAYERS.items()}, {v: k for k, v in T5_NAMES.items()}, {}
        for k, v in state.items():
            m = re.fullmatch(r"encoder\.block\.(\d+)\.(layer\.\d\.\w+\.\w+|layer\.\d\.layer_norm)\.(weight|bias)", k)
            if m:
                out[f"enc.blk.{m.group(1)}.{layers[m.group(2)]}.{m.group(3)}"] = v
            elif k in names:
                out[names[k]] = v
        state = out
    return state


def random_tensor(name: str, shape: tuple[int, ...], seed: int, tile_rows: int = 0):
    """make_checkpoint's random values for `name` (a generator seeded from the name: any tensor alone, in any order),
    rounded to bf16 as a released file holds them; with `tile_rows`, the first rows repeated (module docstring)."""
    import torch

    if tile_rows and len(shape) >= 2 and shape[0] > tile_rows:
        head = random_tensor(name, (tile_rows, *shape[1:]), seed)
        return head.repeat(-(-shape[0] // tile_rows), *([1] * (len(shape) - 1)))[:shape[0]]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return _make_checkpoint()._random_dit(name, shape, gen).to(torch.bfloat16).float()


def _tiled_blocks(tile_rows: int):
    """quant.quantize._blocks that quantizes the first `tile_rows` rows and repeats their blocks (--tile-rows)."""
    import numpy as np

    from sdcli.quant import quantize

    plain = quantize._blocks

    def blocks(t, qtype):
        if qtype.is_float or t.dim() < 2 or t.shape[0] <= tile_rows:
            return plain(t, qtype)
        head = plain(t[:tile_rows], qtype)
        return np.concatenate([head] * -(-t.shape[0] // tile_rows))[:t.shape[0]]

    return blocks


def write_part(path: Path, shapes: dict, seed: int, qtype: str | None, arch: str | None, tile_rows: int) -> Path:
    """One random part, one tensor in memory at a time: a GGUF by sdcli's writer (`qtype`), else bf16 safetensors."""
    import torch

    from sdcli.quant import quantize

    if path.exists():
        return path
    BENCH.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    read = lambda name: random_tensor(name, shapes[name], seed, tile_rows)  # noqa: E731
    if qtype is None:
        from sdcli.formats.safetensors import write_streamed

        tmp = path.with_name(f".{path.name}.tmp")
        write_streamed(tmp, {k: ("BF16", v) for k, v in shapes.items()}, lambda k: read(k).to(torch.bfloat16),
                       {"format": "pt"})  # fmt: skip
        tmp.replace(path)
    else:
        described = {k: torch.empty(v, dtype=torch.bfloat16, device="meta") for k, v in shapes.items()}
        saved, quantize._blocks = quantize._blocks, _tiled_blocks(tile_rows) if tile_rows else quantize._blocks
        try:
            quantize.write_gguf(path, described, qtype, arch=arch, read=read)
        finally:
            quantize._blocks = saved
    print(f"wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip
    return path


def dit_files(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Path], dict]:
    """(label -> DiT GGUF, the companion files, the DiT's shapes), written once into .bench/."""
    full = not args.rehearse
    cfgs = dit_parts(args.family, full)
    tag = f"{args.family}-{'full' if full else 'rehearse'}" + (f"-tile{args.tile_rows}" if args.tile_rows else "")
    shapes = {part: _shapes(part, cfg, args.family) for part, cfg in cfgs.items()}
    companions = {"vae": write_part(BENCH / f"{tag}-ae.safetensors", shapes["vae"], 9, None, None, 0)}
    for n, part in enumerate(("clip_l", "clip_g")):
        if part in shapes:
            companions[part] = write_part(BENCH / f"{tag}-{part}.safetensors", shapes[part], 1 + n, None, None, 0)
    companions["t5"] = write_part(BENCH / f"{tag}-t5-{args.t5_type}.gguf", shapes["t5"], 3, args.t5_type,
                                  "t5encoder", args.tile_rows)  # fmt: skip
    variants = {}
    reference = "bf16" if args.dtype == "bf16" else "f32"
    for qtype in ([] if args.no_baseline else [reference]) + [t for t in args.types.split(",") if t]:
        label = args.dtype if qtype == reference else qtype.upper()
        variants[label] = write_part(BENCH / f"{tag}-{qtype.lower()}.gguf", shapes["dit"], 0, qtype, args.family,
                                     args.tile_rows if qtype != reference else 0)  # fmt: skip
    return variants, companions, shapes["dit"]


def dit_layer_errors(args: argparse.Namespace, shapes: dict) -> list[tuple[str, str, float]]:
    """(layer, type, relative error of its output) for one attention Linear of the DiT, written by sdcli's writer
    (quant.quantize._blocks: gguf.quants or kquants) and dequantized by sdcli, on random inputs in float32."""
    import torch

    from sdcli.quant.dequantize import dequantize
    from sdcli.quant.ggml_types import BY_NAME
    from sdcli.quant.quantize import _blocks

    key = DIT_LINEAR[args.family]
    w = random_tensor(key, shapes[key], 0)
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
    ref = x @ w.t()
    rows = []
    for name in LAYER_TYPES:
        qt = BY_NAME[name]
        back = dequantize(torch.from_numpy(_blocks(w, qt).reshape(-1)), qt, tuple(w.shape))
        rows.append((key, name, float((x @ back.t() - ref).norm() / ref.norm())))
    return rows


def run_dit(args: argparse.Namespace) -> tuple[dict, list, str]:
    variants, companions, shapes = dit_files(args)
    results, first = {}, next(iter(variants))
    for label, path in variants.items():
        png = BENCH / f"bench-gguf-{args.family}-{label}.png"
        results[label] = {**run_worker(path, png, args, companions), "file_mb": path.stat().st_size / 2**20,
                          "png": png}  # fmt: skip
        results[label]["psnr"] = math.nan if args.no_baseline else psnr(png, results[first]["png"])
        print(f"{label}: {json.dumps({k: v for k, v in results[label].items() if k != 'png'})}", file=sys.stderr)
    what = (f"{args.family} ({'full size' if not args.rehearse else 'rehearsal size'}), T5 {args.t5_type.upper()}"
            f"{', tiled rows ' + str(args.tile_rows) if args.tile_rows else ''}")  # fmt: skip
    return results, dit_layer_errors(args, shapes), what


# ----------------------------------------------------------------------------------------------- the numbers
def psnr(a: Path, b: Path) -> float:
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def layer_errors(src: Path, types: list[str]) -> list[tuple[str, str, float]]:
    """(layer, type, relative error of its output) for the LINEARS and CONV the source model has, each quantized by
    gguf.quants and dequantized by sdcli; the conv as --quantize-convs stores it (256-wide rows)."""
    import torch
    import torch.nn.functional as F

    from sdcli.formats.diffusers import open_source
    from sdcli.quant.dequantize import dequantize
    from sdcli.quant.ggml_types import BY_NAME
    from sdcli.quant.quantize import _blocks

    source = open_source(src)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for key in (*LINEARS, CONV):
        if key not in source.entries:
            continue
        w = source.get(key).float()
        x = torch.randn(16, w.shape[1], *(8, 8) if w.dim() == 4 else (), generator=gen)

        def apply(weight):
            return F.conv2d(x, weight, padding=1) if w.dim() == 4 else x @ weight.t()

        ref = apply(w)
        for name in types:
            qt = BY_NAME[name.upper()]
            flat = w.reshape(-1, 256) if w.shape[-1] % qt.block_size else w  # as --quantize-convs stores it
            blocks = _blocks(flat, qt)  # gguf.quants, or sdcli's K-quant writer
            back = dequantize(torch.from_numpy(blocks.reshape(-1)), qt, tuple(w.shape))
            rows.append((key.removeprefix("model.diffusion_model."), qt.name,
                         float((apply(back) - ref).norm() / ref.norm())))  # fmt: skip
    source.close()
    return rows


def table(results: dict[str, dict], errors: list, args: argparse.Namespace, what: str) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import machine  # scripts/bench.py: CPU model, family/model numbers, flags, threads, date

    lines = [f"GGUF vs {args.dtype}: {what}, {args.size}x{args.size}, {args.steps} steps euler, compute {args.dtype}",
             "", f"Machine: {machine()}", "",
             f"| weights | file MiB | peak RSS GiB | load s | step s | decode s | PSNR vs {args.dtype} dB "
             "| RSS GiB after |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in results.items():
        after = " ".join(f"{k} {v}" for k, v in r.get("rss_after", {}).items())
        lines.append(f"| {label} | {r['file_mb']:.1f} | {r['rss_gb']:.2f} | {r['load_s']:.2f} | {r['step_s']:.3f} | "
                     f"{r['decode_s']:.2f} | {r['psnr']:.1f} | {after} |")  # fmt: skip
    lines += ["", "| layer | type | relative error of the output |", "|---|---|---|"]
    lines += [f"| {layer} | {qtype} | {err:.2e} |" for layer, qtype, err in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .safetensors checkpoint (default: a random one of --family, made once)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl", *DIT_FAMILIES])
    p.add_argument("--types", default="q8_0,q4_0", help="GGUF types sdcli writes, comma-separated")
    p.add_argument("--convs", action="store_true", help="quantize conv kernels too (convert --quantize-convs)")
    p.add_argument("--extra", action="append", default=[], help="NAME=FILE.gguf made elsewhere (Q4_K...)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--rehearse", action="store_true", help="tiny model, 64x64, 2 steps")
    p.add_argument("--out", help="also write the tables to this Markdown file")
    p.add_argument("--t5-type", default="q8_0", help="flux/sd3: the T5 encoder GGUF's type")
    p.add_argument("--tile-rows", type=int, default=0, help="flux/sd3: repeat the first N rows' blocks (docstring)")
    p.add_argument("--no-baseline", action="store_true", help="flux/sd3: skip the unquantized variant (and PSNR)")
    p.add_argument("--parts", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--png", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from sdcli.runtime.device import cpu_has_native_bf16

    if args.dtype == "bf16" and not cpu_has_native_bf16():  # AVX2 only: torch's bf16 matmul ~400x below fp32 there
        print("warning: this CPU has no native bf16 (AVX512-BF16/AMX): bf16 compute crawls here and sdcli's auto "
              "picks fp32; use --dtype fp32 for timings", file=sys.stderr)  # fmt: skip
    native = 1024 if args.family in ("sdxl", *DIT_FAMILIES) else 512
    args.size = args.size or (64 if args.rehearse else native)
    args.steps = args.steps or (2 if args.rehearse else 10)
    if args.family in DIT_FAMILIES:
        results, errors, what = run_dit(args)
        return report(table(results, errors, args, what), args)
    src = source_model(args)
    variants = {args.dtype: src, **gguf_variants(src, args)}
    results = {}
    for label, path in variants.items():
        png = BENCH / f"bench-gguf-{label.replace('+', '-')}.png"
        results[label] = {**run_worker(path, png, args), "file_mb": path.stat().st_size / 2**20, "png": png}
        results[label]["psnr"] = psnr(png, results[args.dtype]["png"])
        print(f"{label}: {json.dumps({k: v for k, v in results[label].items() if k != 'png'})}", file=sys.stderr)
    made = {label.split("+")[0] for label in variants}
    types = [t for t in ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K") if t in made]
    report(table(results, layer_errors(src, types), args, src.name), args)


def report(text: str, args: argparse.Namespace) -> None:
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
