"""sdcli vs diffusers on the same SD1.5-shaped random checkpoint, the same shapes, in the same run.

    python scripts/bench.py            # full mode: 512x512, a real 20-step image on each side (slow on a CPU)
    python scripts/bench.py --quick    # ~2-4 min: smaller shapes, the whole image extrapolated (labelled)
    python scripts/bench.py --bf16-full   # CPUs with native bf16 (AVX512-BF16/AMX): 512x512 in bf16, ~10-12 min
    python scripts/bench.py --bf16-full --size 64 --steps 2 --no-docs   # rehearsal of that mode (~1-2 min)
    python scripts/bench.py --taesd    # only: a TAESD decode against the full VAE decode at 512 and 1024

Each side (sdcli fp32/bf16, diffusers fp32/bf16) runs in its own subprocess (`--worker`), so load time and
peak RSS are honest. The table goes to stdout and, with the machine description, to docs/benchmarks.md.
Nothing is downloaded: diffusers gets local configs written here from the SD1.5 config values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
CKPT = BENCH / "sd15-full-fp16.safetensors"
DOCS = ROOT / "docs" / "benchmarks.md"
PROMPT, NEGATIVE, SEED = "a photo of a cat, highly detailed", "blurry", 1

# SD1.5's diffusers configs (stable-diffusion-v1-5 unet/config.json, vae/config.json), written locally.
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}  # fmt: skip
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


# ----------------------------------------------------------------------------------------------- helpers
def timed(fn, reps: int, warmup: int = 0) -> tuple[float, object]:
    """Median wall time of `reps` calls after `warmup` untimed calls, and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB -> GB (1e6 KiB ~ 1.02 GB)


def ensure_checkpoint() -> Path:
    if not CKPT.exists():
        BENCH.mkdir(exist_ok=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(CKPT), "--family", "sd1",
                        "--size", "full", "--dtype", "fp16", "--seed", "0"], check=True)  # fmt: skip
    return CKPT


def token_ids(text: str):
    import torch

    from sdcli.text.clip_tokenizer import get_tokenizer

    ids = get_tokenizer().encode(text)[:75]
    row = [49406] + ids + [49407] * (76 - len(ids))  # BOS, tokens, EOS padding (SD1 pads with EOS)
    return torch.tensor([row])


