"""Textual-inversion embeddings wired through the commands: conditioning equal to diffusers' load_textual_inversion
on the same tiny random weights (SD1 and SD2; A1111 .pt, kohya emb_params and diffusers learned_embeds files), a
whole render equal to diffusers' pipeline with the same embedding, and the CLI around it: --embeddings-dir,
embedding:NAME, negative prompts, prompts files, prompt editing, inspect --prompt, the TI hashes in the metadata,
and --from-image / verify finding the files again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_embeddings import random_vectors, write_embedding
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers, tiny_sd2, tiny_sd2_diffusers  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread, sd1_models, sd2_models  # noqa: F401
from PIL import Image
from typer.testing import CliRunner

from sdcli import pipeline as P
from sdcli.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 64  # the tiny models' CLIP width (SD1 and SD2)
PROMPT = "a photo of fooemb on a table"
NEGATIVE = "blurry, baremb"


def diffusers_pipe(folder: Path, tokenizer_dir: Path, family: str):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pad = "<|endoftext|>" if family == "sd1" else "!"
    pred = "epsilon" if family == "sd1" else "v_prediction"
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token=pad, model_max_length=77),
        scheduler=EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                         beta_schedule="scaled_linear", prediction_type=pred,
                                         timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def vectors():
    return {"fooemb": random_vectors(2, WIDTH, seed=1), "baremb": random_vectors(1, WIDTH, seed=2)}


def embeddings_folder(root: Path, vectors: dict, fmt: str) -> Path:
    suffix = {"a1111_pt": ".pt", "emb_params": ".safetensors", "diffusers_bin": ".bin"}[fmt]
    for name, t in vectors.items():
        write_embedding(root / "sub" / f"{name}{suffix}", fmt, {"*": t})
    return root


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("fmt", ["a1111_pt", "emb_params", "diffusers_bin"])
def test_conditioning_equals_diffusers_load_textual_inversion(family, fmt, vectors, tmp_path, tiny_sd1_diffusers,
                                                               tiny_sd2_diffusers, clip_tokenizer_dir, sd1_models,
                                                               sd2_models):  # noqa: F811
    folder = tiny_sd1_diffusers if family == "sd1" else tiny_sd2_diffusers
    pipe = diffusers_pipe(folder, clip_tokenizer_dir, family)
    for name, t in vectors.items():  # token= always: a single-key file's key is not the trigger
        pipe.load_textual_inversion(t.clone(), token=name, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    models = P.with_embeddings(sd1_models if family == "sd1" else sd2_models,
                               embeddings_folder(tmp_path, vectors, fmt))
    cond, uncond = P.encode_text(models, PROMPT, NEGATIVE)
    with torch.no_grad():
        ref_cond, ref_uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    plain, _ = P.encode_text(sd1_models if family == "sd1" else sd2_models, PROMPT, NEGATIVE)
    assert (plain - ref_cond).abs().max() > 1e-2, "the embedding changed nothing"
    torch.testing.assert_close(cond, ref_cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncond, ref_uncond, rtol=0, atol=1e-5)


def test_embedding_syntax_and_bpe_trigger_agree(vectors, tmp_path, sd1_models):  # noqa: F811
    models = P.with_embeddings(sd1_models, embeddings_folder(tmp_path, vectors, "emb_params"))
    by_name, _ = P.encode_text(models, PROMPT, "")
    by_ref, _ = P.encode_text(models, "a photo of embedding:fooemb on a table", "")
    torch.testing.assert_close(by_ref, by_name, rtol=0, atol=0)
    inside, _ = P.encode_text(models, "a photo of xfooembx on a table", "")  # not a whole BPE sequence
    plain, _ = P.encode_text(sd1_models, "a photo of xfooembx on a table", "")
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_a_width_that_does_not_fit_is_one_warning_and_plain_words(tmp_path, sd1_models, capsys):  # noqa: F811
    write_embedding(tmp_path / "fooemb.safetensors", "emb_params", {"*": random_vectors(2, WIDTH + 8)})
    models = P.with_embeddings(sd1_models, tmp_path)
    got, _ = P.encode_text(models, PROMPT + ", fooemb", "fooemb")
    plain, _ = P.encode_text(sd1_models, PROMPT + ", fooemb", "fooemb")
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and "fooemb.safetensors" in err


# --- a whole render against diffusers' pipeline --------------------------------------------------

SIZE, STEPS, CFG, SEED = 64, 6, 6.5, 77


def test_render_equals_diffusers_pipeline_with_the_embedding(vectors, tmp_path, tiny_sd1, tiny_sd1_diffusers,
                                                              clip_tokenizer_dir, monkeypatch):  # noqa: F811
    folder = embeddings_folder(tmp_path / "emb", vectors, "a1111_pt")
    out = tmp_path / "ours.png"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    result = CliRunner().invoke(app, [
        "generate", PROMPT, "--negative", NEGATIVE, "-m", str(tiny_sd1), "--embeddings-dir", str(folder),
        "--device", "cpu", "--dtype", "fp32", "-W", str(SIZE), "-H", str(SIZE), "--steps", str(STEPS),
        "--sampler", "euler", "--schedule", "normal", "--cfg", str(CFG), "--seed", str(SEED), "-o", str(out)])
    assert result.exit_code == 0, (result.stderr, result.exception)

    pipe = diffusers_pipe(tiny_sd1_diffusers, clip_tokenizer_dir, "sd1")
    for name, t in vectors.items():
        pipe.load_textual_inversion(t.clone(), token=name, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    plan = P.make_plan("euler", "normal", STEPS, cfg=CFG)
    gen = torch.Generator().manual_seed(SEED)
    noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=gen)  # our first draw; Euler draws no more
    pipe.scheduler.set_timesteps(sigmas=plan.sigmas.tolist())
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=CFG,
               latents=noise * float(plan.sigmas[0]) / pipe.scheduler.init_noise_sigma, generator=gen,
               sigmas=plan.sigmas.tolist(), output_type="np").images[0]
    ref = np.round(ref * 255).astype(int)
    ours = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert len(np.unique(ref)) > 16, "degenerate oracle image"
    close = (np.abs(ours - ref) <= 2).mean()
    assert close >= 0.99, f"only {close:.2%} of the pixel values within 2 levels"
    plain = CliRunner().invoke(app, [
        "generate", PROMPT, "--negative", NEGATIVE, "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32",
        "-W", str(SIZE), "-H", str(SIZE), "--steps", str(STEPS), "--sampler", "euler", "--schedule", "normal",
        "--cfg", str(CFG), "--seed", str(SEED), "-o", str(tmp_path / "plain.png")])
    assert plain.exit_code == 0
    assert (np.abs(np.asarray(Image.open(tmp_path / "plain.png").convert("RGB")).astype(int) - ref) > 2).mean() > 0.05


# --- the commands --------------------------------------------------------------------------------


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch, vectors):  # noqa: F811
    """run(command, *args, expect=0) in tmp_path, with an embeddings folder at tmp_path/emb (fooemb, baremb)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    embeddings_folder(tmp_path / "emb", vectors, "emb_params")
    model = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32"]
    fast = ["--steps", "3", "-W", "64", "-H", "64", "--sampler", "euler", "--cfg", "5"]

    def run(command: str, *args: str, expect: int = 0):
        extra = {"generate": model + fast, "encode": model, "verify": model[:4]}.get(command, [])
        result = CliRunner().invoke(app, [command, *extra, *args])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def _meta(path) -> tuple[str, dict]:
    info = Image.open(path).info
    return info["parameters"], json.loads(info["sdcli"])


