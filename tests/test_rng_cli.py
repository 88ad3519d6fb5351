"""A1111's noise through the real commands (issue 29): `--rng gpu|nv`, variation seeds, seed resize, ENSD, eta and
sigma churn, their infotext fields and their replay.

The oracles are written here, apart from the code under test: the initial noise is PhiloxGenerator / rng.randn /
slerp / paste_centred called directly (tests/test_rng.py checks those against Philox known answers and published
CUDA output), and the sampler loops are k-diffusion's sample_euler (with churn) and sample_euler_ancestral (with
eta) as crowsonkb/k-diffusion ab527a9 (A1111's pin) writes them, fed that noise. The model is the tiny random
SD1 checkpoint, called through the denoiser the command built (captured by wrapping samplers.sample), so the
comparisons are exact: the same fp32 operations on the same tensors, in the same order, give the same bits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file

from _cli import invoker, pixels
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from sdcli.app import sweep_axes
from sdcli.sampling import a1111_params
from sdcli.sampling import rng as rng_module
from sdcli.sampling import samplers as samplers_module
from sdcli.sampling.rng import PhiloxGenerator, paste_centred, randn, slerp

RENDER = ["--steps", "3", "-W", "64", "-H", "64", "--cfg", "5", "--negative", "blurry", "--dtype", "fp32"]
SHAPE = (4, 8, 8)  # one image's latent at 64x64


@pytest.fixture
def run(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    model = ["-m", str(tiny_sd1), "--device", "cpu"]
    return invoker({"generate": model, "img2img": model, "sweep": model, "verify": model, "encode": model})


class Sampled:
    """Every samplers.sample call of a command: its start, sigmas, options and result; with `reference` set, that
    loop run on the same denoiser inside the command, its result kept beside."""

    def __init__(self):
        self.calls, self.reference = [], None


@pytest.fixture
def sampled(monkeypatch):
    record, real = Sampled(), samplers_module.sample

    def wrapper(name, model, x, sigmas, noise=None, callback=None, **options):
        out = real(name, model, x, sigmas, noise, callback, **options)
        call = {"x": x.clone(), "sigmas": sigmas.clone(), "options": options, "out": out.clone()}
        if record.reference is not None:
            call["reference"] = record.reference(model, x.clone(), sigmas)
        record.calls.append(call)
        return out

    monkeypatch.setattr(samplers_module, "sample", wrapper)
    return record


# ----------------------------------------------------------------------------- k-diffusion's loops (ab527a9)

def k_euler(model, x, sigmas, noise, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """k_diffusion.sampling.sample_euler: Karras et al. 2022 Alg. 2; one randn_like per step, used where gamma > 0."""
    s = [float(v) for v in sigmas]
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(s) - 1):
        gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1) if s_tmin <= s[i] <= s_tmax else 0.0
        eps = noise() * s_noise
        sigma_hat = s[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - s[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def k_euler_ancestral(model, x, sigmas, noise, eta=1.0):
    """k_diffusion.sampling.sample_euler_ancestral with get_ancestral_step(eta) and randn_like noise."""
    s = [float(v) for v in sigmas]
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(s) - 1):
        denoised = model(x, s[i] * s_in)
        if not eta:
            down, up = s[i + 1], 0.0
        else:
            up = min(s[i + 1], eta * (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5)
            down = (s[i + 1] ** 2 - up**2) ** 0.5
        d = (x - denoised) / s[i]
        x = x + d * (down - s[i])
        if s[i + 1] > 0:
            x = x + noise() * up
    return x


def philox_draws(seeds):
    """noise() of a batch drawing from fresh NV generators, one per seed (A1111's ImageRNG.next after ENSD)."""
    gens = [PhiloxGenerator(s) for s in seeds]
    return lambda: torch.stack([g.randn(SHAPE) for g in gens])


def _latent(path):
    return load_file(str(path))["latent"]


# ----------------------------------------------------------------------------- initial noise

@pytest.mark.parametrize("source", ["nv", "gpu"])
def test_initial_noise_is_philox(run, sampled, source):
    """--rng nv / gpu: image k's initial noise is PhiloxGenerator(seed + k).randn, A1111's NV (and any GPU's, up
    to its thread capacity)."""
    run("generate", "a fox", *RENDER, "--sampler", "euler", "--rng", source, "--seed", "7", "-n", "2", "--batch-size", "2",
        "-o", "i{index}.png")
    call = sampled.calls[0]
    expected = torch.stack([PhiloxGenerator(7).randn(SHAPE), PhiloxGenerator(8).randn(SHAPE)])
    assert torch.equal(call["x"], expected * call["sigmas"][0])
    assert f"RNG: {source.upper()}," in Image.open("i0.png").text["parameters"]


def test_variation_seed_and_seed_resize_are_rng_functions(run, sampled):
    """Variation seeds and "resize seed from" through the command equal slerp / paste_centred on rng.randn draws:
    with a variation every image keeps the seed and image k takes subseed + k (A1111's numbering)."""
    run("generate", "a fox", *RENDER, "--sampler", "euler", "--rng", "nv", "--seed", "3", "--subseed", "10",
        "--subseed-strength", "0.3", "--seed-resize-from", "96x48", "-n", "2", "--batch-size", "2", "-o", "v{index}.png")
    call = sampled.calls[0]
    expected = []
    for k in range(2):
        small = slerp(0.3, randn(3, (4, 6, 12), "nv"), randn(10 + k, (4, 6, 12), "nv"))  # drawn at 48x96 px
        expected.append(paste_centred(small, randn(3, SHAPE, "nv")))
    assert torch.equal(call["x"], torch.stack(expected) * call["sigmas"][0])
    for k in range(2):
        record = json.loads(Image.open(f"v{k}.png").text["sdcli"])
        assert (record["seed"], record["config"]["subseed"]) == (3, 10 + k)
        text = Image.open(f"v{k}.png").text["parameters"]
        assert f"Variation seed: {10 + k}, Variation seed strength: 0.3, Seed resize from: 96x48," in text


def test_cpu_variation_uses_torch_cpu_draws(run, sampled):
    run("generate", "a fox", *RENDER, "--sampler", "euler", "--seed", "3", "--subseed", "10",
        "--subseed-strength", "0.6", "-o", "c.png")
    call = sampled.calls[0]
    a, b = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (3, 10))
    assert torch.equal(call["x"], slerp(0.6, a, b).unsqueeze(0) * call["sigmas"][0])


