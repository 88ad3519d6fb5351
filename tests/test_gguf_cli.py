"""GGUF models through the real commands: `convert --quantize` -> `generate`, `inspect`, LoRA, residency, bad files.

What is proved, on the tiny random checkpoints (tests/_fixtures_models.py, _fixtures_sdxl.py):
- a float GGUF (F32, F16) of the same weights renders the SAME latents and pixels as the safetensors file, in fp32
  and bf16 compute on the CPU: GGUF float tensors take the safetensors path byte for byte (F16 Linear weights
  under fp32 stay F16 and are cast in the forward: the same bytes again);
- a Q8_0 GGUF renders exactly what its dequantized weights render through the ordinary float path (`convert
  q8.gguf -o deq.safetensors`, GGML blocks -> float32 bit-equal to gguf.quants, tests/test_gguf.py): the
  quantized layers compute with those weights, dequantized per layer; the dequantized weights are within Q8_0's
  rounding of the originals, so the image stays close to the float render (PSNR bound below, measured);
- a LoRA on the quantized model (added at run time in each forward) gives the bytes of the LoRA merged into the
  dequantized model; switching LoRA sets, and residency lean/offload rebuilding parts, give keep's bytes;
- stable-diffusion.cpp's own names for SDXL (both text encoders under cond_stage_model., bigG's OpenCLIP
  projection under its bare name, proj_in stored as a 1x1 conv) render what sdcli's own names render;
- the written files pass gguf.GGUFReader; `inspect` reports each part's types, bytes and bits per weight;
- a crafted or truncated GGUF through `generate -m` exits 3 and writes nothing; NaN scales exit 5.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _cli import invoker, pixels
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from _fixtures_dit import dit_components, dit_dir, tiny_flux, tiny_sd3  # noqa: F401
from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_dir  # noqa: F401
from sdcli.formats.gguf import T5_LAYERS, T5_NAMES, ldm_names, read_gguf_header
from sdcli.loading import residency
from sdcli.loading.checkpoint import load_models
from sdcli.loading.lora import _part_targets
from sdcli.output.metadata import read_image_metadata
from sdcli.quant.layers import holds_blocks
from sdcli.quant.quantize import parse_type_rules, write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

RENDER = ["--steps", "2", "-W", "64", "-H", "64", "--sampler", "euler", "--cfg", "5", "--seed", "7"]
# Q8_0 vs float32 weights, after 2 steps and the VAE: measured 37-39 dB on these random models (the bound leaves
# room for other seeds; a dequantizer off by a block or a scale gives < 15 dB)
MIN_Q8_PSNR = 30.0


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_sd1):  # noqa: F811
    """The tiny SD1 as F32, Q8_0 and F16 GGUF (the last from an fp16 copy), Q8_0 dequantized back, a LoRA."""
    folder = tmp_path_factory.mktemp("gguf_cli")
    run = invoker({})
    out = {"st32": tiny_sd1, "st16": folder / "sd1-fp16.safetensors"}
    save_file({k: v.half() for k, v in load_file(tiny_sd1).items()}, str(out["st16"]))
    for name, src, qtype, *extra in (("f32", tiny_sd1, "f32"), ("q8", tiny_sd1, "q8_0"), ("f16", out["st16"], "f16"),
                                     ("q4c", tiny_sd1, "q4_0", "--quantize-convs")):  # fmt: skip
        out[name] = folder / f"sd1-{name}.gguf"
        run("convert", str(src), "-o", str(out[name]), "--quantize", qtype, *extra)
    for name in ("q8", "q4c"):
        out[f"deq-{name}"] = folder / f"sd1-{name}-dequantized.safetensors"
        run("convert", str(out[name]), "-o", str(out[f"deq-{name}"]))
    out["deq"] = out["deq-q8"]
    out["lora"] = folder / "loras" / "style.safetensors"
    out["lora"].parent.mkdir()
    _make_lora(load_models(tiny_sd1), out["lora"])
    return out


def _make_lora(models, path: Path) -> None:
    """Rank-2 kohya LoRA on every 3rd Linear of the UNet and of the text encoder (the quantized layers among them)."""
    gen = torch.Generator().manual_seed(2)
    state = {}
    for part, modules in (("unet", (models.unet,)), ("text", models.text_encoders)):
        seen: set[int] = set()
        linears = [(n, m) for n, m in _part_targets(part, modules, models.info.unet).items()
                   if isinstance(m, torch.nn.Linear) and not (id(m) in seen or seen.add(id(m)))]
        for name, module in linears[::3]:
            out_f, in_f = module.weight.shape
            state[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=gen) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=gen) * 0.3
            state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))


def _render(tmp_path: Path, model: Path, *args: str, name: str = "out", dtype: str = "fp32", device: str = "cpu",
            expect: int = 0) -> tuple[np.ndarray, torch.Tensor] | None:  # fmt: skip
    """(pixels, latent) of one `generate` of `model`, written under tmp_path as NAME.png / NAME.safetensors."""
    png, latent = tmp_path / f"{name}.png", tmp_path / f"{name}.latent.safetensors"
    result = invoker({})("generate", "a red fox", "-m", str(model), *RENDER, "--dtype", dtype, "--device", device,
                         "-o", str(png), "--latent-out", str(latent), *args, expect=expect)  # fmt: skip
    assert "CUDA graphs off" not in result.stderr  # dequantizing layers capture like any other
    if expect:
        assert not png.exists() and not latent.exists()
        return None
    return pixels(png), next(iter(load_file(latent).values()))


@pytest.fixture(scope="module")
def rendered(files, tmp_path_factory):
    """render(name of a file in `files`, dtype, *args): _render's result, made once per module (the same
    reference renders serve several tests)."""
    folder, done = tmp_path_factory.mktemp("renders"), {}

    def render(model: str, dtype: str = "fp32", *args: str):
        key = (model, dtype, args)
        if key not in done:
            done[key] = _render(folder, files[model], *args, name=f"r{len(done)}", dtype=dtype)
        return done[key]

    return render


def _same(a, b) -> None:
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --- float GGUF = safetensors, bit for bit ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("pair", [("st32", "f32"), ("st16", "f16")])
def test_float_gguf_renders_the_safetensors_bytes(rendered, pair, dtype):
    st, gg = pair
    _same(rendered(st, dtype), rendered(gg, dtype))


def test_f16_linears_stay_as_stored_under_fp32(files):
    """fp32 compute: an F16 GGUF's Linear weights stay at 2 bytes and are cast in each forward (the test above
    shows the bytes are the same), not held a second time at 4; conv kernels, and bf16 compute, load as any file."""
    info = read_gguf_header(files["f16"])
    stored = {ldm.removeprefix("model.diffusion_model."): info.tensors[name].qtype.name
              for name, ldm in ldm_names(info).items()}  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        unet = load_models(files["f16"], dtype=dtype, residency="keep").unet
        linears = {n: m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
        f16 = {n for n in linears if stored[n + ".weight"] == "F16"}  # the smallest stay F32 (convert's rules)
        assert f16 and {n for n, m in linears.items() if holds_blocks(m)} == (f16 if dtype == torch.float32 else set())
        assert all(linears[n].weight.numel() == 2 * math.prod(linears[n].weight_shape)
                   for n in f16 if dtype == torch.float32)  # fmt: skip
        assert not any(holds_blocks(m) for m in unet.modules() if isinstance(m, torch.nn.Conv2d))


# --- Q8_0: the dequantized model's bytes, close to the float one -------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_q8_0_renders_its_dequantized_weights(rendered, dtype):
    q8 = rendered("q8", dtype)
    _same(q8, rendered("deq", dtype))
    ref = rendered("st32", dtype)
    assert not np.array_equal(q8[0], ref[0])  # the blocks were used, not a float copy
    assert _psnr(q8[0], ref[0]) > MIN_Q8_PSNR


def test_quantized_convs_city96_layout(files, rendered):
    """--quantize-convs: 3x3 kernels stored as 256-wide Q4_0 rows with their shape in comfy.gguf.orig_shape.*,
    run as QuantizedConv2d, rendering exactly their dequantized weights."""
    reader = gguf.GGUFReader(files["q4c"])
    conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    stored = next(t for t in reader.tensors if t.name == conv)
    assert stored.tensor_type.name == "Q4_0" and list(stored.shape) == [256, 32 * 32 * 9 // 256]
    assert list(reader.fields["comfy.gguf.orig_shape." + conv].contents()) == [32, 32, 3, 3]
    unet = load_models(files["q4c"]).unet
    assert holds_blocks(unet.input_blocks[1][0].in_layers[2]) and unet.input_blocks[1][0].in_layers[2].weight_shape \
        == (32, 32, 3, 3)  # fmt: skip
    _same(rendered("q4c"), rendered("deq-q4c"))


@pytest.mark.parametrize("device", ["cuda"] if torch.cuda.is_available() else [])
def test_q8_0_on_cuda_in_fp16(files, device, tmp_path):
    """On a GPU (fp16, the UNet replayed as a CUDA graph): the Q8_0 file renders its dequantized weights' bytes,
    with a LoRA too, and under --offload (blocks moved between the GPU and CPU RAM)."""
    lora = ("--lora", f"{files['lora']}:0.8")
    for i, extra in enumerate(((), lora, ("--offload",), (*lora, "--offload"))):
        q8 = _render(tmp_path, files["q8"], *extra, name=f"q8-{i}", dtype="fp16", device=device)
        _same(q8, _render(tmp_path, files["deq"], *extra, name=f"deq-{i}", dtype="fp16", device=device))


def test_the_quantized_layers_hold_blocks(files):
    """The Q8_0 model computes with GGML blocks (not a float copy made at load); the VAE is plain."""
    models = load_models(files["q8"])
    held = [m for m in models.unet.modules() if holds_blocks(m)]
    stored = {t.name for t in read_gguf_header(files["q8"]).tensors.values() if t.qtype.name == "Q8_0"}
    assert len(held) == sum(n.startswith("model.diffusion_model.") for n in stored) > 0
    assert all(m.weight.dtype == torch.uint8 for m in held)
    assert not any(holds_blocks(m) for m in models.vae.modules())
    assert any(holds_blocks(m) for m in models.text_encoder.modules())


# --- LoRA and residency -------------------------------------------------------------------------------------------

def test_lora_on_quantized_layers_equals_merging_into_the_dequantized_model(files, rendered):
    lora = ("--lora", f"{files['lora']}:0.8")
    q8 = rendered("q8", "fp32", *lora)
    _same(q8, rendered("deq", "fp32", *lora))
    assert not np.array_equal(q8[0], rendered("q8")[0])  # the LoRA did something


def test_switching_loras_under_every_residency_policy(files, tmp_path, monkeypatch):
    """LoRA, none, LoRA: run-time LoRAs added, taken back and added again, on parts built (and rebuilt) at
    different moments under keep, lean and offload: the same bytes, and the dequantized model's."""
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a fox <lora:style:0.8>", "output": "j1.png"}, {"prompt": "a fox", "output": "j2.png"},
             {"prompt": "a cat <lora:style:-0.5>", "output": "j3.png"}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seen = {}
    for policy, model in (("keep", "q8"), ("lean", "q8"), ("offload", "q8"), ("keep", "deq")):
        folder = tmp_path / f"{policy}-{model}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        monkeypatch.setenv(residency.POLICY_ENV, policy)
        invoker({})("generate", "--prompts-file", str(jobs), "--lora-dir", str(files["lora"].parent), "-m",
                    str(files[model]), *RENDER, "--dtype", "fp32", "--device", "cpu")  # fmt: skip
        seen[policy, model] = {n: pixels(folder / n) for n in ("j1.png", "j2.png", "j3.png")}
    for key, images in seen.items():
        assert all(np.array_equal(images[n], seen["keep", "q8"][n]) for n in images), key
    assert not np.array_equal(seen["keep", "q8"]["j1.png"], seen["keep", "q8"]["j2.png"])


