"""sdcli vs diffusers' StableDiffusionXLPipeline on a full-size random SDXL base checkpoint, in the same run.

    python scripts/bench_sdxl.py                  # full mode: 1024x1024, a 4-step image, Turbo 512x512 1 step
    python scripts/bench_sdxl.py --steps 20       # the same with a 20-step image
    python scripts/bench_sdxl.py --tiny --size 64 --steps 2 --no-docs   # rehearsal: the tiny SDXL preset (~15 s)

Each side runs in its own process (`--worker`), in this CPU's best dtype (bf16 on bf16-native CPUs, else fp32,
as `--dtype auto` picks): load to ready from the fp16 file, one UNet CFG step (batch 2) at SIZE, an N-step euler
image (text, sampling, VAE decode; measured), a Turbo-shaped image at SIZE/2 (euler_a, trailing, 1 step, cfg 0:
one UNet call), peak RSS of the process. The quality guard renders the same seed with sdcli in that dtype and in
fp32 at --guard-size (fp32 at 1024 is slow on a CPU: the table says which size) and gives the PSNR.
The checkpoint (.bench/sdxl-full-fp16.safetensors, ~7 GB) is made once, tensor by tensor straight to disk.
bench.py's helpers (timing, RSS, PSNR, CPU name, docs section) are imported, not copied.

Time here (AMD EPYC Zen 4, AVX512-BF16, 2 threads, bf16, quiet; docs/benchmarks.md): the checkpoint 32 s once;
`--steps 1` took 485 s in all (sdcli: load 9.2 s, a 1024px UNet CFG step 41.6 s; diffusers: load 42.3 s, step
42.3 s; the guard at 256px). The default 4 steps adds ~6 min; --steps 20 ~50 min. Peak RSS of the workers (every
part kept, as `load_models` does by default): sdcli 8.8 GB, diffusers 21.7 GB (its single-file loader holds the
whole state dict beside the models): on a 24 GiB box run nothing else. A cold `sdcli generate` (lean residency)
peaks at 5.8 GB: scripts/bench_memory.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import BENCH, cpu_name, fmt, gemm_peak, machine, peak_rss_gb, psnr, ratio, timed, write_section  # noqa: E402

PROMPT, NEGATIVE, SEED, CFG = "a photo of a cat, highly detailed", "blurry", 1, 5.0
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          prediction_type="epsilon")  # fmt: skip


def checkpoint_path(preset: str) -> Path:
    return BENCH / f"sdxl-{preset}-fp16.safetensors"


# ----------------------------------------------------------------------------------------------- the checkpoint
def write_random_checkpoint(out: Path, family: str = "sdxl", size: str = "full", seed: int = 0) -> Path:
    """make_checkpoint's random SDXL file in fp16, the same tensors (same keys, same generator order), written
    one tensor at a time: make_checkpoint builds the whole state dict first (~21 GB for SDXL in fp32 + fp16)."""
    import torch
    from make_checkpoint import _random, ldm_shapes

    shapes = ldm_shapes(family, size)
    keys = sorted(shapes)
    dtype_of = {k: ("I64", 8) if k.endswith("position_ids") else ("F16", 2) for k in keys}
    header, offset = {"__metadata__": {"format": "pt", "sdcli.random_seed": str(seed)}}, 0
    for k in keys:
        n = dtype_of[k][1]
        for s in shapes[k]:
            n *= s
        header[k] = {"dtype": dtype_of[k][0], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in keys:
            t = _random(k, shapes[k], gen)
            t = t if k.endswith("position_ids") else t.to(torch.float16)
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    part.rename(out)
    return out


def ensure_checkpoint(preset: str) -> Path:
    path = checkpoint_path(preset)
    if not path.exists():
        t = time.perf_counter()
        write_random_checkpoint(path, "sdxl", preset)
        print(f"  made {path.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def write_diffusers_config(preset: str) -> Path:
    """A local config folder (no weights, no tokenizers: the diffusers side gets token ids from our tokenizer,
    as bench.py's SD1.5 side does) so from_single_file runs offline."""
    from make_checkpoint import clip_config, sdxl_preset, unet_diffusers_config, vae_diffusers_config

    unet, vae, text_l, text_g = sdxl_preset("sdxl", preset)
    out = BENCH / f"diffusers-sdxl-{preset}"
    configs = {"unet/config.json": unet_diffusers_config(unet, "sdxl", text_g.projection_dim),
               "vae/config.json": {**vae_diffusers_config(vae), "force_upcast": True},
               "scheduler/scheduler_config.json": {"_class_name": "EulerDiscreteScheduler", **SD},
               "model_index.json": {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                                    "unet": ["diffusers", "UNet2DConditionModel"],
                                    "vae": ["diffusers", "AutoencoderKL"],
                                    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                                    "text_encoder": ["transformers", "CLIPTextModel"],
                                    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                                    "tokenizer": [None, None], "tokenizer_2": [None, None]}}  # fmt: skip
    for name, cfg in configs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(cfg))
    for name, cfg, cls in (("text_encoder", text_l, "CLIPTextModel"),
                           ("text_encoder_2", text_g, "CLIPTextModelWithProjection")):  # fmt: skip
        clip = clip_config(cfg)
        clip.architectures = [cls]
        (out / name).mkdir(exist_ok=True)
        clip.to_json_file(str(out / name / "config.json"))
    return out