# ----------------------------------------------------------------------------------------------- workers
class SdcliSide:
    def __init__(self, dtype, device: str = "cpu"):
        from sdcli.loading import checkpoint

        self.models = checkpoint.load_models(CKPT, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device

    def text(self):
        from sdcli import pipeline

        return pipeline.encode_text(self.models, PROMPT, NEGATIVE)

    def unet_step(self, x, t, ctx):
        import torch

        with torch.inference_mode():
            x, t, ctx = x.to(self.device, self.dtype), t.to(self.device), ctx.to(self.device, self.dtype)
            return self.models.unet(x, t, ctx).float()

    def decode(self, z):
        import torch

        with torch.inference_mode():
            return self.models.vae.decode(z.to(self.device, self.dtype)).float()

    def image(self, size: int, steps: int, vae_fp32: bool = False):
        from sdcli import pipeline

        cond, uncond = self.text()
        plan = pipeline.make_plan("euler", "auto", steps, cfg=7.0)
        lat = pipeline.txt2img(self.models, plan, cond, uncond, [SEED], size, size)
        return lat if vae_fp32 else pipeline.decode_latents(self.models, lat).images


class DiffusersSide:
    def __init__(self, dtype, device: str = "cpu"):
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cfg = write_diffusers_configs()
        kw = dict(config=str(cfg), local_files_only=True, torch_dtype=dtype)
        self.unet = UNet2DConditionModel.from_single_file(str(CKPT), subfolder="unet", **kw).eval().to(device)
        self.vae = AutoencoderKL.from_single_file(str(CKPT), subfolder="vae", **kw).eval().to(device)
        self.text_encoder = load_diffusers_text(dtype).to(device)
        self.dtype, self.device = dtype, device
        torch.set_grad_enabled(False)

    def text(self):
        import torch

        with torch.no_grad():  # diffusers' encode_prompt: cond and uncond as two batch-1 calls
            return tuple(self.text_encoder(token_ids(s).to(self.device))[0].float() for s in (PROMPT, NEGATIVE))

    def unet_step(self, x, t, ctx):
        import torch

        with torch.no_grad():
            x, t, ctx = x.to(self.device, self.dtype), t.to(self.device), ctx.to(self.device, self.dtype)
            return self.unet(x, t, encoder_hidden_states=ctx).sample.float()

    def decode(self, z):
        import torch

        with torch.no_grad():
            return self.vae.decode(z.to(self.device, self.dtype)).sample.float()

    def image(self, size: int, steps: int, vae_fp32: bool = False):
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=None, unet=self.unet,
                                       scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        cond, uncond = self.text()
        gen = torch.Generator("cpu").manual_seed(SEED)
        out = pipe(prompt_embeds=cond.to(self.dtype), negative_prompt_embeds=uncond.to(self.dtype), height=size,
                   width=size, num_inference_steps=steps, guidance_scale=7.0, generator=gen, output_type="pt")
        return out.images


def write_diffusers_configs() -> Path:
    folder = BENCH / "diffusers-sd15"
    for name, cfg in (("unet", UNET_CONFIG), ("vae", VAE_CONFIG)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(cfg))
    return folder


def load_diffusers_text(dtype):
    """CLIPTextModel from a local config; SD1 keys are HF keys under cond_stage_model.transformer. (what
    diffusers' single-file converter does for SD1: strip the prefix)."""
    import torch
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    prefix = "cond_stage_model.transformer.text_model."  # transformers 5's CLIPTextModel has no text_model level
    with safe_open(str(CKPT), framework="pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(prefix)}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    model.load_state_dict(state, strict=False, assign=True)
    model.embeddings.position_ids = torch.arange(77)[None]  # a buffer, not in SD1 files
    return model.eval()


def inputs(size: int, batch: int = 2):
    import torch

    g = torch.Generator("cpu").manual_seed(0)
    lat = size // 8
    x = torch.randn(batch, 4, lat, lat, generator=g)
    ctx = torch.randn(batch, 77, 768, generator=g)
    return x, torch.full((batch,), 500.0), ctx, torch.randn(1, 4, lat, lat, generator=g)


def run_worker(a) -> dict:
    """One side, one dtype: load, text, UNet step, VAE decode, image; prints a JSON line."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    t0 = time.perf_counter()
    side = (SdcliSide if a.worker == "sdcli" else DiffusersSide)(dtype)
    res = {"load": time.perf_counter() - t0, "rss_load": peak_rss_gb(), "threads": torch.get_num_threads(),
           "capability": torch.backends.cpu.get_cpu_capability()}
    res["text"], _ = timed(side.text, a.reps, warmup=1)
    x, t, ctx, z = inputs(a.size)
    if a.unet_reps:
        res["unet"], eps = timed(lambda: side.unet_step(x, t, ctx), a.unet_reps, warmup=a.warmup)
        torch.save(eps, BENCH / f"eps-{a.worker}-{a.dtype}-{a.size}.pt")
    if a.vae_reps:
        res["vae"], _ = timed(lambda: side.decode(z), a.vae_reps)
    if a.image_steps:
        t1 = time.perf_counter()
        img = side.image(a.size, a.image_steps, vae_fp32=a.latents_only)
        res["image"] = time.perf_counter() - t1
        torch.save(img, BENCH / f"image-{a.worker}-{a.dtype}-{a.size}-{a.image_steps}.pt")
    res["rss"] = peak_rss_gb()
    return res


# ----------------------------------------------------------------------------------------------- main side
def worker(side: str, dtype: str, size: int, env: dict | None = None, **kw) -> dict:
    args = [sys.executable, __file__, "--worker", side, "--dtype", dtype, "--size", str(size)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    print(f"  running {side} {dtype} {size}px {kw} {env or ''} ...", file=sys.stderr, flush=True)
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"worker {side} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_peak(dtype_name: str, n: int = 1024, reps: int = 3) -> float:
    """GFLOP/s of a square matmul (best of `reps`): the 'measured matmul peak' of this machine, this moment."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, 1)[0] for _ in range(reps))
    return 2 * n**3 / best / 1e9


def unet_gflop(size: int) -> float:
    """UNet forward FLOPs at batch 2 (CFG), counted by torch's FlopCounterMode on meta tensors (no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdcli.models.unet import UNetConfig, UNetModel

    with torch.device("meta"):
        unet = UNetModel(UNetConfig())
        x, ctx, t = torch.randn(2, 4, size // 8, size // 8), torch.randn(2, 77, 768), torch.full((2,), 500.0)
        with FlopCounterMode(display=False) as fc:
            unet(x, t, ctx)
    return fc.get_total_flops() / 1e9


def vae_gflop(size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sdcli.models.vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
        with FlopCounterMode(display=False) as fc:
            vae.decode(torch.randn(1, 4, size // 8, size // 8))
    return fc.get_total_flops() / 1e9


def cli_times(size: int, steps: int, reps: int) -> dict:
    sdcli = str(Path(sys.executable).with_name("sdcli"))
    help_t = statistics.median(_wall([sdcli, "--help"]) for _ in range(reps))
    out = BENCH / "ttfi.png"
    cmd = [sdcli, "generate", PROMPT, "--model", str(CKPT), "-W", str(size), "-H", str(size), "--steps", str(steps),
           "--seed", str(SEED), "-o", str(out), "--overwrite", "-q", "--dtype", "fp32"]  # fmt: skip
    return {"help": help_t, "ttfi": _wall(cmd)}


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t


def psnr(a, b) -> float:
    import torch

    a, b = a.float().clamp(-1, 1), b.float().clamp(-1, 1)
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # range [-1, 1] -> 2


MODES = {  # worker settings per mode; the whole image is measured in full mode, extrapolated in quick mode
    "full": dict(size=512, steps=20, fp32=dict(reps=3, unet_reps=3, warmup=1, vae_reps=2, image_steps=20)),
    "quick": dict(size=256, steps=20, fp32=dict(reps=2, unet_reps=1, warmup=1, vae_reps=1, image_steps=0)),
}
BF16 = dict(reps=1, unet_reps=1, warmup=0, vae_reps=0, image_steps=0)  # UNet step + text only: see BF16_SIZE
BF16_SIZE = 64  # bf16 convolutions run at ~0.24 GFLOP/s on CPUs without native bf16: a tiny shape, labelled


def flops(size: int) -> dict:
    """Counted once per size and cached in .bench/ (counting builds the models on meta: ~10 s here)."""
    cache = BENCH / f"flops-{size}.json"
    if not cache.exists():
        cache.write_text(json.dumps({"unet": unet_gflop(size), "vae": vae_gflop(size),
                                     "unet_bf16": unet_gflop(BF16_SIZE)}))  # fmt: skip
    return json.loads(cache.read_text())


def collect(a) -> dict:
    mode = MODES["quick" if a.quick else "full"]
    size, run_bf16 = mode["size"], a.bf16 or not a.quick
    r = {"mode": "quick" if a.quick else "full", "size": size, "steps": mode["steps"]}
    r["peak"] = {d: gemm_peak(d) for d in ("fp32", "bf16")}
    r["gflop"] = flops(size)
    for side in ("sdcli", "diffusers"):
        r[f"{side}-fp32"] = worker(side, "fp32", size, **mode["fp32"])
        if run_bf16:
            r[f"{side}-bf16"] = worker(side, "bf16", BF16_SIZE, **BF16)
    if run_bf16:  # the fp32 reference at the bf16 shape, for the quality guard
        r["sdcli-fp32-small"] = worker("sdcli", "fp32", BF16_SIZE, **BF16)
    r["cli"] = cli_times(size, 1 if a.quick else mode["steps"], reps=3)
    if run_bf16:
        import torch

        eps = {d: torch.load(BENCH / f"eps-sdcli-{d}-{BF16_SIZE}.pt") for d in ("fp32", "bf16")}
        scale = eps["fp32"].abs().max().item()
        r["psnr_unet_bf16"] = psnr(eps["bf16"] / scale, eps["fp32"] / scale)
    return r


# --bf16-full: everything in the CPU's default dtype (bf16 where it is native) at 512x512, sdcli vs diffusers in
# the same run, plus the fp32 image of the same seed for the quality guard. ~10-12 min on 2 Zen 4/5 cores.
BF16_FULL = dict(reps=2, unet_reps=2, warmup=1, vae_reps=1, image_steps=20)


def cpu_name() -> str:
    """Model name with family/model numbers (an "AMD EPYC" alone does not say Zen 3, 4 or 5)."""
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name", platform.processor())
    return f"{name} (cpu family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def cold_render_rss(size: int, steps: int, dtype: str, model: Path = CKPT, out: Path = BENCH / "render-rss.png",
                    images: int = 1, env: dict | None = None) -> dict:
    """Wall time and peak RSS of a cold `sdcli generate` (its own process: every stage, as a user runs it)."""
    sdcli = str(Path(sys.executable).with_name("sdcli"))
    cmd = [sdcli, "generate", PROMPT, "--model", str(model), "-W", str(size), "-H", str(size), "--steps", str(steps),
           "--seed", str(SEED), "-n", str(images), "-o", str(out), "--overwrite", "-q", "--dtype", dtype]  # fmt: skip
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"sdcli generate failed ({env or ''}):\n{res.stderr[-3000:]}")
    wall, kib = res.stdout.split()
    return {"wall": float(wall), "rss": int(kib) / 1e6, "steps": steps}


def collect_bf16_full(a) -> dict:
    import torch

    from sdcli.runtime.device import auto_dtype, cpu_has_native_bf16

    if not cpu_has_native_bf16():
        raise SystemExit("--bf16-full needs a CPU with native bf16 (AVX512-BF16 or AMX): bf16 is emulated here, "
                         "~200x slower; use --quick --bf16")
    size, steps = a.size or 512, a.steps or 20
    dtype = auto_dtype("cpu")
    r = {"mode": "bf16-full", "size": size, "steps": steps, "dtype": dtype, "cpu": cpu_name(),
         "threads": torch.get_num_threads()}
    r["peak"] = {d: gemm_peak(d, n=2048, reps=3) for d in ("fp32", "bf16")}
    r["gflop"] = flops(size)
    run = dict(BF16_FULL, image_steps=steps)
    for side in ("sdcli", "diffusers"):
        r[f"{side}-{dtype}"] = worker(side, dtype, size, **run)
    # the channels_last lever (sdcli/models/layout.py) switched off, after diffusers: UNet step and VAE decode
    r["sdcli-contiguous"] = worker("sdcli", dtype, size, env={"SDCLI_CPU_CHANNELS_LAST": "0"}, reps=1, unet_reps=2,
                                   warmup=1, vae_reps=1, image_steps=0)  # fmt: skip
    r["sdcli-fp32-image"] = worker("sdcli", "fp32", size, reps=1, unet_reps=0, warmup=0, vae_reps=0, image_steps=steps)
    r["render"] = cold_render_rss(size, min(steps, 2), dtype)  # peak RSS does not grow with the step count
    img = {k: torch.load(BENCH / f"image-{k}-{size}-{steps}.pt") for k in (f"sdcli-{dtype}", "sdcli-fp32")}
    r["psnr_image"] = psnr(img[f"sdcli-{dtype}"], img["sdcli-fp32"])  # sdcli's images are in [-1, 1]
    return r


# torch's own kernels, oneDNN's and MKL's (torch's fp32 GEMM), capped at AVX2: an AVX-512 machine then runs the
# kernels a Zen 3 runs
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def collect_avx2(a) -> dict:
    """fp32 UNet step and VAE decode, sdcli vs diffusers, with the kernels capped at AVX2 (issue 17's AVX2 target,
    measured where no AVX2-only CPU is at hand), interleaved twice: sdcli, diffusers, sdcli, diffusers."""
    import torch

    size = a.size or 512
    r = {"mode": "avx2-fp32", "size": size, "cpu": cpu_name(), "threads": torch.get_num_threads(), "gflop": flops(size)}
    probe = "import sys; sys.path.insert(0, 'scripts'); import bench; print(bench.gemm_peak('fp32', 2048, 3))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **AVX2_ENV}, check=True)  # fmt: skip
    r["peak"] = float(out.stdout.split()[-1])
    run = dict(reps=1, unet_reps=2, warmup=1, vae_reps=1, image_steps=0)
    for k in range(2):
        for side in ("sdcli", "diffusers"):
            r[f"{side}-{k}"] = worker(side, "fp32", size, env=AVX2_ENV, **run)
    return r


def render_avx2(r: dict) -> str:
    best = {side: {key: min(r[f"{side}-{k}"][key] for k in range(2)) for key in ("unet", "vae", "load", "rss")}
            for side in ("sdcli", "diffusers")}  # fmt: skip
    s, d, sz = best["sdcli"], best["diffusers"], r["size"]
    eff = lambda gf, t: f"{100 * gf / t / r['peak']:.0f}%"  # noqa: E731
    rows = [["UNet step, CFG batch 2", f"{sz}px", fmt(s["unet"]), fmt(d["unet"]), ratio(s["unet"], d["unet"]),
             eff(r["gflop"]["unet"], s["unet"])],
            ["VAE decode", f"{sz}px", fmt(s["vae"]), fmt(d["vae"]), ratio(s["vae"], d["vae"]),
             eff(r["gflop"]["vae"], s["vae"])],
            ["load to ready (fp16 file -> fp32)", "-", fmt(s["load"]), fmt(d["load"]), ratio(s["load"], d["load"]), ""],
            ["peak RSS of the process", f"{sz}px", fmt(s["rss"], "GB"), fmt(d["rss"], "GB"), ratio(s["rss"], d["rss"]),
             ""]]  # fmt: skip
    head = ["what (fp32, AVX2 kernels)", "shape", "sdcli", "diffusers", "sdcli speed-up", "sdcli % of AVX2 fp32 peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
    caps = sorted({r[f"{side}-{k}"]["capability"] for side in ("sdcli", "diffusers") for k in range(2)})
    notes = [f"CPU: {r['cpu']}, {r['threads']} threads, kernels capped with {AVX2_ENV} (torch reported "
             f"{', '.join(caps)}). fp32 GEMM peak under the cap (2048^3, best of 3): {r['peak']:.0f} GFLOP/s.",
             "Interleaved: sdcli, diffusers, sdcli, diffusers, each its own process; each cell the better of its two "
             "runs (UNet step: median of 2 after a warm-up). An emulation: the cores, caches and clocks are this "
             "CPU's, only the instruction set is AVX2's; a real AVX2-only CPU (Zen 3) may differ."]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def render_bf16_full(r: dict) -> str:
    dt, sz, n = r["dtype"], r["size"], r["steps"]
    s, d, c, pk = r[f"sdcli-{dt}"], r[f"diffusers-{dt}"], r["sdcli-contiguous"], r["peak"][dt]
    eff = lambda gf, t: f"{100 * gf / t / pk:.0f}%"  # noqa: E731
    head = ["what", "shape", f"sdcli {dt}", f"diffusers {dt}", "sdcli speed-up", f"sdcli % of {dt} GEMM peak"]
    rows = [
        ["load to ready (fp16 file)", "-", fmt(s["load"]), fmt(d["load"]), ratio(s["load"], d["load"]), ""],
        ["text encoding (cond + uncond)", "77 tok", fmt(s["text"]), fmt(d["text"]), ratio(s["text"], d["text"]), ""],
        ["UNet step, CFG batch 2", f"{sz}px", fmt(s["unet"]), fmt(d["unet"]), ratio(s["unet"], d["unet"]),
         eff(r["gflop"]["unet"], s["unet"])],
        ["VAE decode", f"{sz}px", fmt(s["vae"]), fmt(d["vae"]), ratio(s["vae"], d["vae"]), eff(r["gflop"]["vae"], s["vae"])],
        [f"whole image, {n} steps euler (measured, after load)", f"{sz}px", fmt(s["image"]), fmt(d["image"]),
         ratio(s["image"], d["image"]), ""],
        ["peak RSS of that process", f"{sz}px", fmt(s["rss"], "GB"), fmt(d["rss"], "GB"), ratio(s["rss"], d["rss"]), ""],
        ["lever off: sdcli contiguous (SDCLI_CPU_CHANNELS_LAST=0): UNet step / VAE decode", f"{sz}px",
         f"{fmt(c['unet'])} / {fmt(c['vae'])}", "", f"{ratio(c['unet'], d['unet'])} / {ratio(c['vae'], d['vae'])}", ""],
        [f"peak RSS of a cold `sdcli generate --dtype {dt}` ({r['render']['steps']} steps, {fmt(r['render']['wall'])})",
         f"{sz}px", fmt(r["render"]["rss"], "GB"), "", "", ""],
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
    notes = [
        f"CPU: {r['cpu']}, {r['threads']} threads. GEMM peak (2048^3 matmul, best of 3, this run): "
        f"fp32 {r['peak']['fp32']:.0f} GFLOP/s, bf16 {r['peak']['bf16']:.0f} GFLOP/s.",
        f"FLOPs (torch FlopCounterMode): UNet batch 2 at {sz}px {r['gflop']['unet']:.0f} GFLOP, VAE decode "
        f"{r['gflop']['vae']:.0f} GFLOP. Speed-up = diffusers time / sdcli time; for RSS, diffusers GB / sdcli GB.",
        "Order of the runs: sdcli, diffusers, sdcli contiguous, sdcli fp32 image, cold CLI render; each in its own "
        "process. UNet step: median of 2 after a warm-up; VAE decode: one run. A quiet machine only: the ratios "
        "move +-20% when other jobs share the cores.",
        f"Quality guard (whole image, same seed, same checkpoint): sdcli {dt} vs sdcli fp32 PSNR "
        f"{r['psnr_image']:.1f} dB.",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"


def whole_image(w: dict, steps: int) -> tuple[float, str]:
    if "image" in w:
        return w["image"], "measured"
    return w["text"] + steps * w["unet"] + w["vae"], "extrapolated: text + steps x UNet step + VAE decode"


def fmt(x: float | None, unit: str = "s") -> str:
    return "n/a" if x is None else (f"{x:.2f} {unit}" if x < 100 else f"{x:.0f} {unit}")


def ratio(ours: float | None, peer: float | None) -> str:
    return "n/a" if not ours or not peer else f"{peer / ours:.2f}x"


def rows_fp32(r: dict) -> list[list[str]]:
    s, d, sz, n = r["sdcli-fp32"], r["diffusers-fp32"], r["size"], r["steps"]
    pk = r["peak"]["fp32"]
    eff = lambda gf, t: f"{100 * gf / t / pk:.0f}%"  # noqa: E731
    si, how = whole_image(s, n)
    di, _ = whole_image(d, n)
    return [
        ["load to ready (fp16 file -> fp32)", "-", fmt(s["load"]), fmt(d["load"]), ratio(s["load"], d["load"]), ""],
        ["text encoding (cond + uncond)", "77 tok", fmt(s["text"]), fmt(d["text"]), ratio(s["text"], d["text"]), ""],
        ["UNet step, CFG batch 2", f"{sz}px", fmt(s.get("unet")), fmt(d.get("unet")), ratio(s.get("unet"), d.get("unet")),
         eff(r["gflop"]["unet"], s["unet"])],
        ["VAE decode", f"{sz}px", fmt(s.get("vae")), fmt(d.get("vae")), ratio(s.get("vae"), d.get("vae")),
         eff(r["gflop"]["vae"], s["vae"])],
        [f"whole image, {n} steps euler ({how})", f"{sz}px", fmt(si), fmt(di), ratio(si, di), ""],
        ["peak RSS of that process", f"{sz}px", fmt(s["rss"], "GB"), fmt(d["rss"], "GB"), ratio(s["rss"], d["rss"]), ""],
    ]  # fmt: skip


def rows_bf16(r: dict) -> list[list[str]]:
    if "sdcli-bf16" not in r:
        return []
    s, d, pk = r["sdcli-bf16"], r["diffusers-bf16"], r["peak"]["bf16"]
    return [
        ["bf16 load to ready", "-", fmt(s["load"]), fmt(d["load"]), ratio(s["load"], d["load"]), ""],
        ["bf16 text encoding", "77 tok", fmt(s["text"]), fmt(d["text"]), ratio(s["text"], d["text"]), ""],
        ["bf16 UNet step, CFG batch 2", f"{BF16_SIZE}px", fmt(s["unet"]), fmt(d["unet"]), ratio(s["unet"], d["unet"]),
         f"{100 * r['gflop']['unet_bf16'] / s['unet'] / pk:.0f}% (bf16)"],
        ["bf16 peak RSS", f"{BF16_SIZE}px", fmt(s["rss"], "GB"), fmt(d["rss"], "GB"), ratio(s["rss"], d["rss"]), ""],
    ]  # fmt: skip


def render(r: dict) -> str:
    head = ["what", "shape", "sdcli", "diffusers (same dtype)", "sdcli speed-up", "sdcli % of matmul peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows_fp32(r) + rows_bf16(r)]
    c = r["cli"]
    lines.append(f"| `sdcli --help` (cold process, median of 3) | - | {fmt(c['help'])} | | | |")
    steps = 1 if r["mode"] == "quick" else r["steps"]
    lines.append(f"| first image from a cold `sdcli generate` ({steps} step(s), fp32) | {r['size']}px | "
                 f"{fmt(c['ttfi'])} | | | |")
    notes = [
        f"Measured matmul peak (1024^3 GEMM, best of 3, this run): fp32 {r['peak']['fp32']:.1f} GFLOP/s, "
        f"bf16 {r['peak']['bf16']:.2f} GFLOP/s.",
        f"FLOPs (torch FlopCounterMode): UNet batch 2 at {r['size']}px {r['gflop']['unet']:.0f} GFLOP "
        f"(at {BF16_SIZE}px {r['gflop']['unet_bf16']:.1f}); VAE decode {r['gflop']['vae']:.0f} GFLOP.",
        "Speed-up = diffusers time / sdcli time (>1: sdcli faster); for RSS, diffusers GB / sdcli GB.",
    ]
    if "psnr_unet_bf16" in r:
        notes.append(f"Quality guard: the default dtype here is fp32 (no native bf16), so default-vs-fp32 PSNR is "
                     f"inf by construction; bf16 vs fp32 UNet output, same input ({BF16_SIZE}px): "
                     f"PSNR {r['psnr_unet_bf16']:.1f} dB (peak = max |eps| of the fp32 output).")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def machine() -> str:
    import torch

    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            have = set(line.split(":", 1)[1].split())
            keys = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
            flags = " ".join(f"{k}{'+' if k in have else '-'}" for k in keys)
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, flags {flags}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}); "
            f"{datetime.date.today().isoformat()}")


def controlnet_cost(size: int = 512, reps: int = 3, preset: str = "full", threads: int | None = None) -> dict:
    """One ControlNet unit per sampling step (a CFG batch of 2, fp32), sdcli's ControlNet vs diffusers'
    ControlNetModel on the same random SD1.5-shaped weights, in this process: the extra cost a unit adds to each
    UNet step. Also the residuals' largest difference, so a fast wrong network cannot pass."""
    import torch
    from diffusers import ControlNetModel

    sys.path.insert(0, str(ROOT / "scripts"))
    from make_checkpoint import controlnet_config, controlnet_diffusers_config, controlnet_state_dict, \
        controlnet_to_diffusers  # fmt: skip
    from sdcli.models.controlnet import ControlNet

    if threads:
        torch.set_num_threads(threads)
    cfg = controlnet_config("sd1", preset)
    state = controlnet_state_dict(cfg, seed=0)
    ours = ControlNet(cfg).eval()
    ours.load_state_dict(state, strict=True)
    config = {k: v for k, v in controlnet_diffusers_config(cfg).items() if not k.startswith("_")}
    ref = ControlNetModel(**config).eval()
    ref.load_state_dict(controlnet_to_diffusers(state, cfg), strict=True)
    del state
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=gen)
    hint = torch.rand(2, 3, size, size, generator=gen)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=gen)
    with torch.inference_mode():
        ours_s, (down, mid) = timed(lambda: ours(x, hint, t, ctx), reps, warmup=1)
        ref_s, (rdown, rmid) = timed(lambda: ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                                                 return_dict=False), reps, warmup=1)  # fmt: skip
    err = max(float((a - b).abs().max()) for a, b in zip([*down, mid], [*rdown, rmid]))
    return {"size": size, "preset": preset, "threads": torch.get_num_threads(), "sdcli_s": ours_s,
            "diffusers_s": ref_s, "max_abs_diff": err}


