"""Upscalers: our ESRGAN (RRDBNet, three key layouts) and Real-ESRGAN Compact networks against spandrel loading
the same random-weight file; tiled inference against spandrel's direct call; PIL modes and scales; file
detection errors; the spandrel fallback for other architectures.

The oracle is spandrel 0.4.2 installed without its dependencies (`pip install --no-deps spandrel einops`),
imported by scripts/spandrel_oracle.py with a torchvision stub where no torchvision matches this CPU torch (the
stub is never called for ESRGAN, Compact or SwinIR; see that file).
"""

from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import load_file

from sdcli.runtime.errors import BadInputError, NumericalError, OutOfMemoryError, UnsupportedModelError
from sdcli.models.esrgan import CompactConfig, RRDBConfig, RRDBNet
from sdcli.models.layout import wants_channels_last
from sdcli.upscale.files import describe, inspect_upscaler, load_upscaler
from sdcli.upscale.tiled import spans, upscale, upscale_pil

from make_upscaler import rrdb_state, smooth_image, write, write_compact, write_rrdb  # scripts/


# --- the oracle ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spandrel_oracle():
    from spandrel_oracle import import_spandrel  # scripts/ (conftest.py puts it on sys.path)

    return import_spandrel()


# --- random-weight models in every layout ------------------------------------------------------------------


RRDB_X4 = RRDBConfig(num_features=16, num_blocks=2, growth=32, num_upsamples=2)
RRDB_CASES = {  # (layout, config); spandrel fixes the growth at 32, so ours is 32 too
    "basicsr-x4": ("basicsr", RRDB_X4),
    "basicsr-x2-unshuffle": ("basicsr", RRDBConfig(in_channels=12, num_features=16, num_blocks=2, unshuffle=2)),
    "basicsr-x1-unshuffle": ("basicsr", RRDBConfig(in_channels=48, num_features=16, num_blocks=1, unshuffle=4)),
    "old-x4": ("old", RRDB_X4),
    "old-x2": ("old", RRDBConfig(num_features=16, num_blocks=3, num_upsamples=1)),
    "old-x8": ("old", RRDBConfig(num_features=8, num_blocks=1, num_upsamples=3)),
    "old-x1": ("old", RRDBConfig(num_features=8, num_blocks=1, num_upsamples=0)),  # 1x restoration models
    "2019-x4": ("2019", RRDB_X4),
}


def rrdb_file(tmp_path, case: str, suffix: str):
    layout, cfg = RRDB_CASES[case]
    return write_rrdb(tmp_path / f"{case}{suffix}", cfg, layout), cfg


COMPACT_X4 = CompactConfig(num_features=16, num_convs=4, scale=4)
COMPACT_CASES = {"compact-x4": COMPACT_X4, "compact-x2": CompactConfig(num_features=16, num_convs=2, scale=2)}


def compact_file(tmp_path, case: str, suffix: str):
    cfg = COMPACT_CASES[case]
    return write_compact(tmp_path / f"{case}{suffix}", cfg), cfg