# --- SDXL: sdcli's names and stable-diffusion.cpp's -------------------------------------------------------------

SDCPP_RULES = "text_projection=f32,proj_in=f32,proj_out=f32"  # what the two layouts store differently stays float


def _sdcpp_sdxl(tiny_sdxl: Path, out: Path, unsqueeze: bool) -> None:  # noqa: F811
    """The tiny SDXL as stable-diffusion.cpp names it: CLIP-L under cond_stage_model.transformer., bigG in
    transformers names (q/k/v split) under cond_stage_model.1.transformer. with OpenCLIP's (width, proj) projection
    as text_model.text_projection; with `unsqueeze`, proj_in/proj_out as 1x1 convs (as its converter stores
    them). Q8_0 where sdcli would quantize."""
    models = load_models(tiny_sdxl)
    state = {k: v for k, v in load_file(tiny_sdxl).items() if not k.startswith("conditioner.")}
    for k in [k for k in state if unsqueeze and k.endswith(("proj_in.weight", "proj_out.weight")) and
              k.startswith("model.diffusion_model.")]:  # fmt: skip
        state[k] = state[k][:, :, None, None]
    clip_l, big_g = models.text_encoders
    for prefix, encoder in (("cond_stage_model.", clip_l), ("cond_stage_model.1.", big_g)):
        for k, v in encoder.state_dict().items():
            if k == "text_projection.weight":
                state[prefix + "transformer.text_model.text_projection"] = v.t().contiguous()
            else:
                state[prefix + k.replace("transformer.", "transformer.text_model.", 1)] = v
    write_gguf(out, state, "q8_0", rules=parse_type_rules(SDCPP_RULES))


