"""Which ATen ops give other bits on another CPU thread count: record every op a workload runs (inputs, outputs)
under one thread, replay each op alone under 2..8 threads on the recorded inputs, and list those whose output
moves. Op by op, so a difference is the op's own, not one carried in from an earlier op.

    python scripts/probe_threads.py TINY.safetensors --dtype fp32 [--threads 2 3 4] [--full-ops] [--modules]
    python scripts/probe_threads.py --full-only --modules --dtype bf16 --side 32    # full-size blocks alone
    python scripts/probe_threads.py --dit [--only dit.flux_single ...] [--modules]   # SD3/FLUX/T5/ESRGAN/ToMe blocks

The workloads are a tiny checkpoint's networks (scripts/make_checkpoint.py --size tiny: text encoder, UNet, VAE
decode and encode) and, with `--full-ops`/`--full-only`, blocks at full SD1.5 shapes with random weights.

Full-size blocks matter: the tiny model's shapes are small enough that some kernels never split their work.
`--modules` runs whole workloads at each thread count instead and names the first module whose output moves: the
check for a fix whose pieces depend on the thread count (models/invariant.py splits element-wise ops by it, so an
op-by-op replay of one thread's calls would flag it). `--check-switch`
compares whole forwards with torch.set_num_threads switched in one process against fresh processes started with
OMP_NUM_THREADS (the probe relies on the two agreeing; torch caps an OMP_NUM_THREADS above the core count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SKIP = {"aten.detach.default", "aten.empty.memory_format", "aten.empty_strided.default", "aten.randn.generator",
        "aten.normal_.default", "aten._local_scalar_dense.default"}


def _copy(x):
    """A tensor with the same sizes, strides and values (a plain clone makes a non-dense view contiguous)."""
    if not isinstance(x, torch.Tensor):
        return x
    if 0 in x.stride():  # an expanded view (ToMe's gather indices): its strides cannot be written to
        return x.clone()
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x)


class Recorder(TorchDispatchMode):
    def __init__(self, label: str):
        super().__init__()
        self.label, self.ops = label, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        keep = name not in SKIP
        before = tree_map(_copy, (args, kwargs)) if keep else None
        out = func(*args, **kwargs)
        if keep:
            self.ops.append((self.label, name, before, tree_map(_copy, out)))
        return out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0))
    if isinstance(a, (list, tuple)):
        return all(_same(x, y) for x, y in zip(a, b))
    return True


def _shapes(args) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            cl = a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
            parts.append("x".join(map(str, a.shape)) + ("cl" if cl else ""))
    return " ".join(parts)


def replay(ops, threads: list[int]) -> dict:
    """{(label, op, shapes): [threads at which it differs from one thread]}. The base is the op replayed alone
    on one thread, not the recording: a composite op (scaled_dot_product_attention) recorded under the dispatch
    mode may run another kernel than the same call outside it."""
    found = defaultdict(set)
    for label, name, (args, kwargs), _ in ops:
        func = _resolve(name)
        outs = {}
        for t in [1, *threads]:
            torch.set_num_threads(t)
            outs[t] = func(*tree_map(_copy, args), **tree_map(_copy, kwargs))
        for t in threads:
            if not _same(outs[1], outs[t]):
                found[(label, name, _shapes(args))].add(t)
    torch.set_num_threads(1)
    return found


def _resolve(name: str):
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


def tiny_workloads(model: str, dtype: torch.dtype):
    from sdcli.loading.checkpoint import load_models

    models = load_models(model, dtype=dtype)
    unet, vae, text = models.unet, models.vae, models.text_encoder
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49407, (1, 77), generator=g)
    ctx_dim = unet.config.context_dim
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, ctx_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    z = torch.randn(1, 4, 8, 8, generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    return {
        "text": (lambda: text(ids), text),
        "unet": (lambda: unet(x.to(dtype), t, ctx.to(dtype)), unet),
        "vae.decode": (lambda: vae.decode(z.to(dtype)), vae),
        "vae.encode": (lambda: vae.encode(img.to(dtype)), vae),
    }


def full_workloads(dtype: torch.dtype, side: int = 64):
    """Blocks at full SD1.5 shapes (random weights, CFG batch 2): a ResBlock with a skip conv, a transformer, the
    VAE's mid block (attention over 4096 pixels) and a 256-channel decoder block at 256x256, CLIP-L, SDXL's
    guidance-rescale std over a 128x128 latent."""
    from sdcli.models.layout import run_layout
    from sdcli.models.text import TextConfig, TextEncoder
    from sdcli.models.unet import ResBlock, SpatialTransformer, UNetConfig
    from sdcli.models.vae import Mid, ResnetBlock

    torch.manual_seed(0)
    cfg = UNetConfig()
    res = ResBlock(640, 1280, 320).to(dtype)
    st = SpatialTransformer(320, cfg, 1).to(dtype)
    mid, up = Mid(512).to(dtype), ResnetBlock(512, 256).to(dtype)
    text = TextEncoder(TextConfig())
    for p in text.parameters():
        torch.nn.init.normal_(p, std=0.02)
    text = text.to(dtype)
    x = torch.randn(2, 640, side, side, dtype=dtype)
    y = torch.randn(2, 320, side, side, dtype=dtype)
    emb = torch.randn(2, 1280, dtype=dtype)
    ctx = torch.randn(2, 77, 768, dtype=dtype)
    z = torch.randn(1, 512, side, side, dtype=dtype)
    u = torch.randn(1, 512, 4 * side, 4 * side, dtype=dtype)
    ids = torch.randint(0, 49407, (2, 77))
    f = torch.randn(1, 4, 128, 128)
    return {
        "full.resblock": (lambda: res(run_layout(res, x), emb), res),
        "full.transformer": (lambda: st(run_layout(st, y), ctx), st),
        "full.vae_mid": (lambda: mid(run_layout(mid, z)), mid),
        "full.vae_up": (lambda: up(run_layout(up, u)), up),
        "full.text": (lambda: text(ids), text),
        "full.rescale_std": (lambda: f.std(dim=(1, 2, 3), keepdim=True), torch.nn.Module()),
    }



def dit_workloads(dtype: torch.dtype, side: int = 32):
    """The networks added with SD3/FLUX, ESRGAN and ToMe, one block each at real widths (random weights) on a
    `side` x `side` latent: an SD3.5-Medium joint block (dual attention, q/k RMS norm; CFG batch 2, 333 text
    tokens) with its patch embedding and final layer, FLUX.1 double and single blocks at half the width with the
    real 128-channel heads (the full 3072 width is 1.4 GB of weights per double block; the ops are the same),
    a T5 v1.1-large block (d_ff 2816, 256 tokens), an RRDB and Compact body at 4 x side px, ToMe's merge of a
    2 side x 2 side UNet map (320 channels)."""
    from sdcli.models import esrgan, flux, mmdit, t5, tome

    torch.manual_seed(0)
    sd3 = mmdit.MMDiTConfig(depth=2, dual_attention_layers=(0,), qk_norm=True)
    joint, embed, final = mmdit.JointBlock(sd3, 0), mmdit.PatchEmbed(sd3), mmdit.FinalLayer(sd3)
    fcfg = flux.FluxConfig(hidden_size=1536, mlp_hidden_dim=6144, num_heads=12, depth=1, depth_single_blocks=1)
    double, single = flux.DoubleStreamBlock(fcfg), flux.SingleStreamBlock(fcfg)
    t5cfg = t5.T5Config(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=1)
    t5block = t5.T5Block(t5cfg, has_relative_bias=True)
    rrdb = esrgan.RRDB(64, 32)
    compact = esrgan.SRVGGNetCompact(esrgan.CompactConfig(num_convs=2))
    modules = (joint, embed, final, double, single, t5block, rrdb, compact)
    for m in modules:
        for name, w in m.named_parameters():
            torch.nn.init.normal_(w, mean=1.0 if "norm" in name or name.endswith("scale") else 0.0, std=0.02)
        m.to(dtype)
    n = (side // 2) ** 2  # image tokens (2x2 patches)
    lat = torch.randn(2, 16, side, side, dtype=dtype)
    x, ctx, c = (torch.randn(2, n, 1536, dtype=dtype), torch.randn(2, 333, 1536, dtype=dtype),
                 torch.randn(2, 1536, dtype=dtype))  # fmt: skip
    img, txt, vec = torch.randn(1, n, 1536, dtype=dtype), torch.randn(1, 512, 1536, dtype=dtype), c[:1]
    ids = torch.cat([flux.text_ids(512), flux.image_ids(side, side)])[None]
    pe = flux.rope(ids, fcfg.axes_dim, fcfg.theta)
    h5 = torch.randn(1, 256, 1024, dtype=dtype)
    bias = t5block.layer[0].SelfAttention.position_bias(256).to(dtype)
    feat, pic = torch.randn(1, 64, 4 * side, 4 * side, dtype=dtype), torch.rand(1, 3, 4 * side, 4 * side, dtype=dtype)
    tokens = torch.randn(2, 4 * side * side, 320, dtype=dtype)  # a (2 side x 2 side) map's tokens

    def tome_merge():
        merge, unmerge = tome.merge_plan(tokens, 2 * side, 2 * side, 2, 2, tokens.shape[1] // 2)
        return unmerge(merge(tokens))

    return {
        "dit.sd3_joint": (lambda: joint(ctx, x, c), joint),
        "dit.sd3_embed_final": (lambda: final(embed(lat), c), torch.nn.ModuleList([embed, final])),
        "dit.flux_double": (lambda: double(img, txt, vec, pe), double),
        "dit.flux_single": (lambda: single(torch.cat([txt, img], 1), vec, pe), single),
        "dit.t5_block": (lambda: t5block(h5, bias), t5block),
        "dit.esrgan_rrdb": (lambda: rrdb(feat), rrdb),
        "dit.esrgan_compact": (lambda: compact(pic), compact),
        "dit.tome": (tome_merge, torch.nn.Module()),
    }

def modules_differing(workloads, threads: list[int]) -> dict:
    """{module path: [threads where its output differs from one thread's]} over whole workloads (forward hooks),
    listing only the first differing modules of each workload in execution order (later ones inherit the
    difference)."""
    found = {}
    for label, fn in workloads.items():
        fn, root = fn
        runs = {}
        for t in [1, *threads]:
            torch.set_num_threads(t)
            runs[t] = _hooked_run(fn, root)
        base = dict(runs[1])
        for t in threads:
            for name, out in runs[t]:
                if not _same(base[name], out):
                    found.setdefault(f"{label}: {name}", []).append(t)
                    break
    return found


def _hooked_run(fn, root: torch.nn.Module) -> list:
    """[(module path#call, output)] in call order for every module under `root` during fn(), then the result."""
    outs, handles, calls = [], [], {}

    def hook(name):
        def record_output(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            outs.append((f"{name}#{calls[name]}", tree_map(_copy, out)))
        return record_output

    for name, module in root.named_modules():
        handles.append(module.register_forward_hook(hook(name or "<root>")))
    try:
        with torch.inference_mode():
            result = fn()
    finally:
        for h in handles:
            h.remove()
    return [*outs, ("<result>", tree_map(_copy, result))]


def record(workloads) -> list:
    ops = []
    torch.set_num_threads(1)
    with torch.inference_mode():
        for label, fn in workloads.items():
            rec = Recorder(label)
            with rec:
                fn[0]()
            ops += rec.ops
    return ops


def whole(workloads) -> dict:
    with torch.inference_mode():
        outs = {k: fn() for k, (fn, _) in workloads.items()}
    return {k: (v if isinstance(v, torch.Tensor) else v[0]).float() for k, v in outs.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", help="a tiny checkpoint (not needed with --full-only)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--full-ops", action="store_true")
    p.add_argument("--full-only", action="store_true")
    p.add_argument("--check-switch", action="store_true")
    p.add_argument("--modules", action="store_true", help="whole workloads per thread count, module by module")
    p.add_argument("--only", nargs="+", help="workload names to run (default: all)")
    p.add_argument("--side", type=int, default=64, help="latent side of the full-size blocks")
    p.add_argument("--dit", action="store_true", help="also blocks of SD3, FLUX, T5, ESRGAN and ToMe at real widths")
    p.add_argument("--dit-side", type=int, default=32, help="latent side of the --dit blocks")
    p.add_argument("--dump", help="(internal) save whole-forward outputs here")
    p.add_argument("--dump-threads", type=int, help="(internal) torch threads for --dump")
    a = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if a.dump:
        torch.set_num_threads(a.dump_threads)
        torch.save(whole(tiny_workloads(a.model, dtype)), a.dump)
        return
    if a.model is None and not (a.full_only or a.dit):
        p.error("give a tiny checkpoint, or --full-only / --dit")
    if a.check_switch:
        return check_switch(a)
    work = {} if a.full_only or a.model is None else tiny_workloads(a.model, dtype)
    if a.full_ops or a.full_only:
        work.update(full_workloads(dtype, a.side))
    if a.dit:
        work.update(dit_workloads(dtype, a.dit_side))
    if a.only:
        work = {k: v for k, v in work.items() if k in a.only}
    if a.modules:
        found = modules_differing(work, a.threads)
        for where, ts in found.items():
            print(json.dumps({"first_differing": where, "threads": ts}))
        print("every workload thread-invariant" if not found else f"{len(found)} workload(s) differ")
        return
    ops = record(work)
    print(f"{len(ops)} ops recorded", file=sys.stderr)
    found = replay(ops, a.threads)
    for (label, name, shapes), ts in sorted(found.items()):
        print(json.dumps({"where": label, "op": name, "inputs": shapes, "differs_at": sorted(ts)}))
    if not found:
        print("every op thread-invariant")


def check_switch(a) -> None:
    """Whole forwards: torch.set_num_threads switched in this process vs a fresh process set to that count."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    work = tiny_workloads(a.model, dtype)
    for t in [1, *a.threads]:
        torch.set_num_threads(t)
        inproc = whole(work)
        path = f"/tmp/probe_threads_{os.getpid()}_{t}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(t))
        child = [sys.executable, __file__, a.model, "--dtype", a.dtype, "--dump", path, "--dump-threads", str(t)]
        subprocess.run(child, env=env, check=True)
        fresh = torch.load(path)
        os.unlink(path)
        print(t, {k: torch.equal(inproc[k], fresh[k]) for k in inproc})
        if t == 1:
            base = inproc
        else:
            print("  vs 1 thread:", {k: torch.equal(inproc[k], base[k]) for k in inproc})


if __name__ == "__main__":
    main()
