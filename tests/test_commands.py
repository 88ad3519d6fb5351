"""Every command end to end through Typer's CliRunner with the tiny SD1 checkpoint (64x64, 3 steps, fp32 CPU):
generate (files, batches, templates, JSON lines, latents, prompts files, stdout, dry run, printed config),
img2img (odd sizes and modes), encode/decode round trips (ours and ComfyUI .latent), encode --text ->
generate --cond, inspect on every kind of artifact, and the error paths with their exit codes.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from sd_parsers import ParserManager
from typer.testing import CliRunner

import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli.output import latents
from _cli import invoker, pixels
from sdcli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a watercolor fox, (autumn:1.2)"
NEG = "blurry"


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """run(command, *args) -> CliRunner result, in tmp_path. Rendering commands get the model and fast defaults
    (64x64, 3 steps, euler_a, cfg 5) placed first, so that a flag the test gives wins (Click keeps the last)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    model = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32"]
    render = ["--steps", "3", "-W", "64", "-H", "64", "--sampler", "euler_a", "--cfg", "5", "--negative", NEG]

    return invoker({"generate": model + render, "img2img": model + render[:2] + render[6:], "encode": model,
                    "decode": model})  # the test's own flags come after these, so they win


def json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# --- generate ------------------------------------------------------------------------------------

def test_generate_single_is_deterministic_png(cli, tmp_path):
    cli("generate", PROMPT, "--seed", "42", "-o", "a.png", "--overwrite")
    a = (tmp_path / "a.png").read_bytes()
    cli("generate", PROMPT, "--seed", "42", "-o", "a.png", "--overwrite")
    assert (tmp_path / "a.png").read_bytes() == a  # same command twice: the same bytes, metadata included
    img = Image.open(io.BytesIO(a))
    assert img.format == "PNG" and img.size == (64, 64)
    assert len(np.unique(pixels(tmp_path / "a.png"))) > 16  # a real picture, not a flat one
    cli("generate", PROMPT, "--seed", "43", "-o", "c.png")
    assert not np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "c.png"))


def test_batch_with_template_json_and_latents_equals_single_runs(cli, tmp_path):
    result = cli("generate", PROMPT, "--seed", "100", "-n", "3", "--batch-size", "2", "-o", "out/{index}-{seed}.png",
                 "--latent-out", "out/{index}.safetensors", "--json")
    lines = json_lines(result)
    assert [(d["index"], d["seed"], d["path"]) for d in lines] == [
        (k, 100 + k, str(Path("out") / f"{k}-{100 + k}.png")) for k in range(3)]
    assert all(d["prompt"] == PROMPT and {"sample_s", "decode_s"} <= d["timings"].keys() for d in lines)
    # image k of the batch (k = 1 shares a batch with 0, k = 2 is alone) equals a single run with seed 100+k
    for k in (1, 2):
        cli("generate", PROMPT, "--seed", str(100 + k), "-o", f"single{k}.png")
        assert np.array_equal(pixels(tmp_path / f"out/{k}-{100 + k}.png"), pixels(tmp_path / f"single{k}.png"))
    lf = latents.load_latent(tmp_path / "out/1.safetensors")
    assert tuple(lf.latent.shape) == (1, 4, 8, 8) and lf.scaled and lf.family == "sd1"
    # the saved final latent decodes to exactly the generated image
    cli("decode", "out/1.safetensors", "-o", "dec1.png")
    assert np.array_equal(pixels(tmp_path / "dec1.png"), pixels(tmp_path / "out/1-101.png"))


def test_prompts_file_jsonl_overrides(cli, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# a comment\n"
                    + json.dumps({"prompt": "a red car", "steps": 2, "seed": 7, "cfg": 3.0}) + "\n\n"
                    + "a blue boat\n"
                    + json.dumps({"prompt": "a green tree", "negative": "fog", "n": 2}) + "\n")
    result = cli("generate", "--prompts-file", str(jobs), "--seed", "50", "-o", "{index}-{seed}.png", "--json")
    assert [(d["prompt"], d["seed"]) for d in json_lines(result)] == [
        ("a red car", 7), ("a blue boat", 50), ("a green tree", 50), ("a green tree", 51)]
    meta = [read_meta(tmp_path / name) for name in ("0-7.png", "1-50.png", "3-51.png")]
    assert (meta[0]["steps"], meta[0]["cfg"], meta[0]["negative"]) == (2, 3.0, NEG)
    assert (meta[1]["steps"], meta[1]["cfg"]) == (3, 5.0)
    assert meta[2]["negative"] == "fog"
    # a job of the file renders as the same flags on the command line would
    cli("generate", "a red car", "--seed", "7", "--steps", "2", "--cfg", "3", "-o", "direct.png")
    assert np.array_equal(pixels(tmp_path / "0-7.png"), pixels(tmp_path / "direct.png"))


