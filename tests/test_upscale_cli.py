"""Upscalers through the real commands: `sdcli upscale` (output equals tiled.upscale_pil on the same file, modes,
scales, metadata carried over with A1111's postprocessing fields, outputs refused before the model loads),
`inspect` on an upscaler file, the hires fix with `--hires-upscaler` (a latent mode equals an independent
F.interpolate computation; a model, Lanczos and Nearest equal A1111's chain computed here from the pipeline's
own pieces: decode -> 8-bit truncation -> resize_image -> encode -> second pass), replay of an A1111 infotext
naming an upscaler, verify, and bad or missing upscaler files (one line, documented exit code, nothing written).

Tiny random models: an ESRGAN x4 from scripts/make_upscaler.py, the tiny SD1 checkpoint from
tests/_fixtures_models.py; every render is fp32 on the CPU, one thread, so the comparisons are exact.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from _cli import invoker
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from make_upscaler import rrdb_state, smooth_image, write, write_compact, write_rrdb  # scripts/
from sdcli import pipeline
from sdcli.formats import images
from sdcli.formats.hashing import file_sha256
from sdcli.loading import checkpoint
from sdcli.models.esrgan import CompactConfig, RRDBConfig
from sdcli.upscale import names
from sdcli.upscale.files import load_upscaler
from sdcli.upscale.tiled import upscale_pil

PROMPT, SEED = "a lighthouse", 3
RENDER = ["--device", "cpu", "--dtype", "fp32", "--steps", "2", "--sampler", "euler_a", "--cfg", "5"]
RRDB = RRDBConfig(num_features=8, num_blocks=1)  # x4


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """An upscaler folder in A1111's layout: ESRGAN/4x-Test.pth (an x4 RRDBNet), RealESRGAN/realesr-general-x4v3.pth
    (an x4 Compact: A1111's built-in "R-ESRGAN General 4xV3")."""
    root = tmp_path_factory.mktemp("upscalers")
    (root / "ESRGAN").mkdir()
    (root / "RealESRGAN").mkdir()
    write_rrdb(root / "ESRGAN" / "4x-Test.pth", RRDB, layout="old")
    write_compact(root / "RealESRGAN" / "realesr-general-x4v3.pth", CompactConfig(num_features=8, num_convs=2))
    return root


@pytest.fixture
def model_file(models_dir):
    return models_dir / "ESRGAN" / "4x-Test.pth"


@pytest.fixture
def run(tmp_path, monkeypatch, tiny_sd1):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return invoker({"generate": ["-m", str(tiny_sd1), *RENDER, "--seed", str(SEED)],
                    "verify": ["--device", "cpu"], "upscale": ["--device", "cpu", "--dtype", "fp32"]})


def picture(path, size=(100, 72), mode="RGB", texts=None):
    """A smooth test picture saved as PNG in `mode`, with optional text chunks."""
    arr = (smooth_image(size[1], size[0], 4, seed=5)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "P":
        img = img.convert("RGB").quantize(64)
    elif mode != "RGBA":
        img = img.convert("RGB").convert(mode)
    info = PngInfo()
    for key, value in (texts or {}).items():
        info.add_itxt(key, value)
    img.save(path, pnginfo=info)
    return path


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    return lines[-1]


# --- sdcli upscale ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile, overlap", [(64, 16), (0, 0)])
def test_upscale_equals_upscale_pil(run, tmp_path, model_file, tile, overlap):
    picture(tmp_path / "in.png")  # 100x72: tiles of 64 cover it in 2x2 windows, 0 is one untiled call
    run("upscale", "in.png", "-u", str(model_file), "--tile", str(tile), "--tile-overlap", str(overlap), "-o", "o.png")
    ours = Image.open(tmp_path / "o.png")
    expected = upscale_pil(Image.open(tmp_path / "in.png"), load_upscaler(model_file), tile=tile or None,
                           overlap=overlap)
    assert ours.size == (400, 288) and ours.mode == "RGB"
    assert ours.tobytes() == expected.tobytes()


@pytest.mark.parametrize("mode, kept", [("L", "L"), ("LA", "LA"), ("RGBA", "RGBA"), ("P", "RGB")])
def test_modes_are_kept(run, tmp_path, model_file, mode, kept):
    picture(tmp_path / "in.png", (40, 24), mode)
    run("upscale", "in.png", "-u", str(model_file), "-o", "o.png")
    ours = Image.open(tmp_path / "o.png")
    expected = upscale_pil(Image.open(tmp_path / "in.png"), load_upscaler(model_file))
    assert ours.mode == expected.mode == kept and ours.size == (160, 96)
    assert ours.tobytes() == expected.tobytes()


@pytest.mark.parametrize("scale, size", [("2.5", (100, 60)), ("6", (240, 144))])
def test_scale_other_than_the_models(run, tmp_path, model_file, scale, size):
    """--scale 2.5: one x4 pass, then Lanczos down; --scale 6: two passes (x16), then Lanczos down."""
    picture(tmp_path / "in.png", (40, 24))
    run("upscale", "in.png", "-u", str(model_file), "--scale", scale, "-o", "o.png")
    expected = upscale_pil(Image.open(tmp_path / "in.png"), load_upscaler(model_file), scale=float(scale))
    assert Image.open(tmp_path / "o.png").size == expected.size == size
    assert Image.open(tmp_path / "o.png").tobytes() == expected.tobytes()


def test_lanczos_and_nearest_resize_by_the_scale(run, tmp_path):
    picture(tmp_path / "in.png", (40, 24))
    run("upscale", "in.png", "-u", "lanczos", "--scale", "1.5", "-o", "l.png")
    run("upscale", "in.png", "-u", "Nearest", "--scale", "3", "-o", "n.png")
    src = Image.open(tmp_path / "in.png")
    assert Image.open(tmp_path / "l.png").tobytes() == src.resize((60, 36), Image.Resampling.LANCZOS).tobytes()
    assert Image.open(tmp_path / "n.png").tobytes() == src.resize((120, 72), Image.Resampling.NEAREST).tobytes()
    assert "--scale" in one_line_error(run("upscale", "in.png", "-u", "Lanczos", expect=None), 2)
    assert "hires" in one_line_error(run("upscale", "in.png", "-u", "Latent (bicubic)", expect=None), 2)


def test_metadata_is_carried_over(run, tmp_path, model_file):
    infotext = "a cat, oil\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 40x24"
    record = {"prompt": "a cat, oil", "seed": 42, "config": {"steps": 20}}
    texts = {"parameters": infotext, "sdcli": json.dumps(record), "note": "ünïcode, kept"}
    picture(tmp_path / "in.png", (40, 24), texts=texts)
    run("upscale", "in.png", "-u", "4x-Test", "--upscaler-dir", str(model_file.parents[1]), "-o",
        "{stem}-{seed}-{index}.png")
    out = Image.open(tmp_path / "in-42-0.png").text
    assert out["parameters"] == infotext and out["note"] == "ünïcode, kept"
    assert out["postprocessing"] == out["extras"] == "Postprocess upscale by: 4, Postprocess upscaler: 4x-Test"
    ours = json.loads(out["sdcli"])
    step = ours.pop("postprocessing")
    assert ours == record
    assert step == [{"name": "4x-Test", "file": "4x-Test.pth", "sha256": file_sha256(model_file), "scale": 4,
                     "from_size": {"width": 40, "height": 24}, "size": {"width": 160, "height": 96}, "tile": 512,
                     "overlap": 32, "sdcli_version": step[0]["sdcli_version"]}]
    run("upscale", "in-42-0.png", "-u", "Lanczos", "--scale", "0.5", "-o", "again.png")  # a second step appends
    again = Image.open(tmp_path / "again.png").text
    assert [s["name"] for s in json.loads(again["sdcli"])["postprocessing"]] == ["4x-Test", "Lanczos"]
    assert again["postprocessing"] == "Postprocess upscale by: 0.5, Postprocess upscaler: Lanczos"
    refused = one_line_error(run("verify", "again.png", "-m", "never-loaded.safetensors", expect=None), 2)
    assert "upscaled after it was rendered (4x-Test, Lanczos)" in refused


def test_outputs_are_checked_before_the_model_loads(run, tmp_path, model_file):
    picture(tmp_path / "a.png", (24, 16))
    picture(tmp_path / "b.png", (24, 16))
    (tmp_path / "a-upscaled.png").write_bytes(b"keep me")
    result = run("upscale", "a.png", "b.png", "-u", str(model_file), expect=None)
    assert "exists; pass --overwrite" in one_line_error(result, 7)
    assert "loading" not in result.stderr and not (tmp_path / "b-upscaled.png").exists()
    assert (tmp_path / "a-upscaled.png").read_bytes() == b"keep me"
    run("upscale", "a.png", "b.png", "-u", str(model_file), "--overwrite")
    assert Image.open(tmp_path / "a-upscaled.png").size == Image.open(tmp_path / "b-upscaled.png").size == (96, 64)
    assert "{index}" in one_line_error(run("upscale", "a.png", "b.png", "-u", str(model_file), "-o", "x.png",
                                           expect=None), 2)
    assert "stdout" in one_line_error(run("upscale", "a.png", "b.png", "-u", str(model_file), "-o", "-",
                                          expect=None), 2)
    assert "no seed" in one_line_error(run("upscale", "a.png", "-u", str(model_file), "-o", "{seed}.png",
                                           expect=None), 2)
    assert not (tmp_path / "x.png").exists()
    piped = run("upscale", "a.png", "-u", str(model_file), "-o", "-")
    assert piped.stdout_bytes[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad and missing upscaler files, through both commands --------------------------------------------------


def _bad_files(folder, good):
    t = lambda *names: {n: torch.zeros(2, 2) for n in names}  # noqa: E731
    return {
        "sd.pth": write(t("model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x.weight"),
                        folder / "sd.pth", "state_dict"),
        "gfpgan.pth": write(t("conv_body_first.weight", "stylegan_decoder.style_mlp.1.weight"), folder / "gfpgan.pth",
                            "params_ema"),
        "truncated.pth": _truncated(good, folder / "truncated.pth"),
        "truncated.safetensors": _truncated(write(rrdb_state(RRDB), folder / "full.safetensors"),
                                            folder / "truncated.safetensors"),
    }


def _truncated(src, dst):
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


@pytest.mark.parametrize("bad", ["sd.pth", "gfpgan.pth", "truncated.pth", "truncated.safetensors"])
def test_bad_upscaler_files_are_exit_3_and_nothing_is_written(run, tmp_path, model_file, bad):
    path = _bad_files(tmp_path, model_file)[bad]
    picture(tmp_path / "in.png", (24, 16))
    line = one_line_error(run("upscale", "in.png", "-u", str(path), "-o", "o.png", expect=None), 3)
    assert str(path) in line
    result = run("generate", PROMPT, "--hires-scale", "2", "--hires-upscaler", str(path), "-o", "g.png", expect=None)
    assert one_line_error(result, 3) == line and "loading" not in result.stderr  # said before the model loads
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "g.png").exists()
    if bad == "gfpgan.pth":
        assert "face-restoration" in line


def test_missing_upscaler_is_exit_4_naming_the_file_and_the_folder(run, tmp_path, models_dir):
    picture(tmp_path / "in.png", (24, 16))
    line = one_line_error(run("upscale", "in.png", "-u", "4x-Nope", "--upscaler-dir", str(models_dir),
                              expect=None), 4)
    assert "4x-Nope.pth" in line and str(models_dir) in line
    result = run("generate", PROMPT, "--hires-scale", "2", "--hires-upscaler", "4x-Nope", "--upscaler-dir",
                 str(models_dir), "-o", "g.png", expect=None)
    assert one_line_error(result, 4) == line and not (tmp_path / "g.png").exists()
    assert "--upscaler-dir" in one_line_error(run("upscale", "in.png", "-u", "4x-Nope", expect=None), 4)
    assert "no such file" in one_line_error(run("upscale", "in.png", "-u", "gone.pth", expect=None), 4)


# --- names and inspect ------------------------------------------------------------------------------------------


def test_names_are_found_as_a1111_lays_them_out(tmp_path, models_dir):
    assert names.choose("R-ESRGAN General 4xV3", str(models_dir)).path == (
        models_dir / "RealESRGAN" / "realesr-general-x4v3.pth")
    choice = names.choose("4x-Test", str(models_dir))
    assert (choice.kind, choice.name, choice.path) == ("model", "4x-Test", models_dir / "ESRGAN" / "4x-Test.pth")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "x.safetensors").write_bytes(b"")
    (tmp_path / "x.pth").write_bytes(b"")
    assert names.find_model("x", str(tmp_path)) == tmp_path / "x.pth"  # the folder itself before sub-folders
    (tmp_path / "x.pth").unlink()
    assert names.find_model("x", str(tmp_path)) == tmp_path / "deep" / "er" / "x.safetensors"
    assert names.choose("latent (Bicubic antialiased)", None) == names.UpscalerChoice(
        "Latent (bicubic antialiased)", "latent", "bicubic", True)
    assert names.choose("NONE", None).mode == "none" and names.choose("lanczos", None).name == "Lanczos"
    assert names.display_name(str(models_dir / "ESRGAN" / "4x-Test.pth")) == "4x-Test"


def test_inspect_an_upscaler(run, model_file, models_dir, tiny_sd1):  # noqa: F811
    report = json.loads(run("inspect", str(model_file), "--json").stdout)
    assert {k: report[k] for k in ("kind", "architecture", "scale", "purpose", "input_size", "blocks")} == {
        "kind": "upscaler", "architecture": "ESRGAN", "scale": 4, "purpose": "SR", "input_size": "any", "blocks": 1}
    assert report["parameters"] == sum(t.numel() for t in rrdb_state(RRDB).values())
    assert report["sha256"] == file_sha256(model_file) and "tiles of 512 px" in report["tiling"]
    compact = json.loads(run("inspect", str(models_dir / "RealESRGAN" / "realesr-general-x4v3.pth"), "--json",
                             "--no-hash").stdout)
    assert (compact["architecture"], compact["scale"], compact["blocks"]) == ("RealESRGAN Compact", 4, 2)
    x2 = write_rrdb(model_file.parent.parent / "x2.safetensors", RRDBConfig(in_channels=12, num_features=8,
                                                                             num_blocks=1, unshuffle=2))
    assert json.loads(run("inspect", str(x2), "--json", "--no-hash").stdout)["input_size"] == (
        "any (padded to a multiple of 2)")
    assert json.loads(run("inspect", str(tiny_sd1), "--json", "--no-hash").stdout)["kind"] == "checkpoint"


# --- the hires fix ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tiny_sd1):  # noqa: F811
    return checkpoint.load_models(tiny_sd1)


def reference(models, size: tuple[int, int], hires: tuple[int, int], to_second_pass) -> Image.Image:
    """The render computed from the pipeline's pieces: pass 1 at `size` (H, W), `to_second_pass(first)` -> the
    latents at `hires`, then img2img at 0.5 with the same generators, decoded."""
    cond, uncond = pipeline.encode_text(models, PROMPT, "")
    plan = pipeline.make_plan("euler_a", "auto", 2, cfg=5.0)
    gens = pipeline.generators([SEED])
    first = pipeline.txt2img(models, plan, cond, uncond, gens, *size)
    out = pipeline.img2img(models, plan, to_second_pass(first), cond, uncond, gens, 0.5)
    return images.tensor_to_pil(pipeline.decode_latents(models, out).images[0])


def test_hires_latent_antialiased_equals_interpolate(run, tmp_path, sd):
    run("generate", PROMPT, "--hires-scale", "2", "--hires-upscaler", "latent (antialiased)", "-W", "64", "-H", "64",
        "-o", "h.png")
    expected = reference(sd, (64, 64), (128, 128), lambda z: torch.nn.functional.interpolate(
        z, size=(16, 16), mode="bilinear", align_corners=False, antialias=True))
    ours = Image.open(tmp_path / "h.png")
    assert ours.tobytes() == expected.tobytes()
    assert "Hires upscaler: Latent (antialiased)" in ours.text["parameters"]
    assert json.loads(ours.text["sdcli"])["config"]["hires_upscaler"] == "Latent (antialiased)"


def a1111_chain(models, first, target: tuple[int, int], upscale_to_dest):
    """A1111's sample_hr_pass with a pixel upscaler, written out: decode, clamp, *255 truncated to uint8, the
    upscaler to (scaled size floored to a multiple of 8), Lanczos to the target (W, H), /255, VAE encode."""
    x = pipeline.decode_latents(models, first).images[0]  # (3, h, w) in [-1, 1]
    arr = (np.transpose(((x + 1) / 2).clamp(0, 1).numpy(), (1, 2, 0)) * np.float32(255)).astype(np.uint8)
    img = Image.fromarray(arr)
    scale = max(target[0] / img.width, target[1] / img.height)
    dest = (int(img.width * scale / 8) * 8, int(img.height * scale / 8) * 8)
    img = upscale_to_dest(img, scale, dest)
    if img.size != target:
        img = img.resize(target, Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return pipeline.encode_image(models, pixels * 2 - 1)


def test_hires_with_a_model_equals_a1111s_chain(run, tmp_path, sd, model_file):
    run("generate", PROMPT, "--hires-scale", "2", "--hires-upscaler", "4x-Test", "--upscaler-dir",
        str(model_file.parents[1]), "-W", "64", "-H", "64", "-o", "h.png")
    net = load_upscaler(model_file)
    expected = reference(sd, (64, 64), (128, 128), lambda z: a1111_chain(
        sd, z, (128, 128), lambda img, scale, dest: upscale_pil(img, net, size=dest)))  # x4 once, Lanczos to 128
    ours = Image.open(tmp_path / "h.png")
    assert ours.size == (128, 128) and ours.tobytes() == expected.tobytes()
    assert "Hires upscale: 2, Hires upscaler: 4x-Test" in ours.text["parameters"]
    meta = json.loads(ours.text["sdcli"])
    assert meta["config"]["hires_upscaler"] == "4x-Test" and "upscaler_dir" not in meta["config"]
    assert meta["hires_upscaler"] == {"name": "4x-Test", "file": "4x-Test.pth", "sha256": file_sha256(model_file)}


@pytest.mark.parametrize("name, resample", [("Lanczos", Image.Resampling.LANCZOS),
                                            ("Nearest", Image.Resampling.NEAREST), ("None", None)])
def test_hires_with_a_pil_resize_equals_a1111s_chain(run, tmp_path, sd, name, resample):
    """64x96 at 1.3: the hires size is 80x128 (latents 10x16), the scale max(80/64, 128/96) = 4/3, so Lanczos and
    Nearest resize to int(64 * 4/3) = 85 wide, then Lanczos to 80 (the destination floored to a multiple of 8);
    None is one Lanczos to 80x128."""
    run("generate", PROMPT, "--hires-scale", "1.3", "--hires-upscaler", name, "-W", "64", "-H", "96", "-o", "h.png")

    def resize(img, scale, dest):
        img = img.resize((int(img.width * scale), int(img.height * scale)), resample)
        return img if img.size == dest else img.resize(dest, Image.Resampling.LANCZOS)

    def none(img, scale, dest):
        return img  # A1111's "None": nothing before the one Lanczos to the target

    expected = reference(sd, (96, 64), (128, 80), lambda z: a1111_chain(sd, z, (80, 128), none if resample is None
                                                                         else resize))
    ours = Image.open(tmp_path / "h.png")
    assert ours.size == (80, 128) and ours.tobytes() == expected.tobytes()
    assert f"Hires upscaler: {name}" in ours.text["parameters"]


def test_default_latent_writes_what_it_always_wrote(run, tmp_path):
    run("generate", PROMPT, "--hires-scale", "2", "-W", "64", "-H", "64", "-o", "default.png")
    run("generate", PROMPT, "--hires-scale", "2", "-W", "64", "-H", "64", "--hires-upscaler", "Latent", "-o", "l.png")
    assert (tmp_path / "default.png").read_bytes() == (tmp_path / "l.png").read_bytes()
    img = Image.open(tmp_path / "default.png")
    assert "Hires upscaler: Latent," in img.text["parameters"]
    config = json.loads(img.text["sdcli"])["config"]
    assert "hires_upscaler" not in config and "upscaler_dir" not in config


A1111_INFOTEXT = (f"{PROMPT}\nSteps: 2, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: {SEED}, "
                  "Size: 64x64, Model hash: 0123456789, Model: tiny, Denoising strength: 0.45, Hires upscale: 2, "
                  "Hires steps: 3, Hires upscaler: 4x-Test, RNG: CPU, Version: v1.10.1")


def test_a1111_image_replays_its_upscaler_from_the_folder(run, tmp_path, model_file):
    picture(tmp_path / "a1111.png", (64, 64), texts={"parameters": A1111_INFOTEXT})
    folder = str(model_file.parents[1])
    said = run("generate", "--from-image", "a1111.png", "--upscaler-dir", folder, "-o", "replay.png").stderr
    assert "a hires fix with CPU noise" in said  # A1111 starts new generators there; sdcli's cpu noise goes on
    run("generate", PROMPT, "-W", "64", "-H", "64", "--hires-scale", "2", "--hires-steps", "3", "--hires-strength",
        "0.45", "--hires-upscaler", str(model_file), "-o", "direct.png")
    replay = Image.open(tmp_path / "replay.png")
    assert replay.size == (128, 128) and replay.tobytes() == Image.open(tmp_path / "direct.png").tobytes()
    text = replay.text["parameters"]
    assert "Denoising strength: 0.45," in text and "Hires upscale: 2, Hires steps: 3, Hires upscaler: 4x-Test" in text
    missing = one_line_error(run("generate", "--from-image", "a1111.png", "--upscaler-dir", str(tmp_path),
                                 "-o", "m.png", expect=None), 4)
    assert "4x-Test.pth" in missing and str(tmp_path) in missing and not (tmp_path / "m.png").exists()


def test_verify_rerenders_with_the_upscaler(run, tmp_path, model_file, tiny_sd1):  # noqa: F811
    folder = str(model_file.parents[1])
    run("generate", PROMPT, "-W", "64", "-H", "64", "--hires-scale", "2", "--hires-upscaler", "4x-Test",
        "--upscaler-dir", folder, "-o", "v.png")
    assert "identical" in run("verify", "v.png", "-m", str(tiny_sd1), "--upscaler-dir", folder).stderr
    missing = one_line_error(run("verify", "v.png", "-m", str(tiny_sd1), expect=None), 4)
    assert "4x-Test" in missing and "--upscaler-dir" in missing


def test_config_key_and_print_config(run, tmp_path):
    (tmp_path / "c.yaml").write_text("hires_upscaler: latent (nearest-exact)\nupscaler_dir: somewhere\n")
    printed = json.loads(run("generate", PROMPT, "--config", "c.yaml", "--print-config", "--json").stdout)["config"]
    assert (printed["hires_upscaler"], printed["upscaler_dir"]) == ("Latent (nearest-exact)", "somewhere")
    (tmp_path / "bad.yaml").write_text("hires_upscaler: ''\n")
    assert "'hires_upscaler'" in one_line_error(run("generate", PROMPT, "--config", "bad.yaml", "--print-config",
                                                    expect=None), 3)