def test_metadata_replay_and_verify_find_the_embeddings(cli, tmp_path):
    cli("generate", "a (fooemb:1.2) in [fooemb:a cat:0.5]", "--negative", "baremb", "--seed", "5",
        "--embeddings-dir", "emb", "-o", "a.png")
    text, meta = _meta(tmp_path / "a.png")
    sha = {n: __import__("hashlib").sha256((tmp_path / "emb" / "sub" / f"{n}.safetensors").read_bytes()).hexdigest()
           for n in ("fooemb", "baremb")}
    assert f'TI hashes: "fooemb: {sha["fooemb"][:12]}, baremb: {sha["baremb"][:12]}"' in text
    assert meta["embeddings"] == [{"name": n, "file": f"{n}.safetensors", "sha256": sha[n], "vectors": v}
                                  for n, v in (("fooemb", 2), ("baremb", 1))]
    assert "embeddings_dir" not in meta["config"]
    cli("generate", "--from-image", "a.png", "--embeddings-dir", "emb", "-o", "b.png")
    assert (tmp_path / "a.png").read_bytes() != b"" and \
        np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
    cli("verify", "a.png", "--embeddings-dir", "emb")
    no_dir = cli("generate", "--from-image", "a.png", "-o", "c.png", expect=4)
    assert "fooemb, baremb" in no_dir.stderr and "--embeddings-dir" in no_dir.stderr
    (tmp_path / "emb" / "sub" / "baremb.safetensors").rename(tmp_path / "baremb.safetensors")
    missing = cli("verify", "a.png", "--embeddings-dir", "emb", expect=4)
    assert "baremb: not found under emb" in missing.stderr and not (tmp_path / "c.png").exists()