# ----------------------------------------------------------------------------- samplers against k-diffusion

def test_euler_with_churn_and_ensd_equals_k_diffusion(run, sampled, tmp_path):
    """Euler with A1111's sigma churn: k-diffusion's loop fed NV noise, the sampler's draws from seed + ENSD. An
    eta given to Euler (which takes none) is said on stderr and changes nothing."""
    churn = dict(s_churn=2.0, s_tmin=0.5, s_tmax=8.0, s_noise=1.003)
    sampled.reference = lambda model, x, sigmas: k_euler(model, x, sigmas, philox_draws([5 + 31337]), **churn)
    result = run("generate", "a fox", *RENDER, "--sampler", "euler", "--rng", "nv", "--seed", "5", "--ensd", "31337",
                 "--s-churn", "2", "--s-tmin", "0.5", "--s-tmax", "8", "--s-noise", "1.003", "--eta", "0.5",
                 "-o", "e.png", "--latent-out", "e.safetensors")
    call = sampled.calls[0]
    assert call["options"] == churn
    assert torch.equal(call["x"], PhiloxGenerator(5).randn(SHAPE).unsqueeze(0) * call["sigmas"][0])
    assert torch.equal(call["out"], call["reference"])
    assert torch.equal(_latent(tmp_path / "e.safetensors"), call["reference"])
    assert result.stderr.count("eta 0.5 is not a parameter of sampler euler") == 1
    text = Image.open("e.png").text["parameters"]
    assert "Sigma churn: 2, Sigma tmin: 0.5, Sigma tmax: 8, Sigma noise: 1.003" in text
    assert "ENSD" not in text and "Eta" not in text  # A1111 writes ENSD only for samplers that use it, with eta


def test_euler_a_with_eta_and_ensd_equals_k_diffusion(run, sampled, tmp_path):
    draws = philox_draws([9 + 1234, 10 + 1234])
    sampled.reference = lambda model, x, sigmas: k_euler_ancestral(model, x, sigmas, draws, eta=0.6)
    run("generate", "a fox", *RENDER, "--sampler", "euler_a", "--rng", "nv", "--seed", "9", "--ensd", "1234",
        "--eta", "0.6", "-n", "2", "--batch-size", "2", "-o", "a{index}.png")
    call = sampled.calls[0]
    assert call["options"] == {"eta": 0.6}
    assert torch.equal(call["out"], call["reference"])
    assert "Eta: 0.6, ENSD: 1234," in Image.open("a0.png").text["parameters"]


