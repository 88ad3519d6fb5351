"""Where one SD1.5 UNet call goes, op by op: sdcli (torch.profiler) beside OpenVINO's CPU plugin (PERF_COUNT).

    python scripts/profile_unet_ops.py                   # 512x512 (latent 64x64), CFG batch 2, 2 threads, 2 rounds
    python scripts/profile_unet_ops.py --rounds 1 --sides sdcli --size 256
    python scripts/profile_unet_ops.py --rehearse        # the tiny random SD1 model at 64x64: checks it end to end

Both sides run the same random SD1.5-shaped weights (`.bench/sd15-full-fp16.safetensors` for sdcli, in fp32; the
OpenVINO IR that `scripts/bench_peers.py --prepare` exported from it, f32, reshaped static to batch 2 as optimum's
`reshape(batch_size=1, ...)` does for CFG: one UNet call of batch 2 per step), the same inputs (noise (2, 4, H/8,
W/8) and text (2, 77, 768) of seed 0, timestep 500). Each side runs in its own process; the rounds alternate
(sdcli, OpenVINO, sdcli, ...). In each process: one warm-up call, one plain call timed (wall and process CPU time),
one profiled call.

Categories (the same for both sides): 3x3 convolutions (incl. the stride-2 ones, bias, fused post-ops), 1x1
convolutions (ResBlock skips, proj_in/proj_out), self-attention core by token count (SDPA in sdcli; OpenVINO's MHA
subgraph or MatMul-Softmax-MatMul), cross-attention core, linear layers (q/k/v/out, feed-forward, time embedding),
GroupNorm (with the SiLU OpenVINO fuses into it), LayerNorm, element-wise (SiLU, GELU, adds, muls, upsampling),
copies and reorders (copy_, contiguous, cat, OpenVINO's Reorder/Transpose/Concat), other. sdcli: each top-level
aten op's inclusive time (the profiler's time on the calling thread), classified by op and input shapes. OpenVINO:
`real_time` of each executed node of the compiled graph, classified by node type, the weight shape of the node in
the runtime model, and the original layer names it fused (module paths such as `attn1`, `norm1`).

The profiler's times are wall time; on a loaded machine read the fractions, and the calls' process CPU time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
OV_PYTHON = BENCH / "openvino-venv" / "bin" / "python"
CATEGORIES = ["conv 3x3", "conv 1x1", "self-attention core", "cross-attention core", "linear", "GroupNorm",
              "LayerNorm", "element-wise", "copies / reorders", "other"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["sdcli", "openvino"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="sdcli's weights and compute (bf16: on a CPU with native bf16; OpenVINO keeps its default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sides", default="sdcli,openvino")
    p.add_argument("--model", help="sdcli checkpoint (default .bench/sd15-full-fp16.safetensors)")
    p.add_argument("--ir", help="OpenVINO UNet IR (default .bench/peers/openvino-sd15/unet/openvino_model.xml)")
    p.add_argument("--rehearse", action="store_true", help="the tiny random SD1 model at 64x64, one round")
    p.add_argument("--out", type=Path, help="write every run's JSON here")
    a = p.parse_args()
    if a.rehearse:
        a.size, a.rounds = 64, 1
        a.model = a.model or str(BENCH / "tiny-sd1-fp16.safetensors")
        a.ir = a.ir or str(BENCH / "peers" / "openvino-tiny" / "unet" / "openvino_model.xml")
    a.model = a.model or str(BENCH / "sd15-full-fp16.safetensors")
    a.ir = a.ir or str(BENCH / "peers" / "openvino-sd15" / "unet" / "openvino_model.xml")
    if a.worker == "sdcli":
        return print("RESULT " + json.dumps(sdcli_worker(a)), flush=True)
    if a.worker == "openvino":
        return print("RESULT " + json.dumps(ov_worker(a)), flush=True)
    runs = []
    for r in range(a.rounds):
        for side in a.sides.split(","):
            runs.append(run_side(side, a, r))
            print(summary_line(runs[-1]), file=sys.stderr, flush=True)
    if a.out:
        a.out.write_text(json.dumps(runs, indent=1))
    print(table(runs, a))


def run_side(side: str, a, r: int) -> dict:
    python = sys.executable if side == "sdcli" else str(OV_PYTHON)
    cmd = [python, __file__, "--worker", side, "--size", str(a.size), "--threads", str(a.threads),
           "--dtype", a.dtype, "--model", a.model, "--ir", a.ir]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} worker failed:\n{out.stderr[-3000:]}")
    res = json.loads(line[7:])
    res.update(side=side, round=r)
    return res


def inputs(size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, size // 8, size // 8), dtype=np.float32)
    ctx = rng.standard_normal((2, 77, 768), dtype=np.float32)
    return x, ctx


# --- sdcli ---------------------------------------------------------------------------------------------------

def sdcli_worker(a) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.profiler import ProfilerActivity, profile

    from sdcli.loading import checkpoint
    from sdcli.models.packed_conv import packed_convs
    from sdcli.runtime.device import sampling_heap

    torch.set_num_threads(a.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    unet = checkpoint.load_models(a.model, dtype=dtype).unet
    x, ctx = (torch.from_numpy(t) for t in inputs(a.size))
    ctx = ctx[..., : unet.config.context_dim].to(dtype).contiguous()
    t = torch.full((2,), 500.0)
    cpu = torch.device("cpu")
    with torch.inference_mode(), sampling_heap(cpu), packed_convs(cpu):  # as a render samples
        unet(x, t, ctx)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        unet(x, t, ctx)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            unet(x, t, ctx)
    cats: dict = defaultdict(float)
    detail: dict = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.cpu_parent is not None or not ev.name.startswith(("aten::", "mkldnn::")):  # mkldnn: packed convs
            continue
        cat, key = classify_torch(ev.name, ev.input_shapes)
        us = ev.cpu_time_total
        cats[cat] += us / 1e6
        detail[f"{cat} | {key}"][0] += us / 1e6
        detail[f"{cat} | {key}"][1] += 1
    return {"wall": wall, "cpu": cpu, "threads": torch.get_num_threads(), "cats": cats, "detail": detail,
            "profiled_total": sum(cats.values())}  # fmt: skip


def classify_torch(name: str, shapes: list) -> tuple[str, str]:
    op = name.split("::")[-1]
    if op in ("conv2d", "convolution", "_convolution", "mkldnn_convolution", "_convolution_pointwise"):
        w = shapes[1]
        kind = "conv 1x1" if w[-1] == 1 and w[-2] == 1 else "conv 3x3"
        return kind, f"{w[1]}->{w[0]} @ {shapes[0][-2]}x{shapes[0][-1]}"
    if op in ("addmm", "mm") and len(shapes[0]) == 2 and shapes[0][-1] == 1:  # PointwiseConv: bias (C, 1)
        return "conv 1x1", f"{shapes[1][1]}->{shapes[1][0]} x{shapes[2][1]}"
    if op == "scaled_dot_product_attention":
        q, k = shapes[0], shapes[1]
        cat = "cross-attention core" if k[-2] == 77 else "self-attention core"
        return cat, f"{q[-2]}x{k[-2]} d{q[-1]}"
    if op == "_linear_pointwise":  # models/fused_linear.py: GEGLU's halves, projections with the residual add
        return "linear", "with post-op " + "x".join(map(str, shapes[0]))
    if op in ("linear", "addmm", "mm", "matmul", "bmm"):
        return "linear", "x".join(map(str, shapes[0])) + " . " + "x".join(map(str, shapes[1]))
    if op in ("group_norm", "native_group_norm", "batch_norm", "native_batch_norm"):
        return "GroupNorm", f"{shapes[0][1]} @ {shapes[0][-2]}x{shapes[0][-1]}"
    if op in ("layer_norm", "native_layer_norm"):
        return "LayerNorm", "x".join(map(str, shapes[0]))
    if op in ("copy_", "contiguous", "clone", "cat", "to", "_to_copy", "reshape", "empty_like", "empty"):
        return "copies / reorders", op + " " + "x".join(map(str, shapes[0] if shapes else []))
    if op in ("silu", "silu_", "gelu", "gelu_", "add", "add_", "mul", "mul_", "upsample_nearest2d", "sigmoid",
              "interpolate", "tanh", "sub", "div", "cos", "sin", "exp"):  # fmt: skip
        return "element-wise", op
    return "other", op


# --- OpenVINO --------------------------------------------------------------------------------------------------

def ov_worker(a) -> dict:
    import numpy as np
    import openvino as ov

    core = ov.Core()
    model = core.read_model(a.ir)
    ctx_dim = model.input("encoder_hidden_states").get_partial_shape()[2].get_length()
    model.reshape({"sample": [2, 4, a.size // 8, a.size // 8], "timestep": [1], "encoder_hidden_states": [2, 77, ctx_dim]})
    config = {"INFERENCE_NUM_THREADS": str(a.threads), "PERFORMANCE_HINT": "LATENCY"}  # optimum's settings
    t0 = time.perf_counter()
    plain = core.compile_model(model, "CPU", config)
    compile_s = time.perf_counter() - t0
    x, ctx = inputs(a.size)
    feed = {"sample": x, "timestep": np.array([500], dtype=np.int64), "encoder_hidden_states": ctx[..., :ctx_dim].copy()}
    req = plain.create_infer_request()
    req.infer(feed)  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    req.infer(feed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    precision = str(plain.get_property("INFERENCE_PRECISION_HINT"))
    del req, plain
    prof = core.compile_model(model, "CPU", {**config, "PERF_COUNT": "YES"})
    req = prof.create_infer_request()
    req.infer(feed)  # the first call's counters include one-time work
    req.infer(feed)
    rt = {op.get_friendly_name(): op for op in prof.get_runtime_model().get_ordered_ops()}
    cats: dict = defaultdict(float)
    detail: dict = defaultdict(lambda: [0.0, 0])
    for info in req.profiling_info:
        if str(info.status) != "Status.EXECUTED":
            continue
        s = info.real_time.total_seconds()
        cat, key = classify_ov(info, rt.get(info.node_name))
        cats[cat] += s
        detail[f"{cat} | {key}"][0] += s
        detail[f"{cat} | {key}"][1] += 1
    return {"wall": wall, "cpu": cpu, "compile_s": compile_s, "precision": precision, "version": ov.__version__,
            "cats": cats, "detail": detail, "profiled_total": sum(cats.values())}  # fmt: skip


ATTN = re.compile(r"scaled_dot_product_attention|softmax|aten::bmm|aten::baddbmm|/MatMul|ScaledDotProduct", re.I)


def classify_ov(info, op) -> tuple[str, str]:
    kind = info.node_type
    names = ""
    shapes: list = []
    if op is not None:
        rti = op.get_rt_info()
        names = rti["originalLayersNames"].astype(str) if "originalLayersNames" in rti else ""
        shapes = [str(i.get_partial_shape()) for i in op.inputs()]
    module = _module(names or info.node_name)
    exec_type = info.exec_type
    if kind == "Convolution":
        w = shapes[1] if len(shapes) > 1 else "?"
        k = "conv 1x1" if w.endswith(",1,1]") else "conv 3x3"
        return k, f"{w} @ {shapes[0] if shapes else '?'} [{exec_type}]"
    if kind in ("MHA", "ScaledDotProductAttention") or (kind in ("Subgraph", "MatMul", "Softmax") and ATTN.search(names)):
        cross = "attn2" in names
        return ("cross-attention core" if cross else "self-attention core"), f"{kind} {module} {shapes[:1]} [{exec_type}]"
    if kind in ("FullyConnected", "MatMul", "Gemm"):
        return "linear", f"{kind} {shapes[:2]} [{exec_type}]"
    if "group_norm" in names:
        return "GroupNorm", f"{kind} {module} [{exec_type}]"
    if "layer_norm" in names:
        return "LayerNorm", f"{kind} {shapes[:1]} [{exec_type}]"
    if kind in ("Reorder", "Transpose", "Concat", "Reshape", "Gather", "StridedSlice", "VariadicSplit", "Split",
                "Convert", "Broadcast"):  # fmt: skip
        return "copies / reorders", f"{kind} [{exec_type}]"
    if kind in ("Subgraph", "Eltwise", "Add", "Multiply", "SwishCPU", "Interpolate", "Gelu", "Subtract", "Sin",
                "Cos", "Divide", "Power", "Sqrt"):  # fmt: skip
        return "element-wise", f"{kind} [{exec_type}]"
    return "other", f"{kind} {module} [{exec_type}]"


def _module(names: str) -> str:
    m = re.search(r"__module\.([\w.]+)", names)
    return m.group(1) if m else names[:60]


# --- the table ------------------------------------------------------------------------------------------------

def summary_line(r: dict) -> str:
    return (f"{r['side']} round {r['round']}: call wall {r['wall']:.2f} s, CPU {r['cpu']:.2f} s; "
            f"profiled call {r['profiled_total']:.2f} s")  # fmt: skip


def table(runs: list[dict], a) -> str:
    best = {}
    for r in runs:  # the round with the lower CPU time per side
        if r["side"] not in best or r["cpu"] < best[r["side"]]["cpu"]:
            best[r["side"]] = r
    sides = [s for s in ("sdcli", "openvino") if s in best]
    head = "| category | " + " | ".join(f"{s} s | {s} %" for s in sides) + (" | sdcli / OpenVINO |" if len(sides) == 2 else " |")
    lines = [head, "|" + "---|" * (1 + 2 * len(sides) + (len(sides) == 2))]
    for cat in CATEGORIES:
        row = [cat]
        for s in sides:
            v, tot = best[s]["cats"].get(cat, 0.0), best[s]["profiled_total"]
            row += [f"{v:.2f}", f"{100 * v / tot:.1f}"]
        if len(sides) == 2:
            o = best["openvino"]["cats"].get(cat, 0.0)
            row.append(f"{best['sdcli']['cats'].get(cat, 0.0) / o:.2f}x" if o else "-")
        lines.append("| " + " | ".join(row) + " |")
    tot = ["**profiled call**"] + [x for s in sides for x in (f"{best[s]['profiled_total']:.2f}", "100")]
    lines.append("| " + " | ".join(tot + ([""] if len(sides) == 2 else [])) + " |")
    lines.append("")
    for s in sides:
        r = best[s]
        lines.append(f"- {s}: plain call wall {r['wall']:.2f} s, process CPU {r['cpu']:.2f} s (round {r['round']}); "
                     + ", ".join(f"round {x['round']} {x['wall']:.2f} / {x['cpu']:.2f} s" for x in runs if x['side'] == s))
    for s in sides:
        lines.append(f"\n{s}: top entries (category | key: seconds, calls)")
        top = sorted(best[s]["detail"].items(), key=lambda kv: -kv[1][0])[:40]
        lines += [f"    {k}: {v[0]:.3f} s, {v[1]}" for k, v in top]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
