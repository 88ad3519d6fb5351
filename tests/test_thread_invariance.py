"""Same settings, same bytes, whatever the number of CPU threads (issue 24).

End to end: the CLI renders the same jobs (txt2img, img2img, hires fix, inpaint, ControlNet, SDXL with guidance
rescale, a TAESD decode; fp32 and bf16; tiny random models at 64x64, 2-3 steps) in one subprocess per thread count
(torch.set_num_threads 1, 2, 3, 4 before the CLI starts: OMP_NUM_THREADS alone is capped at the core count; the
four run at once), and every PNG, and generate's final latent, must be the same at every count. 3 threads
matters: torch's element-wise chunks only fall off the SIMD stride at counts that do not divide the map. The tiny
maps still reach every fixed kernel: the VAE's 64x64 maps are above torch's 32768-element grain and the
1024-pixel GroupNorm threshold.

Unit level (models/invariant.py), in this process switching torch.set_num_threads (the same results as fresh
processes, scripts/probe_threads.py --check-switch): each fixed op at full SD shapes gives one result for 1-8
threads, equal to torch's own one-thread result where the formulation is torch's (element-wise ops, the fp32 1x1
GEMM), and GroupNorm stays as close to an fp32 reference as torch's kernel is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from make_checkpoint import make_checkpoint, make_controlnet
from PIL import Image
from safetensors.torch import load_file, save_file

from _fixtures_dit import dit_components, dit_dir, tiny_flux, tiny_sd3  # noqa: F401
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir  # noqa: F401
from sdcli.models import invariant
from sdcli.models.taesd import TinyDecoder
from sdcli.runtime import device

THREADS = (1, 2, 3, 4)
ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
assert torch.get_num_threads() == int(sys.argv[1])
from typer.testing import CliRunner
from sdcli.cli import app

runner = CliRunner()
for args in json.loads(sys.argv[2]):
    result = runner.invoke(app, args)
    if result.exit_code != 0:
        print(json.dumps({"args": args, "exit": result.exit_code, "stderr": result.stderr[-3000:],
                          "exception": repr(result.exception)}))
        sys.exit(1)
"""


BF16_JOBS = ("txt2img", "hires", "inpaint", "controlnet", "sdxl", "sd3", "flux")  # img2img's encoder: inpaint


def _jobs(files: dict[str, Path], dtype: str) -> dict[str, list[str]]:
    """name -> CLI arguments (without -o) of every job in fp32, of BF16_JOBS in bf16."""
    base = ["--dtype", dtype, "--device", "cpu", "--seed", "4", "--cfg", "5", "--steps", "2"]
    sd1 = ["-m", str(files["sd1"]), *base]
    gen = ["generate", "a red fox", "-W", "64", "-H", "64"]
    jobs = {
        "txt2img": [*gen, *sd1, "-n", "2", "--sampler", "euler_a"],
        "img2img": ["img2img", "a red door", "-i", str(files["image"]), *sd1, "--strength", "0.7", "--steps", "3"],
        "hires": [*gen, *sd1, "--hires-scale", "2", "--hires-steps", "2"],
        "inpaint": ["img2img", "a red door", "-i", str(files["image"]), "--mask", str(files["mask"]),
                    "-m", str(files["inpaint"]), *base],
        "controlnet": [*gen, *sd1, "--controlnet", str(files["cn"]), "--control-image", str(files["image"])],
        "sdxl": [*gen, "-m", str(files["sdxl"]), *base, "--guidance-rescale", "0.7", "--sampler", "dpm++_2m"],
        "taesd": [*gen, *sd1, "--vae", str(files["taesd"])],
        # Two images per batch at sizes whose MLP activations torch splits off the SIMD stride at 3 threads (SD3:
        # 56 image tokens; FLUX: the 512 text tokens of two images), as full-size models do at most counts
        "sd3": ["generate", "a red fox", "-W", "128", "-H", "112", "-m", str(files["sd3"]), *base, "-n", "2",
                "--batch-size", "2"],
        "flux": ["generate", "a red fox", "-W", "80", "-H", "64", "-m", str(files["flux"]), *base, "-n", "2",
                 "--batch-size", "2", "--vae", str(files["ae"]), "--clip-l", str(files["clip_l"]),
                 "--t5", str(files["t5"])],
    }  # fmt: skip
    return jobs if dtype == "fp32" else {k: v for k, v in jobs.items() if k in BF16_JOBS}