def read_meta(path) -> dict:
    """The resolved config recorded in our JSON chunk."""
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["sdcli"]["config"]


def test_prompts_file_from_stdin(cli, tmp_path):
    result = cli("generate", "--prompts-file", "-", "--seed", "9", "-o", "s{index}.png", "--json", input="one\ntwo\n")
    assert [d["prompt"] for d in json_lines(result)] == ["one", "two"]
    assert (tmp_path / "s1.png").exists()


def test_stdout_png_bytes(cli, tmp_path):
    result = cli("generate", PROMPT, "--seed", "5", "-o", "-")
    assert result.stdout_bytes.startswith(b"\x89PNG\r\n\x1a\n")
    assert cli("generate", PROMPT, "--seed", "5", "-o", "-").stdout_bytes == result.stdout_bytes
    (tmp_path / "stdout.png").write_bytes(result.stdout_bytes)
    cli("generate", PROMPT, "--seed", "5", "-o", "file.png")
    # the same file: where a copy was written is not part of its metadata
    assert (tmp_path / "stdout.png").read_bytes() == (tmp_path / "file.png").read_bytes()
    assert "output" not in read_meta(tmp_path / "stdout.png")


def test_dry_run_plans_without_loading_or_writing(cli, tmp_path):
    result = CliRunner().invoke(app, ["generate", PROMPT, "--dry-run", "--json", "-m", str(tmp_path / "absent.safetensors"),
                                      "--steps", "4", "--sampler", "DPM++ 2M Karras", "--seed", "3"])
    assert result.exit_code == 0, result.output
    (plan,) = json_lines(result)
    assert plan["sampler"] == "dpm++_2m" and plan["config"]["seed"] == 3
    assert len(plan["sigmas"]) == 5 and plan["sigmas"][-1] == 0 and plan["sigmas"][0] == pytest.approx(14.6146, abs=1e-3)
    assert plan["prompt"] == PROMPT and plan["tokens"]
    assert not list(tmp_path.glob("*.png"))


def test_print_config_yaml_and_json(cli):
    text = cli("generate", PROMPT, "--print-config").stdout
    assert "steps: 3" in text and "sampler: euler_a" in text
    data = json.loads(cli("generate", PROMPT, "--print-config", "--json").stdout)["config"]
    assert (data["steps"], data["width"], data["negative"]) == (3, 64, NEG)


# --- metadata ------------------------------------------------------------------------------------

def test_metadata_read_by_sd_parsers_and_inspect(cli, tiny_sd1, tmp_path):  # noqa: F811
    cli("generate", PROMPT, "--seed", "77", "-o", "m.png")
    info = ParserManager().parse(tmp_path / "m.png")
    assert [p.value for p in info.prompts] == [PROMPT]
    assert [p.value for p in info.negative_prompts] == [NEG]
    sampler = info.samplers[0]
    assert sampler.name == "Euler a"
    assert (sampler.parameters["steps"], sampler.parameters["seed"]) == ("3", "77")
    assert float(sampler.parameters["cfg_scale"]) == 5.0
    assert sampler.model.name == tiny_sd1.stem
    from sdcli.formats.hashing import file_sha256

    sha = file_sha256(tiny_sd1)
    assert sampler.model.hash == sha[:10]

    report = json.loads(cli("inspect", "m.png", "--json").stdout)
    assert report["kind"] == "image" and report["source"] == "sdcli"
    params = report["parameters"]
    assert (params["prompt"], params["seed"], params["steps"]) == (PROMPT, 77, 3)
    ours = report["sdcli"]
    assert ours["model"]["sha256"] == sha and ours["model"]["family"] == "sd1"
    assert (ours["device"], ours["dtype"], ours["mode"]) == ("cpu", "fp32", "txt2img")
    assert ours["config"]["seed"] == 77 and ours["fallbacks"] == []


# --- img2img -------------------------------------------------------------------------------------