def test_sdxl_gguf_in_both_layouts(tiny_sdxl, tmp_path):  # noqa: F811
    """sdcli's names render the dequantized model's bytes; stable-diffusion.cpp's names the same bytes, and with
    its 1x1-conv proj_in/proj_out (the UNet then built with conv projections, as the shapes say) the same up to
    fp32 rounding of a 1x1 convolution against a matmul (measured: 2e-4 on latents of magnitude 120)."""
    ours, deq = tmp_path / "ours.gguf", tmp_path / "deq.safetensors"
    run = invoker({})
    run("convert", str(tiny_sdxl), "-o", str(ours), "--quantize", "q8_0", "--tensor-type-rules", SDCPP_RULES)
    run("convert", str(ours), "-o", str(deq))
    mine = _render(tmp_path, ours, name="ours")
    _same(mine, _render(tmp_path, deq, name="deq"))
    for unsqueeze in (False, True):
        _sdcpp_sdxl(tiny_sdxl, tmp_path / f"sdcpp-{unsqueeze}.gguf", unsqueeze)
        theirs = _render(tmp_path, tmp_path / f"sdcpp-{unsqueeze}.gguf", name=f"sdcpp-{unsqueeze}")
        if not unsqueeze:
            _same(mine, theirs)
        else:
            assert torch.allclose(mine[1], theirs[1], rtol=0, atol=1e-5 * float(mine[1].abs().max()))
            assert np.abs(mine[0].astype(int) - theirs[0]).max() <= 1