@pytest.fixture(scope="module")
def files(tiny_sd1, tiny_sdxl, tiny_models_dir, tiny_sd3, tiny_flux, dit_components) -> dict[str, Path]:  # noqa: F811
    folder = tiny_models_dir / "thread_invariance"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    inpaint = folder / "inpaint.safetensors"
    if not inpaint.exists():
        make_checkpoint(inpaint, "sd1", "tiny", seed=0, layout="single", inpaint=True)
    cn = folder / "cn.safetensors"
    if not cn.exists():
        make_controlnet(cn, "sd1")
    taesd = folder / "taesd_decoder.safetensors"
    if not taesd.exists():  # our own module tree is the file's key tree (madebyollin's taesd_decoder layout)
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in TinyDecoder(4, 16).state_dict().items()}, taesd)
    return {"sd1": tiny_sd1, "sdxl": tiny_sdxl, "inpaint": inpaint, "cn": cn, "taesd": taesd,
            "image": folder / "in.png", "mask": folder / "mask.png", "sd3": tiny_sd3, "flux": tiny_flux,
            "ae": dit_components["vae"], "clip_l": dit_components["clip_l"], "t5": dit_components["t5"]}


# On an AMX CPU oneDNN's bf16 GEMMs split some sums by thread count (the known gap that
# test_sd3_and_flux_mlps_give_one_result_at_every_count marks), so there the renders run oneDNN's AVX512-BF16
# kernels, the documented way to one result on such a CPU (docs/benchmarks.md), and all of sdcli's own
# thread-count handling is checked as on any other CPU.
ONE_RESULT_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"} if device.cpu_has_amx() else {}