def _picture(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    return (np.stack([x, y, 0.5 + 0.5 * np.sin(9 * x * y)], -1) * 255).astype(np.uint8)


def test_img2img_odd_size_and_modes(cli, tmp_path):
    rgba = np.dstack([_picture(70, 50), np.full((50, 70), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(_picture(70, 50)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "pal.png")
    for name in ("rgba", "pal"):
        result = cli("img2img", PROMPT, "-i", f"{name}.png", "--strength", "0.6", "--seed", "1", "-o", f"{name}-out.png",
                     "--json")
        assert Image.open(tmp_path / f"{name}-out.png").size == (64, 48)  # cropped to multiples of 8 ...
        assert "64x48" in result.stderr or "multiple of 8" in result.stderr  # ... and said
        (line,) = json_lines(result)
        assert line["path"] == f"{name}-out.png"
    meta = json.loads(cli("inspect", "rgba-out.png", "--json").stdout)
    assert meta["sdcli"]["mode"] == "img2img" and meta["parameters"]["denoising_strength"] == 0.6
    assert meta["sdcli"]["notes"]  # the crop and the transparency were recorded


def test_img2img_strength_zero_keeps_the_vae_round_trip(cli, tmp_path):
    Image.fromarray(_picture(64, 64)).save(tmp_path / "in.png")
    cli("img2img", PROMPT, "-i", "in.png", "--strength", "0", "--seed", "1", "-o", "same.png")
    cli("encode", "in.png", "-o", "in.safetensors")
    cli("decode", "in.safetensors", "-o", "rt.png")
    assert np.array_equal(pixels(tmp_path / "same.png"), pixels(tmp_path / "rt.png"))


# --- encode / decode -----------------------------------------------------------------------------

def test_encode_decode_round_trip_ours_and_comfy(cli, tmp_path):
    Image.fromarray(_picture(64, 48)).save(tmp_path / "in.png")
    ours = json_lines(cli("encode", "in.png", "-o", "in.safetensors", "--json"))[0]
    comfy = json_lines(cli("encode", "in.png", "-o", "in.latent", "--json"))[0]
    assert ours["shape"] == comfy["shape"] == [1, 4, 6, 8]
    a, b = latents.load_latent(tmp_path / "in.safetensors"), latents.load_latent(tmp_path / "in.latent")
    torch.testing.assert_close(a.unet_space(0.18215), b.unet_space(0.18215), rtol=1e-6, atol=1e-6)
    assert b.format == "comfyui" and a.source_size == (64, 48)
    cli("decode", "in.safetensors", "-o", "a.png")
    cli("decode", "in.latent", "-o", "b.png")
    pa, pb = pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png")
    assert pa.shape == pb.shape == (48, 64, 3)
    assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1  # scale/unscale may move a float ulp
    report = json.loads(cli("inspect", "in.latent", "--json").stdout)
    assert report["kind"] == "latent" and report["shape"] == [1, 4, 6, 8]


def test_decode_several_latents_needs_a_template(cli, tmp_path):
    cli("generate", PROMPT, "--seed", "1", "-n", "2", "--batch-size", "2", "-o", "g{index}.png",
        "--latent-out", "g{index}.safetensors")
    two = torch.cat([latents.load_latent(tmp_path / f"g{k}.safetensors").latent for k in range(2)])
    latents.save_latent(tmp_path / "two.safetensors", two, scaled=True, scale_factor=0.18215, family="sd1",
                        source_size=None, model_hash=None)
    assert cli("decode", "two.safetensors", "-o", "one.png", expect=2).exit_code == 2
    cli("decode", "two.safetensors", "-o", "d{index}.png")
    for k in range(2):
        assert np.array_equal(pixels(tmp_path / f"d{k}.png"), pixels(tmp_path / f"g{k}.png"))


def test_encode_text_then_generate_with_cond(cli, tmp_path):
    emb = json_lines(cli("encode", "--text", PROMPT, "-o", "fox.safetensors", "--json"))[0]
    assert emb["kind"] == "embedding" and emb["shape"] == [1, 77, 64]
    cli("generate", PROMPT, "--seed", "8", "-o", "text.png")
    cli("generate", "--cond", "fox.safetensors", "--seed", "8", "-o", "cond.png")
    assert np.array_equal(pixels(tmp_path / "text.png"), pixels(tmp_path / "cond.png"))
    # the metadata names the prompt the embedding was made from; a PROMPT that would not be used is refused
    assert json.loads(cli("inspect", "cond.png", "--json").stdout)["parameters"]["prompt"] == PROMPT
    cli("generate", "a different prompt", "--cond", "fox.safetensors", "-o", "no.png", expect=2)
    report = json.loads(cli("inspect", "fox.safetensors", "--json").stdout)
    assert report["kind"] == "embedding" and report["shape"] == [1, 77, 64] and report["chunks"] == 1


# --- inspect -------------------------------------------------------------------------------------

def test_inspect_checkpoint_and_prompt(cli, tiny_sd1):  # noqa: F811
    from sdcli.formats.hashing import file_sha256

    report = json.loads(cli("inspect", str(tiny_sd1), "--json").stdout)
    assert (report["kind"], report["family"], report["prediction"], report["inpaint"]) == ("checkpoint", "sd1", "eps", False)
    assert file_sha256(tiny_sd1) in json.dumps(report)
    text = cli("inspect", str(tiny_sd1)).stdout
    assert "sd1" in text
    prompt = json.loads(cli("inspect", "--prompt", "a (red:1.5) fox BREAK night", "--json").stdout)
    assert prompt["kind"] == "prompt"
    dumped = json.dumps(prompt)
    assert "1.5" in dumped and "49406" in dumped


# --- errors --------------------------------------------------------------------------------------

def test_existing_output_is_exit_7_and_untouched(cli, tmp_path):
    (tmp_path / "x.png").write_bytes(b"precious")
    result = cli("generate", PROMPT, "--seed", "1", "-o", "x.png", expect=7)
    assert "--overwrite" in result.stderr
    assert (tmp_path / "x.png").read_bytes() == b"precious"
    cli("generate", PROMPT, "--seed", "1", "-o", "x.png", "--overwrite")
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG")


def test_bad_sampler_is_exit_2(cli):
    result = cli("generate", PROMPT, "--sampler", "eulr", expect=2)
    assert "euler" in result.stderr  # close matches are suggested


def test_missing_model_is_exit_3_or_4(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (str(tmp_path / "nope.safetensors"), "nobody/no-such-model"):
        result = CliRunner().invoke(app, ["generate", "x", "-m", model, "--steps", "1", "-o", "o.png"])
        assert result.exit_code in (3, 4), result.output
        assert not (tmp_path / "o.png").exists()


def test_wrong_shape_latent_is_exit_3(cli, tmp_path):
    save_file({"latent": torch.zeros(1, 3, 8, 8)}, str(tmp_path / "bad.safetensors"),
              metadata={"format": "sdcli.latent", "version": "1", "scaled": "true"})
    result = cli("decode", "bad.safetensors", "-o", "bad.png", expect=3)
    assert "bad.safetensors" in result.stderr
    cli("generate", PROMPT, "--latent-in", "bad.safetensors", "-o", "bad.png", expect=3)
    assert not (tmp_path / "bad.png").exists()


def test_generate_latent_in_equals_img2img(cli, tmp_path):
    """generate --latent-in FILE starts from the file as img2img starts from the image's latent (default
    strength 0.75 in both), so the two give the same picture."""
    Image.fromarray(_picture(64, 64)).save(tmp_path / "in.png")
    cli("encode", "in.png", "-o", "in.latent")
    cli("img2img", PROMPT, "-i", "in.png", "--seed", "4", "-o", "i2i.png")
    cli("generate", PROMPT, "--latent-in", "in.latent", "--seed", "4", "-o", "lat.png")
    a, b = pixels(tmp_path / "i2i.png"), pixels(tmp_path / "lat.png")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the .latent file stores raw VAE space (one ulp)
    cli("generate", PROMPT, "--seed", "4", "-o", "txt.png")
    assert np.abs(a.astype(int) - pixels(tmp_path / "txt.png").astype(int)).max() > 10  # it did start from the file


def test_a_render_imports_neither_transformers_nor_dynamo(tiny_sd1, tmp_path):  # noqa: F811
    """Cold-start cost: transformers' import took ~3 s of every run, torch._dynamo (pulled in by meta-device
    nn.Embedding init) ~1 s. A whole render needs neither."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            f"sys.argv = ['sdcli', 'generate', 'a fox', '--model', {str(tiny_sd1)!r}, '-W', '64', '-H', '64',\n"
            f"            '--steps', '2', '--seed', '1', '-q', '-o', {str(tmp_path / 'a.png')!r}]\n"
            "try:\n    runpy.run_module('sdcli', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "bad = {'transformers', 'torch._dynamo'} & set(sys.modules)\n"
            "assert not bad, bad\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "a.png").stat().st_size > 0