def levels(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round()


# --- the networks against spandrel -------------------------------------------------------------------------


def spandrel_in_our_layout(spandrel, x: torch.Tensor) -> torch.Tensor:
    """spandrel's network (a model, or its descriptor's call) run in the memory layout ours runs in here
    (channels_last on an x86-64 CPU: layout.py), so that both run the same convolution kernels: then the same ops in
    the same order give the same bits."""
    if wants_channels_last(x):
        getattr(spandrel, "model", spandrel).to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return spandrel(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("case", list(RRDB_CASES))
def test_rrdbnet_equals_spandrel(tmp_path, spandrel_oracle, case, suffix):
    path, cfg = rrdb_file(tmp_path, case, suffix)
    ours = load_upscaler(path)
    theirs = spandrel_oracle.ModelLoader().load_from_file(path)  # spandrel's own reading of the file
    assert theirs.architecture.name == "ESRGAN"
    assert (ours.scale, ours.input_channels, ours.output_channels) == (theirs.scale, theirs.input_channels,
                                                                       theirs.output_channels) == (cfg.scale, 3, 3)
    x = smooth_image(13, 18)  # odd sizes: the unshuffle models pad (reflect) and crop as spandrel's model does
    with torch.no_grad():
        a, b = ours.net(x), spandrel_in_our_layout(theirs.model, x)
    assert a.shape == (1, 3, 13 * cfg.scale, 18 * cfg.scale)
    assert torch.equal(a, b), f"fp32 max abs diff {(a - b).abs().max().item():.3g}"  # same ops in the same order


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("case", list(COMPACT_CASES))
def test_compact_equals_spandrel(tmp_path, spandrel_oracle, case, suffix):
    path, cfg = compact_file(tmp_path, case, suffix)
    ours = load_upscaler(path)
    theirs = spandrel_oracle.ModelLoader().load_from_file(path)
    assert theirs.architecture.name == "RealESRGAN Compact" and ours.info.architecture == "RealESRGAN Compact"
    assert (ours.scale, ours.input_channels, ours.output_channels) == (theirs.scale, 3, 3) == (cfg.scale, 3, 3)
    x = smooth_image(13, 18)
    with torch.no_grad():
        a, b = ours.net(x), spandrel_in_our_layout(theirs.model, x)
    assert torch.equal(a, b), f"fp32 max abs diff {(a - b).abs().max().item():.3g}"
    assert (a - torch.nn.functional.interpolate(x, scale_factor=cfg.scale)).abs().mean() > 0.02  # not trivial


def test_legacy_pickle_format(tmp_path):
    """2018-era ESRGAN .pth files predate torch's zip format: the restricted unpickler reads those too."""
    layout, cfg = RRDB_CASES["old-x4"]
    stored = write_rrdb(tmp_path / "4x-new.safetensors", cfg, layout)
    legacy = write(load_file(str(stored)), tmp_path / "4x-legacy.pth", legacy=True)
    assert legacy.read_bytes()[:1] == b"\x80"  # a raw pickle stream, not a zip
    x = smooth_image(12, 10)
    assert torch.equal(load_upscaler(legacy)(x), load_upscaler(stored)(x))


def test_describe_reads_the_config(tmp_path):
    path, cfg = rrdb_file(tmp_path, "old-x4", ".safetensors")
    d = describe(path)
    assert d["architecture"] == "ESRGAN" and d["layout"].startswith("original ESRGAN")
    assert (d["scale"], d["in_channels"], d["out_channels"], d["blocks"], d["features"], d["purpose"]) == (
        4, 3, 3, cfg.num_blocks, cfg.num_features, "SR")
    assert d["parameters"] == sum(p.numel() for p in RRDBNet(cfg).parameters())
    path, _ = rrdb_file(tmp_path, "basicsr-x1-unshuffle", ".pth")
    d = describe(path)
    assert (d["scale"], d["in_channels"], d["unshuffle"], d["purpose"]) == (1, 3, 4, "Restoration")
    path, cfg = compact_file(tmp_path, "compact-x2", ".safetensors")
    d = describe(path)
    assert (d["architecture"], d["scale"], d["blocks"], d["features"]) == ("RealESRGAN Compact", 2, 2, 16)


def test_bf16_runs_close_to_fp32(tmp_path):
    path, _ = rrdb_file(tmp_path, "basicsr-x4", ".safetensors")
    x = smooth_image(16, 12)
    a = load_upscaler(path)(x)
    b = load_upscaler(path, dtype=torch.bfloat16)(x).float()  # channels_last weights on the CPU (layout.py)
    assert (a - b).abs().max() < 0.05


# --- tiling --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,tile,overlap", [(100, 32, 8), (33, 32, 8), (64, 32, 8), (257, 64, 16),
                                               (1000, 512, 32), (90, 40, 0), (41, 40, 10)])