# --- the files, inspect, metadata --------------------------------------------------------------------------------

def test_written_files_pass_ggufreader_and_inspect_reports_them(files):
    reader = gguf.GGUFReader(files["q8"])
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "general.architecture" not in reader.fields  # stable-diffusion.cpp's convention: the names say it all
    result = invoker({})("inspect", str(files["q8"]), "--json")
    report = json.loads(result.stdout)
    assert report["family"] == "sd1" and report["format"] == "GGUF v3"
    unet = report["parts"]["unet"]
    want = {}
    for t in reader.tensors:
        if t.name.startswith("model.diffusion_model."):
            want[t.tensor_type.name] = want.get(t.tensor_type.name, 0) + 1
    assert unet["types"] == dict(sorted(want.items())) and "Q8_0" in want
    unet_tensors = [t for t in reader.tensors if t.name.startswith("model.diffusion_model.")]
    assert unet["bytes"] == sum(int(t.n_bytes) for t in unet_tensors)
    assert unet["parameters"] == sum(int(t.n_elements) for t in unet_tensors)
    assert unet["bits_per_weight"] == round(8 * unet["bytes"] / unet["parameters"], 2)
    assert report["parts"]["vae"]["types"] == {"F32": sum(n.startswith("first_stage_model.") for n in types)}
    assert report["sha256"] == __import__("hashlib").sha256(files["q8"].read_bytes()).hexdigest()
    plain = invoker({})("inspect", str(files["q8"]), "--no-hash").stdout
    assert "bits_per_weight" in plain and "Q8_0" in plain