def test_an_image_without_embeddings_records_none(cli, tmp_path):
    cli("generate", "a cat", "--embeddings-dir", "emb", "-o", "a.png")
    text, meta = _meta(tmp_path / "a.png")
    assert "TI hashes" not in text and "embeddings" not in meta


def test_prompts_file_lines_use_the_folder(cli, tmp_path):
    (tmp_path / "jobs.jsonl").write_text('{"prompt": "a cat", "seed": 1}\n'
                                         '{"prompt": "a cat", "seed": 1, "negative": "embedding:baremb"}\n'
                                         'a fooemb\n')  # fmt: skip
    cli("generate", "--prompts-file", "jobs.jsonl", "--embeddings-dir", "emb", "-o", "{index}.png")
    metas = [_meta(tmp_path / f"{k}.png")[1] for k in range(3)]
    assert [[e["name"] for e in m.get("embeddings", [])] for m in metas] == [[], ["baremb"], ["fooemb"]]
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "0.png")), np.asarray(Image.open(tmp_path / "1.png")))


def test_encode_text_and_inspect_prompt(cli, tmp_path):
    cli("encode", "--text", "a fooemb", "--embeddings-dir", "emb", "-o", "e.safetensors")
    cli("encode", "--text", "a fooemb", "-o", "p.safetensors")
    from safetensors.torch import load_file

    assert not torch.equal(*(next(iter(load_file(str(tmp_path / f)).values())) for f in ("e.safetensors",
                                                                                         "p.safetensors")))
    shown = cli("inspect", "--prompt", "a (fooemb:1.2), embedding:baremb", "--embeddings-dir", "emb")
    assert "embedding: fooemb (2 vectors" in shown.stdout and "embedding: baremb (1 vector," in shown.stdout
    assert "<fooemb>(1.2) <fooemb#1>(1.2)" in shown.stdout
    report = json.loads(cli("inspect", "--prompt", "a fooemb", "--embeddings-dir", "emb", "--json").stdout)
    assert [(e["name"], e["vectors"]) for e in report["embeddings"]] == [("fooemb", 2)]
    assert report["tokens"] == ["a</w>", "<fooemb>", "<fooemb#1>"]
    plan = json.loads(cli("generate", "a fooemb", "--embeddings-dir", "emb", "--dry-run", "--json").stdout)
    assert plan["tokens"]["tokens"] == ["a</w>", "<fooemb>", "<fooemb#1>"]


def test_missing_folder_is_exit_4_before_loading(cli):
    result = cli("generate", "a cat", "--embeddings-dir", "nope", expect=4)
    assert "embeddings_dir nope: no such folder" in result.stderr


def test_prompt_editing_switches_the_embedding(vectors, tmp_path, sd1_models):  # noqa: F811
    models = P.with_embeddings(sd1_models, embeddings_folder(tmp_path, vectors, "emb_params"))
    cond, _ = P.encode_scheduled(models, "a [fooemb:cat:2] photo", "", 4)
    first, second = (c for _, c in cond.entries)
    torch.testing.assert_close(first, P.encode_text(models, "a fooemb photo", "")[0], rtol=0, atol=0)
    torch.testing.assert_close(second, P.encode_text(models, "a cat photo", "")[0], rtol=0, atol=0)