def test_defaults_call_the_samplers_as_before(run, sampled):
    run("generate", "a fox", *RENDER, "--sampler", "euler_a", "--seed", "1", "-o", "d.png")
    assert sampled.calls[0]["options"] == {}
    text = Image.open("d.png").text["parameters"]
    assert "RNG: CPU," in text and not any(f in text for f in ("Eta", "ENSD", "Variation", "Sigma", "resize"))


# ----------------------------------------------------------------------------- batches, hires, img2img

@pytest.mark.parametrize("source", ["cpu", "gpu", "nv"])
def test_image_k_of_a_batch_equals_a_single_run(run, tmp_path, source):
    noise = ["--rng", source, "--seed", "21", "--subseed", "40", "--subseed-strength", "0.4", "--ensd", "77",
             "--seed-resize-from", "72x56", "--sampler", "euler_a", "--eta", "0.8"]
    run("generate", "a fox", *RENDER, *noise, "-n", "2", "--batch-size", "2", "-o", "b{index}.png",
        "--latent-out", "b{index}.safetensors")
    single = [*noise[:5], "41", *noise[6:]]  # image 1: the same seed, variation seed 40 + 1
    run("generate", "a fox", *RENDER, *single, "-o", "one.png", "--latent-out", "one.safetensors")
    assert torch.equal(_latent(tmp_path / "b1.safetensors"), _latent(tmp_path / "one.safetensors"))
    assert np.array_equal(pixels("b1.png"), pixels("one.png"))


def _noise_calls(monkeypatch):
    """(shape, first draw?, output) of every ImageNoise call."""
    calls, real = [], rng_module.ImageNoise.__call__

    def wrapper(self):
        first = not self._drawn
        out = real(self)
        calls.append((self.shape, first, out.clone()))
        return out

    monkeypatch.setattr(rng_module.ImageNoise, "__call__", wrapper)
    return calls


def test_hires_pass_starts_new_noise_for_nv_and_continues_for_cpu(run, monkeypatch):
    calls = _noise_calls(monkeypatch)
    hires = [*RENDER, "--steps", "2", "--hires-scale", "2", "--hires-steps", "1", "--sampler", "euler", "--seed", "4"]
    run("generate", "a fox", *hires, "--rng", "nv", "-o", "h.png")
    big = [(out, first) for shape, first, out in calls if shape == (4, 16, 16)]
    assert big[0][1] and torch.equal(big[0][0][0], PhiloxGenerator(4).randn((4, 16, 16)))  # A1111: a new ImageRNG
    calls.clear()
    run("generate", "a fox", *hires, "-o", "c.png")
    g = torch.Generator().manual_seed(4)
    torch.randn(SHAPE, generator=g)
    assert [first for shape, first, _ in calls] == [True, False]  # the second pass goes on drawing (sdcli's rule)
    assert torch.equal(calls[1][2][0], torch.randn((4, 16, 16), generator=g))


def test_img2img_initial_noise_has_the_variation(run, sampled, tmp_path):
    """img2img: the noise added to the encoded image is the variation's blend of Philox draws (A1111 draws it
    with ImageRNG too)."""
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "in.png")
    run("encode", "in.png", "--dtype", "fp32", "-o", "in.safetensors")
    run("img2img", "a fox", "-i", "in.png", *RENDER[:2], "--cfg", "5", "--dtype", "fp32", "--sampler", "euler",
        "--strength", "0.5", "--rng", "gpu", "--seed", "2", "--subseed", "3", "--subseed-strength", "0.5", "-o", "o.png")
    expected = slerp(0.5, PhiloxGenerator(2).randn(SHAPE), PhiloxGenerator(3).randn(SHAPE))
    call = sampled.calls[0]
    assert torch.equal(call["x"], _latent(tmp_path / "in.safetensors") + expected * call["sigmas"][0])
    assert "Variation seed: 3, Variation seed strength: 0.5" in Image.open("o.png").text["parameters"]


# ----------------------------------------------------------------------------- infotext, replay, verify

NOISE = ["--sampler", "euler_a", "--rng", "nv", "--seed", "13", "--subseed", "99", "--subseed-strength", "0.35",
         "--seed-resize-from", "80x48", "--ensd", "31337", "--eta", "0.7"]