# ----------------------------------------------------------------------------------------------- the two sides
class SdcliSide:
    def __init__(self, ckpt: Path, dtype):
        from sdcli.loading import checkpoint

        self.models = checkpoint.load_models(ckpt, dtype=dtype)
        self.dtype = dtype

    def text(self, negative: str | None = NEGATIVE):
        from sdcli import pipeline

        return pipeline.encode_text(self.models, PROMPT, negative)

    def unet_step(self, x, t, ctx, pooled, size: int):
        import torch

        from sdcli.models.unet import sdxl_vector

        y = sdxl_vector(pooled, (size, size, 0, 0, size, size), self.models.unet.config.adm_in_channels)
        with torch.inference_mode():
            return self.models.unet(x.to(self.dtype), t, ctx.to(self.dtype), y=y.to(self.dtype)).float()

    def image(self, size: int, steps: int, turbo: bool = False):
        from sdcli import pipeline
        from sdcli.app.refine import sized
        from sdcli.config import RunConfig

        cond, uncond = self.text(None if turbo else NEGATIVE)
        cond, uncond = sized(self.models, RunConfig(), (cond, uncond), (size, size))
        plan = self.plan(steps, turbo)
        lat = pipeline.txt2img(self.models, plan, cond, uncond, [SEED], size, size)
        return pipeline.decode_latents(self.models, lat).images  # (1, 3, H, W) in [-1, 1]

    def plan(self, steps: int, turbo: bool):
        from sdcli import pipeline

        if turbo:
            return pipeline.make_plan("euler_a", "trailing", steps, cfg=0.0, family=self.models.family)
        return pipeline.make_plan("euler", "karras", steps, cfg=CFG, family=self.models.family)


class DiffusersSide:
    def __init__(self, ckpt: Path, dtype, preset: str):
        import torch
        from diffusers import StableDiffusionXLPipeline

        self.pipe = StableDiffusionXLPipeline.from_single_file(
            str(ckpt), config=str(write_diffusers_config(preset)), local_files_only=True, torch_dtype=dtype,
            tokenizer=None, tokenizer_2=None, add_watermarker=False)  # fmt: skip
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = dtype
        torch.set_grad_enabled(False)

    def _encode(self, text: str):
        """diffusers' encode_prompt given token ids: both penultimate states concatenated, bigG's projection."""
        import torch

        from sdcli.text.clip_tokenizer import get_tokenizer

        ids = get_tokenizer().encode(text)[:75]
        rows = [[49406] + ids + [49407] + [pad] * (75 - len(ids)) for pad in (49407, 0)]  # CLIP-L / bigG padding
        out_l = self.pipe.text_encoder(torch.tensor([rows[0]]), output_hidden_states=True)
        out_g = self.pipe.text_encoder_2(torch.tensor([rows[1]]), output_hidden_states=True)
        return torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], -1), out_g.text_embeds

    def text(self, negative: str | None = NEGATIVE):
        cond = self._encode(PROMPT)
        return cond, (None if negative is None else self._encode(negative))

    def unet_step(self, x, t, ctx, pooled, size: int):
        import torch

        ids = torch.tensor([[size, size, 0, 0, size, size]] * x.shape[0], dtype=self.dtype)
        d = self.dtype
        out = self.pipe.unet(x.to(d), t, encoder_hidden_states=ctx.to(d),
                             added_cond_kwargs={"text_embeds": pooled.to(d), "time_ids": ids})  # fmt: skip
        return out.sample.float()

    def image(self, size: int, steps: int, turbo: bool = False):
        import torch
        from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

        (pe, pp), neg = self.text(None if turbo else NEGATIVE)
        kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pp, height=size, width=size, output_type="pt",
                  generator=torch.Generator().manual_seed(SEED))  # fmt: skip
        if turbo:
            self.pipe.scheduler = EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")
            kw.update(guidance_scale=0.0, num_inference_steps=steps)
        else:  # sdcli's karras sigmas, given to diffusers' Euler (tests/test_sdxl.py's convention)
            self.pipe.scheduler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
            sigmas = karras_sigmas(steps)
            kw.update(guidance_scale=CFG, negative_prompt_embeds=neg[0], negative_pooled_prompt_embeds=neg[1],
                      sigmas=sigmas)  # fmt: skip
        return self.pipe(**kw).images * 2 - 1  # [0, 1] -> [-1, 1], as sdcli's