def test_metadata_names_the_file_and_its_types_and_verify_replays_it(files, tmp_path):
    _render(tmp_path, files["q8"], name="q8")
    meta = read_image_metadata(tmp_path / "q8.png")["sdcli"]
    header = read_gguf_header(files["q8"])
    unet_q8 = sum(t.qtype.name == "Q8_0" and t.name.startswith("model.diffusion_model.")
                  for t in header.tensors.values())  # fmt: skip
    assert meta["model"]["sha256"] == __import__("hashlib").sha256(files["q8"].read_bytes()).hexdigest()
    assert meta["model"]["quantization"]["unet"]["Q8_0"] == unet_q8
    invoker({})("verify", str(tmp_path / "q8.png"), "-m", str(files["q8"]), "--min-psnr", "inf")


def test_i_quants_are_refused_with_what_works(files, tmp_path):
    result = invoker({})("convert", str(files["st32"]), "-o", str(tmp_path / "k.gguf"), "--quantize", "iq4_xs",
                         expect=2)  # fmt: skip
    assert "llama-quantize" in result.stderr and "q4_k" in result.stderr and not (tmp_path / "k.gguf").exists()
    invoker({})("convert", str(files["st32"]), "-o", str(tmp_path / "k.gguf"), expect=2)  # no type given


# --- bad files ----------------------------------------------------------------------------------------------------

def _patched(src: Path, dst: Path, at: int, data: bytes) -> Path:
    raw = bytearray(src.read_bytes())
    raw[at:at + len(data)] = data
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("case", ["truncated", "offset", "magic", "count"])
def test_crafted_gguf_exits_3_and_writes_nothing(files, case, tmp_path):
    src = files["q8"]
    header = read_gguf_header(src)
    bad = tmp_path / "bad.gguf"
    if case == "truncated":
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif case == "offset":  # the first tensor's offset moved off the alignment
        raw = src.read_bytes()
        first = next(iter(header.tensors.values()))
        name = first.name.encode()
        at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
        at += 4 + 8 * len(first.shape) + 4  # n_dims, dims, type
        _patched(src, bad, at, (first.offset - header.data_offset + 1).to_bytes(8, "little"))
    elif case == "magic":  # named .gguf, not one
        bad.write_bytes(b"GGUX" + src.read_bytes()[4:])
    else:  # a tensor count far past what the file holds
        _patched(src, bad, 8, (2**40).to_bytes(8, "little"))
    result = _render(tmp_path, bad, expect=3)
    assert result is None