def render_controlnet(r: dict) -> str:
    return (f"ControlNet unit, one CFG step (batch 2, {r['size']}x{r['size']}, fp32, {r['preset']}, "
            f"{r['threads']} threads): sdcli {r['sdcli_s'] * 1e3:.1f} ms, diffusers {r['diffusers_s'] * 1e3:.1f} ms "
            f"({ratio(r['sdcli_s'], r['diffusers_s'])}); residuals differ by at most {r['max_abs_diff']:.2g}\n")


def taesd_vs_vae(sizes=(512, 1024), dtype_name: str = "fp32", reps: int = 3) -> str:
    """A markdown table: one image decoded by TAESD and by SD's full VAE (random weights of the real shapes:
    the time does not depend on the values) at each size, in this process, on the CPU (or CUDA when present)."""
    import torch

    from sdcli.models.taesd import TinyAutoencoder, TinyDecoder
    from sdcli.models.vae import AutoencoderKL, VAEConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    full = AutoencoderKL(VAEConfig()).to(device, dtype).eval()
    tiny = TinyAutoencoder(None, TinyDecoder(), 4).to(device, dtype).eval()
    rows = ["| size | full VAE decode | TAESD decode | speed-up |", "|---|---|---|---|"]
    for size in sizes:
        z = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=dtype)

        def run(vae):
            with torch.inference_mode():
                out = vae.decode(z)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        t_full, _ = timed(lambda: run(full), reps, warmup=1)
        t_tiny, _ = timed(lambda: run(tiny), reps, warmup=1)
        rows.append(f"| {size}x{size} | {fmt(t_full)} | {fmt(t_tiny)} | {t_full / t_tiny:.1f}x |")
    return f"TAESD vs full VAE, one image, {dtype_name} on {device} (median of {reps}):\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes, whole image extrapolated (~2-4 min)")
    p.add_argument("--bf16", action="store_true", help="also run the bf16 sides in quick mode")
    p.add_argument("--bf16-full", action="store_true",
                   help="bf16-native CPUs: 512x512 in the default dtype vs diffusers, the fp32 image as quality guard")
    p.add_argument("--avx2", action="store_true",
                   help="fp32 UNet step and VAE decode vs diffusers with the kernels capped at AVX2 (~6 min)")
    p.add_argument("--size", type=int, help="--bf16-full / --avx2: image side (default 512; small only to rehearse)")
    p.add_argument("--steps", type=int, help="--bf16-full: sampling steps (default 20)")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--controlnet", action="store_true",
                   help="only the cost of one ControlNet unit per step vs diffusers (--size, default 512)")
    p.add_argument("--controlnet-preset", default="full", choices=["full", "tiny"], help=argparse.SUPPRESS)
    p.add_argument("--taesd", action="store_true", help="only time a TAESD decode against the full VAE's")
    p.add_argument("--taesd-sizes", default="512,1024", help="image sizes for the TAESD table (comma-separated)")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    taesd_table = lambda: taesd_vs_vae(tuple(int(s) for s in a.taesd_sizes.split(",")))  # noqa: E731
    if a.taesd:
        table = taesd_table()
        print(table)
        if not a.no_docs:
            write_section("taesd", f"## TAESD decode\n\nMachine: {machine()}\n\n{table}")
        return
    if a.controlnet:
        r = controlnet_cost(a.size or 512, preset=a.controlnet_preset)
        print(render_controlnet(r), end="")
        if not a.no_docs:
            write_section("bench-controlnet", f"## ControlNet unit per step\n\nMachine: {machine()}\n\n"
                                              f"{render_controlnet(r)}")  # fmt: skip
        return
    ensure_checkpoint()
    t0 = time.perf_counter()
    r = collect_bf16_full(a) if a.bf16_full else collect_avx2(a) if a.avx2 else collect(a)
    (BENCH / f"results-{r['mode']}-{r['size']}.json").write_text(json.dumps(r, indent=1))
    table = render_bf16_full(r) if a.bf16_full else render_avx2(r) if a.avx2 else render(r)
    print(table)
    print(f"({r['mode']} mode, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if not a.no_docs:
        write_docs(r, table)
    if a.avx2:  # the TAESD table runs in this process, uncapped: it belongs to the other modes
        return
    tiny = taesd_table()
    print(tiny)
    if not a.no_docs:
        write_section("taesd", f"## TAESD decode\n\nMachine: {machine()}\n\n{tiny}")


def write_docs(r: dict, table: str) -> None:
    marker = {"bf16-full": "bench-bf16", "avx2-fp32": "bench-avx2"}.get(r["mode"], "bench")
    write_section(marker, f"## Latest run ({r['mode']} mode)\n\nMachine: {machine()}\n\n{table}")


def write_section(marker: str, body: str) -> None:
    """Replace the generated section `marker` of docs/benchmarks.md, keep the hand-written rest."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    section = f"{start}\n{body}{end}"
    text = DOCS.read_text() if DOCS.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    DOCS.write_text(before + section + rest.split(end, 1)[1])


if __name__ == "__main__" and "--worker" in sys.argv:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["sdcli", "diffusers"])
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--unet-reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vae-reps", type=int, default=1)
    p.add_argument("--image-steps", type=int, default=0)
    p.add_argument("--latents-only", action="store_true")
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_worker(p.parse_args())))
    sys.exit(0)


if __name__ == "__main__":
    main()
