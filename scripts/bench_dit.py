"""SD3.5 Medium and FLUX.1 on the CPU: sdcli against diffusers on random full-size weights, in the same run.

    python scripts/bench_dit.py --rehearse                 # tiny shapes, 64x64: checks the script (~1 min)
    python scripts/bench_dit.py --steps 0 --rounds 1       # one SD3.5 CFG step at 1024 + the Flux blocks
    python scripts/bench_dit.py --write                    # + a whole SD3.5 image (--steps 4), faster of 2 rounds
    python scripts/bench_dit.py --parts flux --flux-size 512 --dtype fp32

SD3.5 Medium (MMDiT-X, 2.24 B parameters) at --size: load time (a Stability single file: the DiT and the 16-channel
VAE, random, bf16 as released, written once into .bench/), one CFG step (a 1-step render: one network call on the
uncond and cond rows), a whole image of --steps euler steps with its decode (0: none), and each side's peak RSS.
The text encoders are left out on both sides: both get the same random conditioning of the real shapes (CLIP-L and
bigG contexts padded to 4096 with T5's 256 tokens, pooled 2048); T5-XXL alone would add 4.7 B parameters.
diffusers runs StableDiffusion3Pipeline with prompt_embeds on the same tensors (sdcli/formats/sd3_layouts).

FLUX.1 dev at full width (3072, 24 heads of 128), one step at --flux-size (4096 image tokens at 1024 and 512 text
tokens; dev makes one network call per step): the whole 12 B network when it fits in the memory free now with 30%
to spare in the dtype (--flux-depth auto; FLUX.1 is 24 GB in bf16, 48 GB in fp32), else one double-stream and one single-stream block timed and
the step estimated as 19 x double + 38 x single (the embedders and the final layer, under 1% of a step, left out);
the table says which. The blocks get random weights in BFL's layout, diffusers the same through
sdcli/formats/flux_layouts.

Each measurement runs in its own subprocess (--worker), sdcli and diffusers interleaved, --rounds times; the table
keeps the faster of the rounds and the child's own peak RSS (os.wait4). --dtype best: bf16 where the CPU has
AVX512-BF16 or AMX, else fp32. Time on 2 cores in fp32 (estimate from the FLOPs): one SD3.5 CFG step at 1024 is
~3-4 min a side, a Flux double + single block at 1024 ~30 s a side; `--steps 0 --rounds 1` keeps the whole run
near 10 minutes. Nothing is downloaded. --write puts the table into docs/benchmarks.md (its bench-dit section).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's sdcli, also in the workers (PYTHONPATH below)
sys.path.insert(0, str(ROOT / "scripts"))
BENCH = ROOT / ".bench"
SEED, CFG = 1, 5.0
FLUX_TEXT = 512  # dev's T5 length
FLUX_DOUBLE, FLUX_SINGLE = 19, 38  # FLUX.1's blocks


def best_dtype() -> str:
    """bf16 where the CPU computes it natively (AVX512-BF16, AMX), else fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------------------------- SD3.5 Medium
def sd3_configs(preset: str):
    from make_checkpoint import TINY_VAE16, dit_config

    from sdcli.models.vae import VAEConfig

    vae = TINY_VAE16 if preset == "tiny" else VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                                        z_channels=16, embed_dim=16, use_quant_conv=False)
    return dit_config("sd3", preset), vae