def test_spans_cover_the_axis_once(size, tile, overlap):
    sp = spans(size, tile, overlap)
    assert sp[0].keep_start == 0 and sp[-1].keep_stop == size and sp[0].ramp_in == sp[-1].ramp_out == 0
    for s in sp:
        assert 0 <= s.start <= s.keep_start < s.keep_stop <= s.stop <= size and s.stop - s.start <= tile
    for a, b in zip(sp, sp[1:]):
        assert a.stop - b.start >= overlap  # neighbours share at least `overlap` input pixels
        assert a.ramp_out == b.ramp_in and a.keep_stop - b.keep_start == a.ramp_out  # one blend band per seam
        assert a.keep_stop <= a.stop and b.keep_start >= b.start


class PointwiseX2:
    """A model without spatial context: tiled output must equal untiled output exactly (up to float rounding
    of the blend weights), which checks placement and that the weights sum to 1."""

    scale, input_channels = 2, 3

    def __call__(self, x):
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return (up * 0.7 + 0.1 * up.flip(1)).clamp(0, 1)


def test_tiles_blend_to_the_untiled_result_for_a_pointwise_model():
    x = smooth_image(70, 53)
    whole = upscale(PointwiseX2(), x, None, 0)
    for tile, overlap in ((32, 8), (24, 12), (40, 4)):
        tiled = upscale(PointwiseX2(), x, tile, overlap)
        assert (tiled - whole).abs().max() < 1e-6


def test_untiled_upscale_equals_spandrel_call(tmp_path, spandrel_oracle):
    for path in (rrdb_file(tmp_path, "old-x4", ".pth")[0], compact_file(tmp_path, "compact-x4", ".safetensors")[0]):
        x = smooth_image(40, 36)
        ours = upscale(load_upscaler(path), x, tile=None)
        theirs = spandrel_in_our_layout(spandrel_oracle.ModelLoader().load_from_file(path), x)
        assert (levels(ours) - levels(theirs)).abs().max() <= 1
        assert torch.equal(ours, theirs)  # measured: identical (one window is the direct call)


@pytest.mark.parametrize("kind", ["rrdb", "compact"])
def test_tiled_upscale_within_2_levels_of_spandrel(tmp_path, spandrel_oracle, kind):
    path = rrdb_file(tmp_path, "basicsr-x4", ".pth")[0] if kind == "rrdb" else compact_file(
        tmp_path, "compact-x4", ".pth")[0]
    x = smooth_image(72, 60, seed=3)
    theirs = levels(spandrel_oracle.ModelLoader().load_from_file(path)(x))
    ours = levels(upscale(load_upscaler(path), x, tile=32, overlap=8))  # 3 x 2 windows: seams everywhere
    diff = (ours - theirs).abs()
    within, exact = (diff <= 2).float().mean().item(), (diff == 0).float().mean().item()
    print(f"{kind}: tiled 32/8 vs spandrel untiled: {exact:.4%} exact, {within:.4%} within 2 levels, "
          f"max {diff.max().item():.0f}")
    assert within >= 0.99


class OutOfMemoryAbove:
    """Raises torch's OutOfMemoryError for inputs larger than `limit` pixels on a side (as CUDA would)."""

    def __init__(self, limit: int):
        self.limit, self.inner, self.sizes = limit, PointwiseX2(), []
        self.scale, self.input_channels = 2, 3

    def __call__(self, x):
        self.sizes.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_tile():
    x = smooth_image(150, 130)
    model = OutOfMemoryAbove(70)
    out = upscale(model, x, tile=256, overlap=16)  # 256 (one window, 150) -> 128 (windows of 83) -> 64
    assert model.sizes[0] == 150 and 70 < model.sizes[1] <= 128 and max(model.sizes[2:]) <= 64
    assert torch.equal(out, upscale(PointwiseX2(), x, tile=64, overlap=16))
    model = OutOfMemoryAbove(80)
    upscale(model, x, tile=None, overlap=16)  # the whole image first, then tiles of half its longer side
    assert model.sizes[0] == 150 and max(model.sizes[1:]) <= 75
    with pytest.raises(OutOfMemoryError) as e:
        upscale(OutOfMemoryAbove(10), x, tile=256, overlap=16)
    assert e.value.exit_code == 6