def test_infotext_round_trip_replay_and_verify(run, tmp_path):
    run("generate", "a red fox", *RENDER, *NOISE, "-o", "a.png")
    text = Image.open("a.png").text["parameters"]
    for field in ("Seed: 13,", "Variation seed: 99,", "Variation seed strength: 0.35,", "Seed resize from: 80x48,",
                  "RNG: NV,", "Eta: 0.7,", "ENSD: 31337,"):
        assert field in text, (field, text)
    run("generate", "--from-image", "a.png", "-o", "b.png")
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    assert "ok (identical)" in run("verify", "a.png").stderr
    # the infotext alone, as A1111 would hand it over: the same pixels, without any note on the noise
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.open("a.png").save("w.png", pnginfo=info)
    replay = run("generate", "--from-image", "w.png", "--dtype", "fp32", "-o", "c.png")
    assert "different image" not in replay.stderr and "ENSD" not in replay.stderr
    assert np.array_equal(pixels("c.png"), pixels("a.png"))


A1111 = ("a castle\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, "
         "Seed: 99, Size: 64x64, Model hash: 0123456789, Model: x, Variation seed: 7, Variation seed strength: 0.25, "
         "Seed resize from: 80x48, ENSD: 31337, Eta: 0.6, Sigma churn: 0.5, RNG: NV, Version: v1.10.1")


def _a1111_png(path, text):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path, pnginfo=info)
    return path


def test_a1111_infotext_replays_its_noise_without_a_note(run, tmp_path):
    _a1111_png(tmp_path / "w.png", A1111)
    replay = run("generate", "--from-image", "w.png", "--dtype", "fp32", "-o", "r.png")
    assert not any(word in replay.stderr for word in ("different image", "RNG", "ENSD", "Brownian")), replay.stderr
    run("generate", "a castle", "--negative", "fog", "--steps", "3", "--sampler", "Euler a", "--cfg", "5",
        "--seed", "99", "-W", "64", "-H", "64", "--dtype", "fp32", "--rng", "nv", "--subseed", "7",
        "--subseed-strength", "0.25", "--seed-resize-from", "80x48", "--ensd", "31337", "--eta", "0.6", "-o", "d.png")
    assert np.array_equal(pixels("r.png"), pixels("d.png"))
    config = json.loads(Image.open("r.png").text["sdcli"])["config"]
    assert (config["rng"], config["subseed"], config["eta"], config["ensd"]) == ("nv", 7, 0.6, 31337)


def _dry_replay(run, tmp_path, text):
    result = run("generate", "--from-image", str(_a1111_png(tmp_path / "p.png", text)), "--dry-run",
                 "--json")
    return json.loads(result.stdout.splitlines()[0])["config"], result.stderr


BASE = "x\nSteps: 3, Sampler: {sampler}, CFG scale: 5, Seed: 1, Size: 64x64{more}"


def test_replay_notes_only_what_is_out_of_reach(run, tmp_path):
    config, err = _dry_replay(run, tmp_path, BASE.format(sampler="Euler a", more=""))
    assert config["rng"] == "gpu" and err.strip() == ""  # no RNG field: A1111's default, GPU
    config, err = _dry_replay(run, tmp_path, BASE.format(sampler="Euler a", more=", RNG: CPU"))
    assert config["rng"] == "cpu" and "different image" not in err
    _, err = _dry_replay(run, tmp_path, BASE.format(sampler="Euler a", more=", RNG: cuda"))
    assert "RNG: cuda, a noise source A1111 does not have" in err
    _, err = _dry_replay(run, tmp_path, BASE.format(sampler="DPM++ SDE Karras", more=", RNG: NV"))
    assert "Brownian tree" in err and "DPM++ SDE" in err
    _, err = _dry_replay(run, tmp_path, BASE.format(sampler="DPM++ 2M SDE", more=", Eta: 0"))
    assert err.strip() == ""  # eta 0: no noise at all
    config, err = _dry_replay(run, tmp_path, BASE.format(sampler="Euler", more=", Sigma churn: 1.5, Sigma tmax: 10"))
    assert (config["s_churn"], config["s_tmax"]) == (1.5, 10.0)
    assert "does not record ENSD for Euler" in err
    config, err = _dry_replay(run, tmp_path, BASE.format(sampler="DDIM", more=", Eta DDIM: 0.3, Eta: 0.9"))
    assert config["eta"] == 0.3 and "does not record ENSD for DDIM" in err


# ----------------------------------------------------------------------------- sweep

