"""Turbo and few-step models: cfg at or below 1 runs the conditional pass alone (diffusers'
`do_classifier_free_guidance = guidance_scale > 1`), on the trailing schedule, equal to diffusers'
StableDiffusionPipeline with EulerAncestralDiscreteScheduler(timestep_spacing="trailing") on the tiny SD1 model;
and the sdxl-turbo preset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers, tiny_sd2, tiny_sd2_diffusers  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread, sd1_models, sd2_models  # noqa: F401
from test_pipeline_oracle import (SD, SIZE, FinalLatents, assert_latents_close, assert_pixels_close,  # noqa: F401
                                  diffusers_parts, first_draws, pixels)
from sdcli import pipeline as P
from sdcli.text import prompts
from sdcli.app import render
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.jobs import single_job

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, 4k", "blurry, low quality"
STEPS = 4
REPO = Path(__file__).resolve().parents[1]


def turbo_config(cfg_scale: float) -> RunConfig:
    return dataclasses.replace(RunConfig(), sampler="euler_a", schedule="trailing", steps=STEPS, cfg=cfg_scale,
                               negative=NEGATIVE, width=SIZE, height=SIZE, seed=0)


class UNetCalls:
    """Rows handed to the UNet per sampler evaluation (2 with CFG's [uncond; cond], 1 without)."""

    def __init__(self, monkeypatch):
        self.rows: list[int] = []
        call = P._UNetAdapter.__call__

        def counted(adapter, x, *args, **kwargs):
            self.rows.append(x.shape[0])
            return call(adapter, x, *args, **kwargs)

        monkeypatch.setattr(P._UNetAdapter, "__call__", counted)


@pytest.fixture
def encoded_texts(monkeypatch) -> list[str]:
    """Every text the prompt encoder sees."""
    seen, encode = [], prompts.encode_prompt

    def recording(text, *args, **kwargs):
        seen.append(text)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(prompts, "encode_prompt", recording)
    return seen


def ours(models, cfg_scale: float, seed: int):
    cfg = turbo_config(cfg_scale)
    p = render.prepare(models, cfg, single_job(PROMPT, cfg))
    latents = render.txt2img_passes(models, p.plan, p.cond, p.uncond, [seed], p.size, None)
    return p.plan, latents


def diffusers_turbo(parts, plan, seed: int, guidance: float):
    sched = EulerAncestralDiscreteScheduler(**SD, prediction_type="epsilon", timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(**parts["sd1"], scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(STEPS)
    assert pipe.scheduler.timesteps.long().tolist() == [999, 749, 499, 249]
    torch.testing.assert_close(plan.sigmas, pipe.scheduler.sigmas.float(), rtol=1e-6, atol=0)
    gens, noise = first_draws([seed])
    final = FinalLatents()
    out = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, guidance_scale=guidance,
               num_inference_steps=STEPS, latents=noise * float(plan.sigmas[0]) / pipe.scheduler.init_noise_sigma,
               generator=gens[0], output_type="pil", callback_on_step_end=final)
    return final.latents, [np.asarray(im) for im in out.images]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cfg_at_or_below_one_matches_diffusers_without_guidance(cfg_scale, diffusers_parts, sd1_models,
                                                                monkeypatch, encoded_texts):
    calls = UNetCalls(monkeypatch)
    plan, latents = ours(sd1_models, cfg_scale, seed=31)
    assert calls.rows == [1] * STEPS  # one UNet call per step, the conditional one
    assert NEGATIVE not in encoded_texts and PROMPT in encoded_texts  # the negative prompt is never encoded
    ref_latents, ref_images = diffusers_turbo(diffusers_parts, plan, 31, guidance=cfg_scale)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(sd1_models, latents), ref_images)


def test_cfg_above_one_still_guides(sd1_models, monkeypatch, encoded_texts):
    calls = UNetCalls(monkeypatch)
    _, guided = ours(sd1_models, 1.5, seed=31)
    assert calls.rows == [2] * STEPS and NEGATIVE in encoded_texts
    _, plain = ours(sd1_models, 1.0, seed=31)
    assert (guided - plain).abs().max() > 1e-3  # the negative prompt matters above 1


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str, expect: int = 0):
        result = runner.invoke(app, ["generate", *args])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def test_cfg_zero_and_one_give_the_same_png_through_the_command(cli, tiny_sd1, monkeypatch):  # noqa: F811
    calls = UNetCalls(monkeypatch)
    common = ["a fox", "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "-W", "64", "-H", "64",
              "--sampler", "euler_a", "--schedule", "trailing", "--steps", "4", "--seed", "5", "--negative", "blurry"]
    cli(*common, "--cfg", "0", "-o", "zero.png")
    cli(*common, "--cfg", "1", "-o", "one.png")
    assert calls.rows == [1] * 8
    zero, one = (np.asarray(Image.open(name).convert("RGB")) for name in ("zero.png", "one.png"))
    assert np.array_equal(zero, one)
    text = Image.open("zero.png").text["parameters"]
    assert "Sampler: Euler a, Schedule type: Trailing, CFG scale: 0, " in text


def test_sdxl_turbo_preset_loads_and_validates(cli):
    preset = REPO / "configs" / "sdxl-turbo.yaml"
    assert yaml.safe_load(preset.read_text()) == {"sampler": "euler_a", "schedule": "trailing", "steps": 1,
                                                  "cfg": 0.0, "width": 512, "height": 512}
    shown = yaml.safe_load(cli("--config", str(preset), "--print-config").stdout)
    assert (shown["sampler"], shown["schedule"], shown["steps"], shown["cfg"]) == ("euler_a", "trailing", 1, 0.0)
    assert (shown["width"], shown["height"]) == (512, 512)
    plan = P.make_plan(shown["sampler"], shown["schedule"], shown["steps"], cfg=shown["cfg"])
    assert plan.sigmas.tolist() == pytest.approx([14.6146, 0.0], rel=1e-4)  # one step from t = 999