def test_nan_scales_exit_5(files, tmp_path):
    header = read_gguf_header(files["q8"])
    t = next(t for t in header.tensors.values() if t.qtype.name == "Q8_0" and t.name.startswith("model."))
    bad = _patched(files["q8"], tmp_path / "nan.gguf", t.offset, np.float16(np.nan).tobytes())
    _render(tmp_path, bad, expect=5)


# --- files that hold one part: city96's UNets, FLUX and T5 GGUFs, SD3 ------------------------------------------

def _comfy_clip(state: dict, prefix: str, into: str = "") -> dict:
    """A text encoder as ComfyUI's clip_l / clip_g files hold it: transformers names (what follows `prefix`, under
    `into`), and CLIP's logit_scale."""
    out = {into + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "position_ids" not in k}
    return {**out, "logit_scale": torch.tensor(4.6052)}


def _city96_unet(src: Path, out: Path, arch: str) -> None:
    """city96's SD1/SDXL GGUF: the UNet alone, its names without model.diffusion_model., general.architecture
    set, convolutions as 256-wide Q8_0 rows (comfy.gguf.orig_shape)."""
    prefix = "model.diffusion_model."
    state = {k[len(prefix):]: v for k, v in load_file(src).items() if k.startswith(prefix)}
    write_gguf(out, state, "q8_0", arch=arch, convs=True)


def test_sd1_unet_gguf_with_vae_and_clip_files(files, tmp_path):
    """A city96 UNet-only SD1 file runs with --vae (here the full checkpoint: its VAE is taken) and --clip-l
    (ComfyUI's clip_l.safetensors): the bytes of a whole-model GGUF quantized the same way (text encoder float);
    without one of them, exit 4 naming the option, nothing written."""
    unet, clip_l, whole = tmp_path / "sd1-unet-q8_0.gguf", tmp_path / "clip_l.safetensors", tmp_path / "whole.gguf"
    _city96_unet(files["st32"], unet, "sd1")
    save_file(_comfy_clip(load_file(files["st32"]), "cond_stage_model.transformer."), str(clip_l))
    invoker({})("convert", str(files["st32"]), "-o", str(whole), "--quantize", "q8_0", "--quantize-convs",
                "--tensor-type-rules", r"^cond_stage_model\.=f32")  # fmt: skip
    parts = ("--vae", str(files["st32"]), "--clip-l", str(clip_l))
    _same(_render(tmp_path, unet, *parts, name="unet"), _render(tmp_path, whole, name="whole"))
    for missing, flag in ((parts[2:], "--vae"), (parts[:2], "--clip-l")):
        result = invoker({})("generate", "a fox", "-m", str(unet), *missing, *RENDER, "-o", str(tmp_path / "x.png"),
                             expect=4)  # fmt: skip
        assert flag in result.stderr and not (tmp_path / "x.png").exists()


def test_sdxl_unet_gguf_with_vae_and_clip_files(tiny_sdxl, tmp_path):  # noqa: F811
    """The same for SDXL: --clip-l and --clip-g (bigG in transformers names with its projection, as ComfyUI's
    clip_g.safetensors) beside a city96 UNet-only file."""
    unet, whole = tmp_path / "sdxl-unet-q8_0.gguf", tmp_path / "whole.gguf"
    _city96_unet(tiny_sdxl, unet, "sdxl")
    big_g = load_models(tiny_sdxl).text_encoders[1].state_dict()
    clips = {"clip_l": _comfy_clip(load_file(tiny_sdxl), "conditioner.embedders.0.transformer."),
             "clip_g": {**_comfy_clip(big_g, "transformer.", "text_model."),
                        "text_projection.weight": big_g["text_projection.weight"]}}
    for name, state in clips.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    invoker({})("convert", str(tiny_sdxl), "-o", str(whole), "--quantize", "q8_0", "--quantize-convs",
                "--tensor-type-rules", r"^conditioner\.=f32")  # fmt: skip
    parts = ("--vae", str(tiny_sdxl), "--clip-l", str(tmp_path / "clip_l.safetensors"), "--clip-g",
             str(tmp_path / "clip_g.safetensors"))  # fmt: skip
    _same(_render(tmp_path, unet, *parts, name="unet"), _render(tmp_path, whole, name="whole"))
    result = invoker({})("generate", "a fox", "-m", str(unet), *parts[:4], *RENDER, "-o", str(tmp_path / "x.png"),
                         expect=4)  # fmt: skip
    assert "--clip-g" in result.stderr and not (tmp_path / "x.png").exists()