def test_non_finite_output_is_a_numerical_error():
    class Overflow(PointwiseX2):
        def __call__(self, x):
            return super().__call__(x) * torch.tensor(float("nan"))

    with pytest.raises(NumericalError) as e:
        upscale(Overflow(), smooth_image(8, 8), tile=None)
    assert e.value.exit_code == 5


# --- PIL images: modes and scales ---------------------------------------------------------------------------


def picture(mode: str, w: int = 30, h: int = 22) -> Image.Image:
    arr = (smooth_image(h, w, 4, seed=5)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    rgba = Image.fromarray(arr, "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.fixture(scope="module")
def compact_model(tmp_path_factory):
    path, _ = compact_file(tmp_path_factory.mktemp("compact"), "compact-x2", ".safetensors")
    return load_upscaler(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_pil_modes_are_kept(compact_model, mode):
    img = picture(mode)
    out = upscale_pil(img, compact_model, tile=16, overlap=4)
    assert out.mode == mode and out.size == (60, 44)
    colour = img.convert(mode.rstrip("A")) if mode.endswith("A") else img
    alone = upscale_pil(colour, compact_model, tile=16, overlap=4)
    assert np.array_equal(np.asarray(out.convert(colour.mode)), np.asarray(alone))  # colour as without alpha
    if mode.endswith("A"):  # the alpha went through the model too: not a plain resize of it
        lanczos = img.getchannel("A").resize(out.size, Image.Resampling.LANCZOS)
        assert not np.array_equal(np.asarray(out.getchannel("A")), np.asarray(lanczos))


def test_gray_goes_through_the_model_as_rgb(compact_model):
    img = picture("L")
    out = upscale_pil(img, compact_model, tile=None)
    rgb = upscale_pil(img.convert("RGB"), compact_model, tile=None)
    assert np.array_equal(np.asarray(out), np.asarray(rgb.convert("L")))


def test_constant_alpha_and_palette(compact_model):
    img = picture("RGB")
    img.putalpha(200)
    out = upscale_pil(img, compact_model)
    assert out.mode == "RGBA" and out.getchannel("A").getextrema() == (200, 200)
    assert upscale_pil(picture("RGB").convert("P"), compact_model).mode == "RGB"
    with pytest.raises(BadInputError):
        upscale_pil(Image.new("I;16", (8, 8)), compact_model)


def test_requested_scale_other_than_native(compact_model):
    img = picture("RGB")
    native = upscale_pil(img, compact_model, tile=None)  # x2
    half_way = upscale_pil(img, compact_model, scale=1.5, tile=None)
    assert half_way.size == (45, 33)
    assert np.array_equal(np.asarray(half_way), np.asarray(native.resize((45, 33), Image.Resampling.LANCZOS)))
    twice = upscale_pil(img, compact_model, scale=3, tile=None)  # x2 then x2 again, then Lanczos down to x3
    again = upscale_pil(native, compact_model, tile=None)
    assert np.array_equal(np.asarray(twice), np.asarray(again.resize((90, 66), Image.Resampling.LANCZOS)))
    assert upscale_pil(img, compact_model, size=(64, 40), tile=None).size == (64, 40)


# --- what a file is -------------------------------------------------------------------------------------------


def _tensors(*names: str) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(2, 2) for n in names}


NOT_UPSCALERS = {
    "sd-checkpoint": (_tensors("model.diffusion_model.input_blocks.0.0.weight",
                               "first_stage_model.decoder.conv_in.weight"), "Stable Diffusion checkpoint"),
    "lora": (_tensors("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"), "LoRA"),
    "gfpgan": (_tensors("conv_body_first.weight", "toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight"), "GFPGAN"),
    "codeformer": (_tensors("quantize.embedding.weight", "position_emb", "ft_layers.0.norm1.weight"), "CodeFormer"),
    "lama": (_tensors("model.model.1.bn_l.running_mean", "model.model.1.ffc.convl2l.weight"), "LaMa"),
    "controlnet": (_tensors("control_model.input_hint_block.0.weight"), "ControlNet"),
    "vae": (_tensors("encoder.conv_in.weight", "decoder.conv_out.weight"), "VAE"),
}  # fmt: skip


def _one_line_exit_3(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("kind", list(NOT_UPSCALERS))
def test_files_that_are_not_upscalers(tmp_path, kind, suffix):
    state, name = NOT_UPSCALERS[kind]
    path = write(state, tmp_path / f"{kind}{suffix}", "state_dict" if suffix == ".pth" else None)
    for call in (load_upscaler, describe):
        with pytest.raises(BadInputError) as e:
            call(path)
        msg = _one_line_exit_3(e)
        assert "not an upscaler" in msg and name in msg and str(path) in msg


def test_broken_files(tmp_path):
    good, _ = rrdb_file(tmp_path, "basicsr-x4", ".safetensors")
    pth, _ = rrdb_file(tmp_path, "basicsr-x4", ".pth")
    cases = {
        "truncated.safetensors": good.read_bytes()[: good.stat().st_size // 2],
        "truncated.pth": pth.read_bytes()[: pth.stat().st_size // 2],
        "empty.safetensors": b"",
        "page.safetensors": b"<html><body>404</body></html>",
        "renamed-pickle.safetensors": pth.read_bytes(),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadInputError) as e:
            load_upscaler(tmp_path / name)
        _one_line_exit_3(e)
    state = rrdb_state(RRDB_X4)
    del state["body.1.rdb2.conv3.bias"]
    with pytest.raises(BadInputError) as e:
        load_upscaler(write(state, tmp_path / "missing.safetensors"))
    assert "missing: body.1.rdb2.conv3.bias" in _one_line_exit_3(e)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "4x-evil.pth"
    path.write_bytes(pickle.dumps({"params_ema": {"conv_first.weight": _Exploit(marker)}}, protocol=2))
    with pytest.raises(BadInputError) as e:
        load_upscaler(path)
    assert "refused or unreadable upscaler pickle" in _one_line_exit_3(e)
    assert not marker.exists()


# --- other architectures: spandrel ------------------------------------------------------------------------------


def swinir_file(tmp_path, spandrel_oracle):
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    net = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2.0, upscale=2,
                 upsampler="pixelshuffledirect")  # fmt: skip
    return write({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "2x-swinir.safetensors")


def test_other_architectures_go_through_spandrel(tmp_path, spandrel_oracle):
    path = swinir_file(tmp_path, spandrel_oracle)
    model = load_upscaler(path)
    assert (model.info.architecture, model.info.layout, model.scale) == ("SwinIR", "spandrel", 2)
    x = smooth_image(36, 28)
    theirs = spandrel_oracle.ModelLoader().load_from_file(path)(x)
    assert torch.equal(upscale(model, x, tile=None), theirs)
    assert describe(path)["architecture"] == "SwinIR"
    unknown = write(_tensors("foo.weight", "bar.bias"), tmp_path / "unknown.safetensors")
    with pytest.raises(BadInputError) as e:
        load_upscaler(unknown)
    assert "no architecture of sdcli or spandrel" in _one_line_exit_3(e)


def test_without_spandrel_other_architectures_are_exit_8(tmp_path, spandrel_oracle, monkeypatch):
    path = swinir_file(tmp_path, spandrel_oracle)
    monkeypatch.setitem(sys.modules, "spandrel", None)  # `import spandrel` now raises ImportError
    with pytest.raises(UnsupportedModelError) as e:
        inspect_upscaler(path)
    msg = str(e.value)
    assert e.value.exit_code == 8 and "\n" not in msg
    assert "SwinIR" in msg and "make install-spandrel" in msg and "torchvision" in msg
    rrdb, _ = rrdb_file(tmp_path, "old-x4", ".pth")
    assert load_upscaler(rrdb).scale == 4  # our own architectures need no spandrel
    assert math.isfinite(describe(rrdb)["parameters"])