def karras_sigmas(steps: int) -> list[float]:
    from sdcli import pipeline
    from sdcli.families import by_name

    return pipeline.make_plan("euler", "karras", steps, cfg=CFG, family=by_name("sdxl")).sigmas.tolist()


def step_inputs(preset: str, size: int, batch: int = 2):
    import torch
    from make_checkpoint import sdxl_preset

    unet, _vae, _l, text_g = sdxl_preset("sdxl", preset)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size // 8, size // 8, generator=g)
    ctx = torch.randn(batch, 77, unet.context_dim, generator=g)
    return x, torch.full((batch,), 500.0), ctx, torch.randn(batch, text_g.projection_dim, generator=g)


def run_worker(a) -> dict:
    """One side in one process: load, text, UNet step, image, Turbo image, peak RSS (a JSON line on stdout)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    ckpt = checkpoint_path(a.preset)
    t0 = time.perf_counter()
    side = SdcliSide(ckpt, dtype) if a.worker == "sdcli" else DiffusersSide(ckpt, dtype, a.preset)
    res = {"load": time.perf_counter() - t0, "rss_load": peak_rss_gb(), "threads": torch.get_num_threads()}
    tag = f"{a.worker}-{a.dtype}-{a.preset}-{a.size}"
    if a.unet_reps:
        res["text"], _ = timed(side.text, 1, warmup=1)
        x, t, ctx, pooled = step_inputs(a.preset, a.size)
        res["unet"], eps = timed(lambda: side.unet_step(x, t, ctx, pooled, a.size), a.unet_reps, warmup=a.warmup)
        torch.save(eps, BENCH / f"xl-eps-{tag}.pt")
    if a.steps:
        t1 = time.perf_counter()
        img = side.image(a.size, a.steps)
        res["image"] = time.perf_counter() - t1
        torch.save(img, BENCH / f"xl-image-{tag}-{a.steps}.pt")
    res["rss"] = peak_rss_gb()  # before Turbo: its smaller image cannot raise the peak of the main size
    if a.turbo_size:
        side.image(a.turbo_size, 1, turbo=True)  # warm-up at this shape (oneDNN primitives, allocator)
        t1 = time.perf_counter()
        side.image(a.turbo_size, 1, turbo=True)
        res["turbo"] = time.perf_counter() - t1
    del side
    gc.collect()
    return res


# ----------------------------------------------------------------------------------------------- main side
def worker(side: str, dtype: str, preset: str, size: int, **kw) -> dict:
    args = [sys.executable, __file__, "--worker", side, "--dtype", dtype, "--preset", preset, "--size", str(size)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    print(f"  running {side} {dtype} {size}px {kw} ...", file=sys.stderr, flush=True)
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"worker {side} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def collect(a) -> dict:
    import torch

    from sdcli.runtime.device import auto_dtype

    preset = "tiny" if a.tiny else "full"
    dtype = auto_dtype("cpu")
    size, steps, turbo = a.size, a.steps, a.turbo_size or a.size // 2
    guard = a.guard_size or size
    r = {"preset": preset, "dtype": dtype, "size": size, "steps": steps, "turbo_size": turbo, "guard_size": guard,
         "cpu": cpu_name(), "threads": torch.get_num_threads()}  # fmt: skip
    r["peak"] = {d: gemm_peak(d, n=2048 if not a.tiny else 512) for d in ("fp32", "bf16")}
    ensure_checkpoint(preset)
    run = dict(unet_reps=a.unet_reps, warmup=1, steps=steps, turbo_size=turbo)
    for side in ("sdcli", "diffusers"):
        r[side] = worker(side, dtype, preset, size, **run)
    eps = [torch.load(BENCH / f"xl-eps-{s}-{dtype}-{preset}-{size}.pt") for s in ("sdcli", "diffusers")]
    r["step_rel_diff"] = float((eps[0] - eps[1]).abs().max() / eps[1].abs().max())
    if dtype != "fp32":  # the guard: the same seed in fp32 (and in the dtype again when the guard size differs)
        for d in {dtype, "fp32"} if guard != size else {"fp32"}:
            worker("sdcli", d, preset, guard, unet_reps=0, warmup=0, steps=steps, turbo_size=0)
        img = [torch.load(BENCH / f"xl-image-sdcli-{d}-{preset}-{guard}-{steps}.pt") for d in (dtype, "fp32")]
        r["psnr"] = psnr(img[0], img[1])
    return r


def render(r: dict) -> str:
    s, d, dt, sz = r["sdcli"], r["diffusers"], r["dtype"], r["size"]
    head = ["what", "shape", f"sdcli {dt}", f"diffusers {dt}", "sdcli speed-up"]
    row = lambda what, shape, key, unit="s": [what, shape, fmt(s[key], unit), fmt(d[key], unit),  # noqa: E731
                                               ratio(s[key], d[key])]
    rows = [row("load to ready (fp16 file)", "-", "load"),
            row("text encoding (cond + uncond)", "77 tok", "text"),
            row("UNet step, CFG batch 2", f"{sz}px", "unet"),
            row(f"whole image, {r['steps']} steps euler karras, cfg {CFG} (measured, after load)", f"{sz}px", "image"),
            row("peak RSS of that process", f"{sz}px", "rss", "GB"),
            row("Turbo-shaped image: euler_a trailing, 1 step, cfg 0 (one UNet call), VAE decode",
                f"{r['turbo_size']}px", "turbo")]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(x) + " |" for x in rows]
    guard = (f"sdcli {dt} vs sdcli fp32, the same {r['steps']}-step image and seed at {r['guard_size']}px"
             + (f" (fp32 at {sz}px is too slow on this CPU)" if r["guard_size"] != sz else "")
             + f": PSNR {r['psnr']:.1f} dB" if "psnr" in r else
             "fp32 is this CPU's best dtype: the dtype-vs-fp32 guard is exact by construction")  # fmt: skip
    notes = [
        f"CPU: {r['cpu']}, {r['threads']} threads. GEMM peak (best of 3, this run): fp32 {r['peak']['fp32']:.0f} "
        f"GFLOP/s, bf16 {r['peak']['bf16']:.0f} GFLOP/s.",
        f"Checkpoint: random weights, the {'real SDXL 1.0 base' if r['preset'] == 'full' else 'TINY test'} shapes "
        "(scripts/make_checkpoint.py), fp16 single file. Each side in its own process, run in turn: sdcli, diffusers. "
        "UNet step: median after a warm-up; Turbo: one run after a warm-up. Speed-up = diffusers / sdcli (RSS too).",
        f"UNet step outputs of the two sides on the same input: max |diff| / max |ref| = {r['step_rel_diff']:.1e}.",
        f"Quality guard: {guard}.",
        "diffusers upcasts the SDXL VAE to fp32 only in fp16 (force_upcast); in bf16 and fp32 both sides decode in "
        "the run's dtype. The text of the diffusers side is its own encoders on our token ids (no tokenizer files "
        "offline), as the SD1.5 table's. The image rows are one run each (a 1024px decode alone moves +-10%).",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="image side of the UNet step and the image (default 1024)")
    p.add_argument("--steps", type=int, default=4, help="steps of the measured image (default 4; 20 for a real one)")
    p.add_argument("--turbo-size", type=int, help="Turbo image side (default size / 2: 512)")
    p.add_argument("--guard-size", type=int, default=None,
                   help="quality-guard image side (default 256, or the size if smaller; the size with --tiny)")
    p.add_argument("--unet-reps", type=int, default=1, help="timed UNet steps after the warm-up (default 1)")
    p.add_argument("--tiny", action="store_true", help="rehearse with the tiny SDXL preset instead of the full one")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    a = p.parse_args()
    if a.guard_size is None:
        a.guard_size = a.size if a.tiny else min(a.size, 256)
    t0 = time.perf_counter()
    r = collect(a)
    (BENCH / f"results-sdxl-{r['preset']}-{r['size']}.json").write_text(json.dumps(r, indent=1))
    table = render(r)
    print(table)
    print(f"(sdxl {r['preset']} mode, {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if not a.no_docs:
        title = f"## SDXL base ({r['size']}x{r['size']}, {r['dtype']})"
        write_section("bench-sdxl", f"{title}\n\nMachine: {machine()}\n\n{table}")


if __name__ == "__main__" and "--worker" in sys.argv:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", choices=["sdcli", "diffusers"])
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--preset", default="full")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--unet-reps", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--turbo-size", type=int, default=0)
    print(json.dumps(run_worker(p.parse_args())))
    sys.exit(0)


if __name__ == "__main__":
    main()
