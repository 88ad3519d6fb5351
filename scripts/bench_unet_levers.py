"""A/B of the CPU UNet levers of issue 31 on one full-size SD1.5 UNet call (CFG batch 2), in one process.

    python scripts/bench_unet_levers.py                       # 512px, 2 threads, 2 rounds
    python scripts/bench_unet_levers.py --size 64 --rounds 1  # rehearsal (the full-size model, tiny latent)
    python scripts/bench_unet_levers.py --dtype bf16 --modes packed,fused --rounds 4  # a CPU with native bf16

Modes, alternated call by call (base, geglu, packed, base, ...) on the same model and inputs:
- base: the code before the levers (GEGLU's gate gelu'd through a dense copy and back, multiplied strided; every
  3x3 convolution through torch's own path);
- geglu: GEGLU's gate made dense once and multiplied into (models/unet.py GEGLU), every 3x3 convolution through
  torch's own path (what a render ran before the packed convolutions): must be the same bytes as base;
- packed: geglu plus the large 3x3 convolutions of maps <= 16x16 on weights packed once (models/packed_conv.py, what
  a render ran before the fused linears): a numerics change, its max relative error against base is printed;
- fused: packed plus, in bf16, GEGLU and the residual adds inside oneDNN's GEMMs (models/fused_linear.py, what a
  render runs; the modes before it run with SDCLI_CPU_FUSED_LINEAR=0);
- fused-binary / fused-inplace: fused with GEGLU's product and the residual add forced to oneDNN's binary post-op /
  to an in-place pass after the plain GEMM (SDCLI_CPU_BINARY_POST_OPS=1 / 0; `fused` takes the CPU's default:
  the post-op with AMX). On an AMX CPU: `--dtype bf16 --modes fused-binary,fused-inplace --rounds 6`.
Wall and process CPU time per call (on a shared machine read the CPU time), best of the rounds; the output of
every mode is compared with base's (torch.equal, else the max |difference| / max |base|).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sdcli.loading import checkpoint  # noqa: E402
from sdcli.models import fused_linear  # noqa: E402
from sdcli.models import unet as unet_mod  # noqa: E402
from sdcli.models.packed_conv import PackedConv2d, packed_convs  # noqa: E402
from sdcli.models.invariant import gelu  # noqa: E402
from sdcli.runtime.device import sampling_heap  # noqa: E402


def old_geglu(self, x):
    value, gate = self.proj(x).chunk(2, dim=-1)
    return value * gelu(gate, inplace=True)


def rss_gb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".bench" / "sd15-full-fp16.safetensors"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="base,geglu,packed")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: on a CPU with native bf16")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    unet = checkpoint.load_models(a.model, dtype=dtype).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.size // 8, a.size // 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.context_dim, generator=g).to(dtype)
    t = torch.full((2,), 500.0)
    new_geglu = unet_mod.GEGLU.forward
    cpu = torch.device("cpu")

    def call(name):
        """One UNet call in mode `name`; packed: in a packed_convs session (packed by a first, untimed call, as
        the first step of a render packs), the weights unpacked again after it."""
        unet_mod.GEGLU.forward = old_geglu if name == "base" else new_geglu
        fused = name.startswith("fused")
        os.environ[fused_linear.SWITCH_ENV] = "1" if fused else "0"
        binary = {"fused-binary": "1", "fused-inplace": "0"}.get(name)
        if binary is None:
            os.environ.pop(fused_linear.BINARY_ENV, None)
        else:
            os.environ[fused_linear.BINARY_ENV] = binary
        with packed_convs(cpu) if name == "packed" or fused else contextlib.nullcontext():
            if name == "packed" or fused:
                unet(x, t, ctx)
            w, c = time.perf_counter(), time.process_time()
            out = unet(x, t, ctx)
            return out, time.perf_counter() - w, time.process_time() - c

    modes = a.modes.split(",")
    res = {m: {"wall": [], "cpu": []} for m in modes}
    outs = {}
    packed = []
    with torch.inference_mode(), sampling_heap(cpu):  # the heap a render samples with
        for m in modes:  # warm-up of each mode
            outs[m] = call(m)[0]
        for r in range(a.rounds):
            for m in modes:
                out, wall, cpu_s = call(m)
                res[m]["wall"].append(wall)
                res[m]["cpu"].append(cpu_s)
                assert torch.equal(out, outs[m]), f"{m}: not the same bytes from call to call"
                print(f"round {r} {m}: wall {wall:.2f} s, CPU {cpu_s:.2f} s", flush=True)
        before = rss_gb()
        with packed_convs(cpu):
            unet(x, t, ctx)
            packed = [mod._packed for mod in unet.modules() if isinstance(mod, PackedConv2d) and mod._packed is not None]
            mb = sum(p.numel() * p.element_size() for p in packed) / 1e6
            print(f"packed weights: {len(packed)}, {mb:.0f} MB, the plain ones "
                  f"freed meanwhile: RSS {before:.2f} GB before the session, {rss_gb():.2f} GB in it", flush=True)
    base = outs.get("base", outs[modes[0]])
    for m in modes:
        eq = torch.equal(outs[m], base)
        rel = float((outs[m] - base).abs().max() / base.abs().max())
        print(f"{m}: wall {min(res[m]['wall']):.2f} s, CPU {min(res[m]['cpu']):.2f} s (best of {a.rounds}); "
              f"CPU / base {min(res[m]['cpu']) / min(res[modes[0]]['cpu']):.3f}; same bytes as base: {eq}"
              + ("" if eq else f", max rel. difference {rel:.2e}"))


if __name__ == "__main__":
    main()
