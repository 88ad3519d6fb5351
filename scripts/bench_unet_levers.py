"""A/B of the fp32 CPU UNet levers of issue 31 on one full-size SD1.5 UNet call (CFG batch 2), in one process.

    python scripts/bench_unet_levers.py                       # 512px, 2 threads, 2 rounds
    python scripts/bench_unet_levers.py --size 64 --rounds 1  # rehearsal (the full-size model, tiny latent)

Modes, alternated call by call (base, geglu, packed, base, ...) on the same model and inputs:
- base: the code before the levers (GEGLU's gate gelu'd through a dense copy and back, multiplied strided; every
  3x3 convolution through torch's own path);
- geglu: GEGLU's gate made dense once and multiplied into (models/unet.py GEGLU): must be the same bytes;
- packed: geglu plus the 3x3 convolutions of maps <= 16x16 on weights packed once (models/packed_conv.py,
  SDCLI_CPU_PACKED_CONV=1): a numerics change, its max relative error against base is printed.
Wall and process CPU time per call (on a shared machine read the CPU time), best of the rounds; the output of
every mode is compared with base's (torch.equal, else the max |difference| / max |base|).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sdcli.loading import checkpoint  # noqa: E402
from sdcli.models import packed_conv, unet as unet_mod  # noqa: E402
from sdcli.models.invariant import gelu  # noqa: E402


def old_geglu(self, x):
    value, gate = self.proj(x).chunk(2, dim=-1)
    return value * gelu(gate, inplace=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".bench" / "sd15-full-fp16.safetensors"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="base,geglu,packed")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    unet = checkpoint.load_models(a.model, dtype=torch.float32).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, a.size // 8, a.size // 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.context_dim, generator=g)
    t = torch.full((2,), 500.0)
    new_geglu = unet_mod.GEGLU.forward

    def mode(name):
        unet_mod.GEGLU.forward = old_geglu if name == "base" else new_geglu
        os.environ[packed_conv.SWITCH_ENV] = "1" if name == "packed" else "0"

    modes = a.modes.split(",")
    res = {m: {"wall": [], "cpu": []} for m in modes}
    outs = {}
    with torch.inference_mode():
        for m in modes:  # warm-up (and the packing) of each mode
            mode(m)
            outs[m] = unet(x, t, ctx)
        for r in range(a.rounds):
            for m in modes:
                mode(m)
                w, c = time.perf_counter(), time.process_time()
                out = unet(x, t, ctx)
                res[m]["wall"].append(time.perf_counter() - w)
                res[m]["cpu"].append(time.process_time() - c)
                assert torch.equal(out, outs[m]), f"{m}: not the same bytes from call to call"
                print(f"round {r} {m}: wall {res[m]['wall'][-1]:.2f} s, CPU {res[m]['cpu'][-1]:.2f} s", flush=True)
    packed = [mod._packed for mod in unet.modules() if isinstance(mod, packed_conv.PackedConv2d) and mod._packed is not None]
    print(f"packed weights: {len(packed)}, {sum(t.numel() for t in packed) * 4 / 1e6:.0f} MB")
    base = outs.get("base", outs[modes[0]])
    for m in modes:
        eq = torch.equal(outs[m], base)
        rel = float((outs[m] - base).abs().max() / base.abs().max())
        print(f"{m}: wall {min(res[m]['wall']):.2f} s, CPU {min(res[m]['cpu']):.2f} s (best of {a.rounds}); "
              f"CPU / base {min(res[m]['cpu']) / min(res[modes[0]]['cpu']):.3f}; same bytes as base: {eq}"
              + ("" if eq else f", max rel. difference {rel:.2e}"))


if __name__ == "__main__":
    main()