def test_sweep_axes_take_the_noise_keys():
    for spec, values in (("subseed=1-3", (1, 2, 3)), ("subseed_strength=0,0.5", (0.0, 0.5)),
                         ("seed_resize_from=512x512,768x512", ("512x512", "768x512")), ("rng=cpu,GPU,nv",
                         ("cpu", "gpu", "nv")), ("eta=0,1", (0.0, 1.0)), ("ensd=0,31337", (0, 31337))):
        assert sweep_axes.parse_axis(spec).values == values


def test_sweep_cell_equals_generate(run, tmp_path):
    run("sweep", "a fox", "--x", "rng=cpu,nv", "--y", "subseed_strength=0,0.5", *RENDER, "--sampler", "euler_a",
        "--seed", "6", "--subseed", "4", "-o", "plot.png", "--keep-cells", "cells")
    run("generate", "a fox", *RENDER, "--sampler", "euler_a", "--seed", "6", "--rng", "nv", "--subseed", "4",
        "--subseed-strength", "0.5", "-o", "g.png")
    assert np.array_equal(pixels("cells/z0-y1-x1.png"), pixels("g.png"))
    cells = json.loads((tmp_path / "plot.json").read_text())["cells"]
    command = next(c["command"] for c in cells if c["index"] == [1, 1, 0])
    assert "--rng nv" in command and "--subseed 4" in command and "--subseed-strength 0.5" in command


def test_skip_existing_knows_the_images_of_a_variation_batch(run):
    """--skip-existing matches each image's record: its own variation seed, the noise keys (recorded only when
    set) and the defaults of a plain render."""
    args = ["a fox", *RENDER, "--sampler", "euler_a", "--rng", "nv", "--seed", "2", "--subseed", "5",
            "--subseed-strength", "0.3", "-n", "2", "-o", "s{index}.png"]
    run("generate", *args)
    assert "nothing to render" in run("generate", *args, "--skip-existing").stderr
    run("generate", "a fox", *RENDER, "--seed", "2", "-o", "plain.png")
    assert "nothing to render" in run("generate", "a fox", *RENDER, "--seed", "2", "-o", "plain.png",
                                      "--skip-existing").stderr
    assert "rng" not in json.loads(Image.open("plain.png").text["sdcli"])["config"]  # sparse: a default is left out


@pytest.mark.parametrize("sampler", sorted(samplers_module.SAMPLERS))
def test_sampler_fields_round_trip_for_every_sampler(sampler):
    """What the infotext writes for a sampler reads back to the same parameters; a parameter it does not take is
    neither written nor passed, and is the one reported as unused."""
    churn = {"s_churn": 1.5, "s_tmin": 0.2, "s_tmax": 9.0, "s_noise": 1.01}
    row = a1111_params.row_of(sampler)
    fields = a1111_params.infotext_fields(sampler, 0.4, churn, 31337)
    back = a1111_params.from_infotext(sampler, fields)
    options = a1111_params.sampler_options(sampler, 0.4, **churn)
    takes_eta = row is not None and row.eta is not None
    assert (back.get("eta") == 0.4) == takes_eta == ("eta" in options)
    assert all((back.get(k) == v) == bool(row and row.churn) for k, v in churn.items())
    assert set(options) - {"eta"} == (set(churn) if row and row.churn else set())
    assert ("ENSD" in fields) == bool(row and row.uses_ensd)
    assert set(a1111_params.unused(sampler, 0.4, churn)) == {"eta", *churn} - set(options)
    assert a1111_params.sampler_options(sampler, None) == {}  # defaults: the function's own


def test_inpaint_latent_noise_fill_draws_from_the_source(run, sampled, tmp_path):
    """A1111's "latent noise" masked content comes from create_random_tensors, i.e. the run's source: with the
    whole image repainted the start is that Philox draw, and the initial noise (the seed's first draw) is too."""
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "mask.png")
    run("img2img", "a fox", "-i", "in.png", "--mask", "mask.png", "--mask-blur", "0", "--inpaint-fill",
        "latent-noise", "--steps", "3", "--cfg", "5", "--dtype", "fp32", "--sampler", "euler", "--strength", "0.6",
        "--rng", "nv", "--seed", "8", "-o", "p.png")
    call, drawn = sampled.calls[0], PhiloxGenerator(8).randn(SHAPE).unsqueeze(0)
    assert torch.equal(call["x"], drawn + drawn * call["sigmas"][0])