LLAMA_T5_LAYERS = {v: k for k, v in T5_LAYERS.items()}  # transformers' T5 layer names -> llama.cpp's


def _llama_t5(state: dict) -> dict:
    """A T5 encoder under llama.cpp's names, as city96's t5-v1_1-xxl-encoder GGUFs hold it (one embedding)."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"encoder\.block\.(\d+)\.(layer\.\d\.\w+\.\w+|layer\.\d\.layer_norm)\.(weight|bias)", k)
        if m:
            out[f"enc.blk.{m.group(1)}.{LLAMA_T5_LAYERS[m.group(2)]}.{m.group(3)}"] = v
        elif k in T5_NAMES.values():
            out[{b: a for a, b in T5_NAMES.items()}[k]] = v
    return out


def test_flux_and_t5_gguf_from_city96(tiny_flux, dit_components, tmp_path):  # noqa: F811
    """city96's FLUX.1 GGUF (the DiT alone, bare BFL names, general.architecture flux) with his T5 encoder GGUF
    (llama.cpp names, t5encoder) as --t5: the bytes of the same weights dequantized into safetensors files."""
    dit, t5 = tmp_path / "flux1-dev-Q8_0.gguf", tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    write_gguf(dit, load_file(tiny_flux), "q8_0", arch="flux")
    t5_state = _llama_t5(load_file(dit_components["t5"]))
    assert len(t5_state) == len(load_file(dit_components["t5"])) - 1  # all but the second name of the embedding
    write_gguf(t5, t5_state, "q8_0", arch="t5encoder")
    assert any(t.qtype.name == "Q8_0" for t in read_gguf_header(t5).tensors.values())
    run = invoker({})
    for path in (dit, t5):
        run("convert", str(path), "-o", str(path.with_suffix(".safetensors")))
    parts = ("--vae", str(dit_components["vae"]), "--clip-l", str(dit_components["clip_l"]))
    q = _render(tmp_path, dit, *parts, "--t5", str(t5), name="q")
    _same(q, _render(tmp_path, dit.with_suffix(".safetensors"), *parts, "--t5", str(t5.with_suffix(".safetensors")),
                     name="deq"))  # fmt: skip
    held = load_models(dit, dit_components["vae"], text_files={"clip_l": dit_components["clip_l"], "t5": t5})
    assert any(holds_blocks(m) for m in held.unet.modules())
    assert any(holds_blocks(m) for m in held.text_encoders[1].modules())  # T5's Linears hold blocks too


def test_sd3_gguf_round_trip(tiny_sd3, tmp_path):  # noqa: F811
    """An SD3.5 single file (MMDiT, CLIP-L, CLIP-G, T5, 16-channel VAE) as a Q8_0 GGUF: the bytes of its dequantized
    weights."""
    gg, deq = tmp_path / "sd35-q8_0.gguf", tmp_path / "sd35-deq.safetensors"
    run = invoker({})
    run("convert", str(tiny_sd3), "-o", str(gg), "--quantize", "q8_0")
    run("convert", str(gg), "-o", str(deq))
    types = {t.qtype.name for t in read_gguf_header(gg).tensors.values() if t.name.startswith("model.")}
    assert "Q8_0" in types
    _same(_render(tmp_path, gg, name="q"), _render(tmp_path, deq, name="deq"))