@pytest.fixture(scope="module")
def renders(files, tmp_path_factory) -> dict[int, Path]:
    """thread count -> the folder its subprocess rendered every job into (both dtypes). The four run at once: the
    bytes cannot depend on how the OS schedules them, and the file's wall time halves on two cores."""
    root = tmp_path_factory.mktemp("thread_renders")
    out, running = {}, {}
    for threads in THREADS:
        folder = out[threads] = root / f"t{threads}"
        folder.mkdir()
        args = []
        for dtype in ("fp32", "bf16"):
            for name, job in _jobs(files, dtype).items():
                latent = [str(folder / f"{name}-{dtype}-{{index}}.safetensors")] if job[0] == "generate" else []
                args.append([*job, "-o", str(folder / f"{name}-{dtype}-{{index}}.png"),
                             *(["--latent-out", *latent] if latent else [])])
        # this tree's sdcli; passive: oversubscribed threads sleep, not spin
        env = dict(os.environ, **ONE_RESULT_ENV, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
                   NO_COLOR="1", XDG_CONFIG_HOME=str(root / "xdg"),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        running[threads] = subprocess.Popen([sys.executable, "-c", DRIVER, str(threads), json.dumps(args)], env=env,
                                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for threads, proc in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, (threads, stdout[-3000:], stderr[-3000:])
    return out


@pytest.mark.parametrize("name,dtype", [(n, "fp32") for n in ("txt2img", "img2img", "hires", "inpaint", "controlnet",
                                                                "sdxl", "taesd", "sd3", "flux")] +
                         [(n, "bf16") for n in BF16_JOBS])
def test_cli_renders_the_same_bytes_at_every_thread_count(renders, name, dtype):
    """Every PNG the same file; the final latents (generate's --latent-out) the same tensor bytes, which also catches
    a UNet difference too small to move an 8-bit pixel."""
    paths = {t: sorted(folder.glob(f"{name}-{dtype}[-.]*")) for t, folder in renders.items()}
    assert any(p.suffix == ".png" for p in paths[1]), f"no image for {name} {dtype}"
    assert all([p.name for p in ps] == [p.name for p in paths[1]] for ps in paths.values())
    for i, one in enumerate(paths[1]):
        ref = _content(one)
        differing = [t for t in THREADS[1:] if _content(paths[t][i]) != ref]
        assert not differing, f"{one.name}: other bytes with {differing} threads than with 1"


def _content(path: Path) -> bytes | dict:
    if path.suffix == ".safetensors":
        return {k: v.numpy().tobytes() for k, v in load_file(path).items()}
    return path.read_bytes()


def test_configure_sets_the_runs_thread_count():
    """device.configure(placement, threads): what `--threads N` (config key `threads`) passes; None keeps torch's."""
    from sdcli.runtime import device

    before = torch.get_num_threads()
    try:
        device.configure(device.Placement("cpu", "fp32"), threads=3)
        assert torch.get_num_threads() == 3
        device.configure(device.Placement("cpu", "fp32"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --- unit level -----------------------------------------------------------------------------------------------

def _per_thread_count(fn, counts=range(1, 9)) -> list[torch.Tensor]:
    before = torch.get_num_threads()
    try:
        outs = []
        for t in counts:
            torch.set_num_threads(t)
            with torch.inference_mode():
                outs.append(fn())
        return outs
    finally:
        torch.set_num_threads(before)


def _one_result(outs: list[torch.Tensor]) -> torch.Tensor:
    for i, o in enumerate(outs[1:], start=2):
        assert o.stride() == outs[0].stride() and torch.equal(o, outs[0]), f"{i} threads differ from 1"
    return outs[0]


@pytest.mark.parametrize("numel", [32768 * 40, 320 * 54 * 96 + 7, 3 * 32768 + 100, 32768, 1000, 2 * 333 * 6144,
                                   16385, 20000])
@pytest.mark.parametrize("threads", [2, 3, 5, 7, 12, 80])
@pytest.mark.parametrize("rule", ["grain", "gelu"])
def test_pieces_split_on_the_boundaries(numel, threads, rule):
    """Each piece splits (torch's formula for the op: GELU's kernel has a grain of its own) into chunks that start
    on ALIGN boundaries, and the pieces tile the range."""
    pieces = invariant._pieces(numel, threads, rule)
    assert pieces[0][0] == 0 and pieces[-1][1] == numel and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    for begin, end in pieces:
        assert begin % invariant.ALIGN == 0 and invariant._chunk_aligned(end - begin, threads, rule)


@pytest.mark.parametrize("op,ref", [(invariant.silu, F.silu), (invariant.gelu, F.gelu),
                                    (invariant.sigmoid, torch.sigmoid), (invariant.tanh, torch.tanh),
                                    (partial(invariant.gelu, approximate="tanh"),
                                     partial(F.gelu, approximate="tanh"))])  # fmt: skip
@pytest.mark.parametrize("shape", [(1, 320, 54, 96), (2, 333, 6144, 1)])
def test_elementwise_ops_equal_torchs_one_thread_result_at_every_count(op, ref, shape):
    """1.66M elements: torch's own chunks fall off the stride at 3, 6, 7 threads; SD3's MLP (2 x 333 x 6144): a
    GELU piece of fewer than `threads` grains would (GELU's own grain). A channels_last map in fp32 and bf16: torch
    runs erf GELU through oneDNN on a contiguous tensor only (fp32; bf16 on AVX-512), so the map's pieces must not."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    expected = _per_thread_count(lambda: ref(x), [1])[0]
    assert torch.equal(_one_result(_per_thread_count(lambda: op(x))), expected)
    assert torch.equal(_one_result(_per_thread_count(lambda: op(x.clone(), inplace=True))), expected)
    for dtype in (torch.float32, torch.bfloat16):  # erf GELU's kernel on a channels_last map is not oneDNN's
        cl = x.to(dtype).contiguous(memory_format=torch.channels_last)
        out = _one_result(_per_thread_count(lambda: op(cl)))
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, _per_thread_count(lambda: ref(cl), [1])[0])
    assert torch._C._get_mkldnn_enabled()  # switched back on after a channels_last map's pieces


def test_a_strided_view_runs_as_its_dense_copy():
    """GEGLU's gate is a strided chunk: the result is the dense op's, at every count (torch's strided loop is
    partly scalar, and not invariant)."""
    torch.manual_seed(0)
    h = torch.randn(2, 1024, 1280)
    gate = h[..., 640:]
    dense = _per_thread_count(lambda: F.gelu(gate.contiguous()), [1])[0]
    assert torch.equal(_one_result(_per_thread_count(lambda: invariant.gelu(gate))), dense)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_pointwise_conv_is_the_one_thread_gemm(layout):
    torch.manual_seed(0)
    conv = invariant.PointwiseConv(640, 320)
    x = torch.randn(2, 640, 32, 32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 640, 32, 64)[..., ::2]
    out = _one_result(_per_thread_count(lambda: conv(x)))
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    with torch.inference_mode():
        expected = _per_thread_count(lambda: F.conv2d(x.contiguous(), conv.weight, conv.bias), [1])[0]
        if layout != "channels_last":  # torch's one-thread 1x1 path is this GEMM: the same bytes
            assert torch.equal(out, expected)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)  # (HW, C) @ W^T: another order, fp32 close


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 640, 32, 64), (1, 128, 96, 54)])
def test_channels_last_group_norm_is_invariant_and_as_close_as_torchs(dtype, shape):
    torch.manual_seed(0)
    norm = invariant.GroupNorm(32, shape[1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    norm = norm.to(dtype)
    x = (torch.randn(shape) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    out = _one_result(_per_thread_count(lambda: norm(x)))
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    exact = F.group_norm(x.float().contiguous(), 32, norm.weight.float(), norm.bias.float(), 1e-6)
    with torch.inference_mode():
        torchs = F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)
    assert (out.float() - exact).abs().max() <= (torchs.float() - exact).abs().max() * 1.01 + 1e-6


# A known gap (docs/benchmarks.md, "Round 3 on an AMX CPU"): oneDNN's bf16 GEMMs on AMX tiles split the sum over K
# between threads for some shapes (512 x 5120 -> 1280 at 2 threads, 154 x 768 -> 320 at 3+), so there a bf16 result
# depends on the thread count. strict: the day this passes on AMX, the mark must go.
AMX_SPLITS_K = pytest.mark.xfail(device.cpu_has_amx(), strict=True,
                                 reason="oneDNN's AMX bf16 GEMMs split K by thread count")


@pytest.mark.parametrize("m, k, n", [(512, 5120, 1280), (2, 1280, 320), (2, 32, 128)])
def test_fp32_gemms_give_one_result_at_every_count(m, k, n):
    """MKL on Intel CPUs splits sums of 5120+ terms over threads (at 2, 6 and 8 of them on a Sapphire Rapids-class
    CPU) unless strict CNR is on; on AMD CPUs MKL with CNR on moved a GEMM of 2 rows (the time embedding under CFG)
    at 3 threads (Zen 5), and gives one result without it. sdcli sets MKL_CBWR on import on Intel CPUs only."""
    torch.manual_seed(0)
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
    with torch.inference_mode():
        _one_result(_per_thread_count(lambda: F.linear(x, w, b)))


def test_sdcli_asks_mkl_for_one_order_on_intel_and_leaves_a_callers_choice():
    code = "import os, sdcli; print(os.environ.get('MKL_CBWR'))"
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    run = partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, check=True)
    intel = "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    assert device.intel_cpu() == intel
    assert run(env=env).stdout.strip() == ("AUTO,STRICT" if intel else "None")
    assert run(env={**env, "MKL_CBWR": "COMPATIBLE"}).stdout.strip() == "COMPATIBLE"


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=AMX_SPLITS_K)])
def test_sd3_and_flux_mlps_give_one_result_at_every_count(dtype):
    """The tanh-GELU MLPs at real widths (SD3.5 Medium: 1536 -> 6144; a FLUX single block's fused linear1, whose
    MLP half is a strided slice): one result for 1-8 threads, where torch's own GELU moves at 3, 5, 6, 7
    (scripts/probe_threads.py --dit). The Mlp equals its plain one-thread computation: torch's GELU after fc1, or
    on a bf16 CPU with oneDNN's bf16 GEMMs the GELU as fc1's post-op (models/fused_linear.py)."""
    from sdcli.models import flux, fused_linear, mmdit

    torch.manual_seed(0)
    mlp = mmdit.Mlp(1536, 6144).to(dtype)
    x = torch.randn(2, 333, 1536, dtype=dtype)
    with torch.inference_mode():
        fused = fused_linear.fusable(x, mlp.fc1)
        hidden = ((lambda: fused_linear.linear_gelu(x, mlp.fc1, "tanh")) if fused
                  else (lambda: F.gelu(mlp.fc1(x), approximate="tanh")))  # fmt: skip
        plain = _per_thread_count(lambda: mlp.fc2(hidden()), [1])[0]
    assert torch.equal(_one_result(_per_thread_count(lambda: mlp(x))), plain)
    cfg = flux.FluxConfig(hidden_size=256, mlp_hidden_dim=1024, num_heads=2, depth=1, depth_single_blocks=1)
    block = flux.SingleStreamBlock(cfg).to(dtype)
    for w in block.parameters():
        torch.nn.init.normal_(w, std=0.05)
    tokens = torch.randn(1, 300, 256, dtype=dtype)
    ids = torch.cat([flux.text_ids(256), flux.image_ids(4, 44)])[None]  # 256 text + 44 image tokens
    pe = flux.rope(ids, cfg.axes_dim, cfg.theta)
    _one_result(_per_thread_count(lambda: block(tokens, torch.ones(1, 256, dtype=dtype), pe)))