def sd3_checkpoint(preset: str) -> Path:
    """The random SD3.5 Medium file (model.diffusion_model.*, first_stage_model.*), bf16, written once, one tensor
    at a time (the whole state in memory would be 9 GB in fp32 and its serialized copy as much again)."""
    import torch
    from make_checkpoint import _meta_shapes, _random_dit

    from sdcli.models.mmdit import MMDiT
    from sdcli.models.vae import AutoencoderKL

    out = BENCH / f"sd35-medium-{preset}-bf16.safetensors"
    if out.exists():
        return out
    dit, vae = sd3_configs(preset)
    with torch.device("meta"):
        shapes = {**_meta_shapes(MMDiT(dit), "model.diffusion_model."), **_meta_shapes(AutoencoderKL(vae),
                                                                                         "first_stage_model.")}
    t = time.perf_counter()
    write_random(out, shapes, SEED, lambda k, s, g: _random_dit(k, s, g))
    print(f"  made {out.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def write_random(out: Path, shapes: dict, seed: int, make) -> None:
    """A bf16 safetensors file of `shapes`, each tensor make(key, shape, generator), written as it is made."""
    import torch

    keys = sorted(shapes)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k in keys:
        n = 2 * int(torch.Size(shapes[k]).numel())
        header[k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    BENCH.mkdir(exist_ok=True)
    part = out.with_suffix(".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k in keys:
            t = make(k, tuple(shapes[k]), gen).to(torch.bfloat16).contiguous()
            f.write(t.reshape(-1).view(torch.uint16).numpy().tobytes())
    part.rename(out)


def sd3_conds(preset: str):
    """The same random conditioning on both sides: (context, pooled) x (cond, uncond)."""
    import torch

    dit, _ = sd3_configs(preset)
    g = torch.Generator().manual_seed(SEED)
    return [(torch.randn(1, 77 + 256, dit.context_dim, generator=g), torch.randn(1, dit.adm_in_channels, generator=g))
            for _ in range(2)]


def first_noise(size: int):
    import torch

    return torch.randn((1, 16, size // 8, size // 8), generator=torch.Generator().manual_seed(SEED))


def sd3_sdcli(a) -> dict:
    import torch

    from sdcli import pipeline as P
    from sdcli.loading.checkpoint import load_models
    from sdcli.sampling.conditioning import Cond

    t = time.perf_counter()
    # lean (the CPU default) builds a part when first needed: the file has no text encoders, which would stop
    # keep's load; the DiT and the VAE are read now, inside the load time
    models = load_models(a.file, dtype=torch_dtype(a.dtype), residency="lean")
    models.stage("unet"), models.stage("vae")
    out = {"load_s": time.perf_counter() - t}
    (c, cy), (u, uy) = sd3_conds(a.preset)
    cond, uncond = Cond(context=c, y=cy), Cond(context=u, y=uy)

    def render(steps: int, decode: bool):
        plan = P.make_plan("euler", "auto", steps, cfg=CFG, family=models.family, size=(a.size, a.size))
        t = time.perf_counter()
        latents = P.txt2img(models, plan, cond, uncond, [SEED], a.size, a.size)
        if decode:
            P.decode_latents(models, latents)
        return time.perf_counter() - t

    with torch.inference_mode():
        out["step_s"] = render(1, False)
        if a.steps:
            out["image_s"] = render(a.steps, True)
    return out


def sd3_diffusers(a) -> dict:
    import torch
    # imported before the clock starts, as sdcli's side is: importing is not loading
    import diffusers.loaders.single_file_utils  # noqa: F401
    from diffusers import StableDiffusion3Pipeline  # noqa: F401

    dtype = torch_dtype(a.dtype)
    t = time.perf_counter()
    pipe = sd3_pipeline(a.file, a.preset, dtype)
    out = {"load_s": time.perf_counter() - t}
    (c, cy), (u, uy) = sd3_conds(a.preset)

    def render(steps: int, decode: bool):
        t = time.perf_counter()
        pipe(prompt_embeds=c.to(dtype), pooled_prompt_embeds=cy.to(dtype), negative_prompt_embeds=u.to(dtype),
             negative_pooled_prompt_embeds=uy.to(dtype), height=a.size, width=a.size, num_inference_steps=steps,
             guidance_scale=CFG, latents=first_noise(a.size).to(dtype), output_type="pil" if decode else "latent")
        return time.perf_counter() - t

    with torch.inference_mode():
        out["step_s"] = render(1, False)
        if a.steps:
            out["image_s"] = render(a.steps, True)
    return out


def sd3_pipeline(file: str, preset: str, dtype):
    """StableDiffusion3Pipeline (no text encoders) holding the file's DiT (sd3_layouts.to_diffusers) and VAE."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from sdcli.formats.sd3_layouts import to_diffusers

    dit, vae_cfg = sd3_configs(preset)
    state = load_file(file)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=dit.patch_size, in_channels=dit.in_channels, num_layers=dit.depth,
            attention_head_dim=dit.head_dim, num_attention_heads=dit.num_heads, joint_attention_dim=dit.context_dim,
            caption_projection_dim=dit.hidden_size, pooled_projection_dim=dit.adm_in_channels,
            out_channels=dit.out_channels, pos_embed_max_size=dit.pos_embed_max_size,
            dual_attention_layers=dit.dual_attention_layers, qk_norm="rms_norm")  # fmt: skip
    weights = {k.removeprefix("model.diffusion_model."): state.pop(k).to(dtype) for k in list(state)
               if k.startswith("model.diffusion_model.")}  # fmt: skip
    transformer.load_state_dict(to_diffusers(weights, dit.depth), strict=True, assign=True)
    del weights
    vae = diffusers_vae16(vae_cfg, {k.removeprefix("first_stage_model."): v for k, v in state.items()})
    pipe = StableDiffusion3Pipeline(transformer=transformer.eval(), vae=vae.to(dtype).eval(),
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_vae16(cfg, state: dict):
    """diffusers' AutoencoderKL of SD3's 16-channel VAE from LDM-named tensors (its own converter)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n = len(cfg.ch_mult)
    config = dict(in_channels=3, out_channels=3, block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
                  layers_per_block=cfg.num_res_blocks, down_block_types=["DownEncoderBlock2D"] * n,
                  up_block_types=["UpDecoderBlock2D"] * n, latent_channels=16, norm_num_groups=32,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=True)
    return vae


# ----------------------------------------------------------------------------------------------- FLUX.1
def flux_config(preset: str, depth: str):
    from make_checkpoint import dit_config

    cfg = dit_config("flux", preset)
    if depth == "blocks":
        from dataclasses import replace

        cfg = replace(cfg, depth=1, depth_single_blocks=1)
    return cfg


def flux_fits(dtype: str) -> tuple[bool, str]:
    """Whether the whole FLUX.1 (11.9 B parameters) fits in the memory free now, with 30% to spare (each side holds
    one copy: the random tensors are assigned, and diffusers' split q/k/v are views of them)."""
    need = 11.9e9 * (2 if dtype == "bf16" else 4) * 1.3
    try:
        avail = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False, "free memory unknown"
    return avail > need, f"needs ~{need / 2**30:.0f} GiB, {avail / 2**30:.0f} GiB free"


def flux_worker(a) -> dict:
    """One step of the whole network (--flux-depth full), or one double and one single block (blocks) timed."""
    import torch

    from sdcli.models.flux import image_ids, rope, text_ids

    dtype = torch_dtype(a.dtype)
    cfg = flux_config(a.preset, a.flux_depth)
    net = flux_network(a.side, cfg, dtype)
    h = w = a.flux_size // 16  # packed 2x2 tokens of the 1/8 latent
    g = torch.Generator().manual_seed(SEED + 1)
    img_id, txt_id = image_ids(h * 2, w * 2), text_ids(FLUX_TEXT)
    with torch.inference_mode():
        if a.flux_depth == "full":
            img = torch.randn(1, h * w, cfg.in_channels, generator=g).to(dtype)
            txt = torch.randn(1, FLUX_TEXT, cfg.context_in_dim, generator=g).to(dtype)
            y = torch.randn(1, cfg.vec_in_dim, generator=g).to(dtype)
            t, guidance = torch.tensor([0.7]), torch.tensor([3.5])
            return {"step_s": _timed(lambda: _flux_call(a.side, net, img, img_id, txt, txt_id, t, y, guidance))}
        x, ctx, vec = (torch.randn(*shape, generator=g).to(dtype) for shape in
                       ((1, h * w, cfg.hidden_size), (1, FLUX_TEXT, cfg.hidden_size), (1, cfg.hidden_size)))
        ids = torch.cat([txt_id, img_id])  # (T + L, 3)
        if a.side == "sdcli":
            pe = rope(ids[None], cfg.axes_dim, cfg.theta)
            double = _timed(lambda: net.double_blocks[0](x, ctx, vec, pe))
            single = _timed(lambda: net.single_blocks[0](torch.cat([ctx, x], dim=1), vec, pe))
        else:
            pe = net.pos_embed(ids)
            double = _timed(lambda: net.transformer_blocks[0](x, ctx, vec, pe))
            single = _timed(lambda: net.single_transformer_blocks[0](x, ctx, vec, pe))
    return {"double_s": double, "single_s": single, "step_s": FLUX_DOUBLE * double + FLUX_SINGLE * single}


def flux_network(side: str, cfg, dtype):
    """Our FluxModel with random weights in BFL's layout, or diffusers' FluxTransformer2DModel with the same
    tensors (flux_layouts.to_diffusers)."""
    import torch
    from make_checkpoint import _random_dit

    from sdcli.formats.flux_layouts import to_diffusers
    from sdcli.models.flux import FluxModel

    with torch.device("meta"):
        ours = FluxModel(cfg)
    gen = torch.Generator().manual_seed(SEED)
    state = {k: _random_dit(k, tuple(v.shape), gen).to(dtype) for k, v in sorted(ours.state_dict().items())}
    if side == "sdcli":
        ours.load_state_dict(state, strict=True, assign=True)
        return ours.eval()
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        net = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
            num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
            pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
            axes_dims_rope=list(cfg.axes_dim))  # fmt: skip
    net.load_state_dict(to_diffusers(state), strict=True, assign=True)
    return net.eval()


def _flux_call(side, net, img, img_id, txt, txt_id, t, y, guidance):
    if side == "sdcli":
        return net(img, img_id, txt, txt_id, t, y, guidance)
    return net(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_id,
               txt_ids=txt_id, guidance=guidance, return_dict=False)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------------- the driver
def run_worker(a, part: str, side: str, **extra) -> dict:
    """One measurement in a child process: its JSON line, plus its own peak RSS (os.wait4's ru_maxrss, KiB)."""
    cmd = [sys.executable, __file__, "--worker", part, "--side", side, "--dtype", a.dtype, "--preset", a.preset,
           "--size", str(a.size), "--steps", str(a.steps), "--flux-size", str(a.flux_size),
           "--flux-depth", a.flux_depth]  # fmt: skip
    cmd += [f"--{k}={v}" for k, v in extra.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"the {side} {part} worker failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["rss_gb"] = usage.ru_maxrss / 2**20  # Linux: KiB
    print(f"  {part} {side}: {json.dumps(result)}", file=sys.stderr)
    return result


def interleaved(a, part: str, **extra) -> dict[str, dict]:
    """sdcli, diffusers, sdcli, diffusers...: each number the faster (smaller) of the rounds."""
    best: dict[str, dict] = {}
    for _ in range(a.rounds):
        for side in ("sdcli", "diffusers"):
            r = run_worker(a, part, side, **extra)
            best[side] = {k: min(v, best[side][k]) for k, v in r.items()} if side in best else r
    return best


def machine(a) -> str:
    threads = a.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count()
    from bench import cpu_name  # the model name with its family/model numbers ("AMD EPYC" alone says no Zen)

    return f"{cpu_name()}, {os.cpu_count()} CPUs, {threads} threads, {a.dtype}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{theirs / ours:.2f}x" if ours > 0 else "-"


def sd3_table(a, r: dict) -> list[str]:
    s, d = r["sdcli"], r["diffusers"]
    lines = [f"SD3.5 Medium ({'random, real shapes' if a.preset == 'full' else 'tiny shapes'}), {a.size}x{a.size}, "
             f"CFG {CFG:g}, euler; text encoders left out (the same given conditioning on both sides); "
             f"{machine(a)}; faster of {a.rounds}", "",
             "| | sdcli | diffusers | diffusers / sdcli |", "|---|---|---|---|",
             f"| load (s) | {s['load_s']:.1f} | {d['load_s']:.1f} | {_ratio(s['load_s'], d['load_s'])} |",
             f"| one CFG step (s) | {s['step_s']:.2f} | {d['step_s']:.2f} | {_ratio(s['step_s'], d['step_s'])} |"]
    if a.steps:
        lines.append(f"| image, {a.steps} steps + decode (s) | {s['image_s']:.1f} | {d['image_s']:.1f} | "
                     f"{_ratio(s['image_s'], d['image_s'])} |")
    lines.append(f"| peak RSS (GB) | {s['rss_gb']:.2f} | {d['rss_gb']:.2f} | |")
    return lines


def flux_table(a, r: dict, why: str) -> list[str]:
    s, d = r["sdcli"], r["diffusers"]
    tokens = (a.flux_size // 16) ** 2
    if a.flux_depth == "full":
        head = f"the whole network ({why})"
        rows = []
    else:
        head = (f"one double- and one single-stream block timed, the step = {FLUX_DOUBLE} x double + {FLUX_SINGLE} x "
                f"single, embedders and final layer left out ({why})")
        rows = [f"| double-stream block (s) | {s['double_s']:.2f} | {d['double_s']:.2f} | "
                f"{_ratio(s['double_s'], d['double_s'])} |",
                f"| single-stream block (s) | {s['single_s']:.2f} | {d['single_s']:.2f} | "
                f"{_ratio(s['single_s'], d['single_s'])} |"]
    width = "at full width (3072)" if a.preset == "full" else "(tiny shapes)"
    return [f"FLUX.1 dev {width}, one step at {a.flux_size}x{a.flux_size} ({tokens} image + "
            f"{FLUX_TEXT} text tokens): {head}; {machine(a)}; faster of {a.rounds}", "",
            "| | sdcli | diffusers | diffusers / sdcli |", "|---|---|---|---|", *rows,
            f"| step (s){'' if a.flux_depth == 'full' else ', estimated'} | {s['step_s']:.1f} | {d['step_s']:.1f} | "
            f"{_ratio(s['step_s'], d['step_s'])} |",
            f"| peak RSS (GB) | {s['rss_gb']:.2f} | {d['rss_gb']:.2f} | |"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="sd3,flux", help="sd3, flux or both (comma-separated)")
    p.add_argument("--size", type=int, default=1024, help="SD3.5 image side in pixels")
    p.add_argument("--steps", type=int, default=4, help="SD3.5 whole-image steps (0: the single step only)")
    p.add_argument("--flux-size", type=int, default=1024, help="FLUX image side in pixels")
    p.add_argument("--flux-depth", default="auto", choices=["auto", "full", "blocks"])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the faster is kept")
    p.add_argument("--dtype", default="best", choices=["best", "bf16", "fp32"])
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the workers (0: torch's default)")
    p.add_argument("--rehearse", action="store_true", help="tiny shapes, 64x64, 2 steps, 1 round")
    p.add_argument("--write", action="store_true", help="also write the tables into docs/benchmarks.md")
    p.add_argument("--worker", choices=["sd3", "flux"], help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["sdcli", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--preset", default="full", help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.dtype = best_dtype() if a.dtype == "best" else a.dtype
    if a.worker:
        fn = flux_worker if a.worker == "flux" else sd3_sdcli if a.side == "sdcli" else sd3_diffusers
        print(json.dumps(fn(a)))
        return
    if a.rehearse:
        a.preset, a.size, a.flux_size, a.steps, a.rounds = "tiny", 64, 64, min(a.steps, 2), 1
    parts = set(a.parts.split(","))
    report: list[str] = []
    if "sd3" in parts:
        report += sd3_table(a, interleaved(a, "sd3", file=sd3_checkpoint(a.preset))) + [""]
    if "flux" in parts:
        fits, why = flux_fits(a.dtype) if a.preset == "full" else (True, "tiny shapes")
        if a.flux_depth == "auto":
            a.flux_depth = "full" if fits else "blocks"
        report += flux_table(a, interleaved(a, "flux"), why) + [""]
    text = "\n".join(report)
    print(text)
    if a.write:
        from bench import write_section  # scripts/bench.py: replaces one generated section of docs/benchmarks.md

        write_section("bench-dit", f"## SD3.5 Medium and FLUX.1 (`scripts/bench_dit.py`)\n\n{text}\n")


if __name__ == "__main__":
    main()
