"""Image sides that are multiples of 8 but not of 64 (issue 12 item 5): latents with odd sides.

A stride-2 convolution rounds an odd side up (9 -> 5) and a plain x2 upsample then overshoots the skip
connection (5 -> 10 against 9). diffusers (forward_upsample_size) and A1111 upsample to the skip's size; so do
we. Checked against diffusers' UNet2DConditionModel on the same random weights, and through the real
`generate` command against diffusers' StableDiffusionPipeline (latents, Euler on our sigmas).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers, tiny_sd2, tiny_sd2_diffusers  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from make_checkpoint import unet_diffusers_config
from PIL import Image
from safetensors.torch import load_file
from test_pipeline_oracle import CFG, NEGATIVE, PROMPT, Case, FinalLatents, diffusers_parts, make_pipe  # noqa: F401
from typer.testing import CliRunner

from sdcli import pipeline as P
from sdcli.loading.checkpoint import load_models
from sdcli.cli import app
from sdcli.output.latents import load_latent

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("hw", [(9, 8), (8, 9), (7, 13), (54, 12)])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_runs_odd_latent_sides_as_diffusers(request, family, hw):
    path = request.getfixturevalue(f"tiny_{family}")
    models = load_models(path)
    config = unet_diffusers_config(models.unet.config, family)
    ref = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    ref.load_state_dict(convert_ldm_unet_checkpoint(load_file(path), config), strict=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([999.0, 31.5])
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        ours, theirs = models.unet(x, t, ctx), ref.eval()(x, t, encoder_hidden_states=ctx).sample
    assert ours.shape == theirs.shape == x.shape
    assert theirs.abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * float(theirs.abs().max()))


def test_even_sizes_are_unchanged_by_the_resize(tiny_sd1):  # noqa: F811
    """An exact x2 `size` picks the same nearest pixels as scale_factor=2: even sides are bit-identical."""
    from sdcli.models.unet import Upsample

    up = Upsample(32)
    x = torch.randn(1, 32, 4, 6)
    assert torch.equal(up(x), up(x, (8, 12)))
    assert up(torch.randn(1, 32, 5, 4), (9, 8)).shape == (1, 32, 9, 8)


def test_generate_72x64_equals_diffusers_pipeline(tiny_sd1, diffusers_parts, tmp_path, monkeypatch):  # noqa: F811
    """`generate -W 72 -H 64` renders (it crashed in the UNet before) and its latents are diffusers'."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    seed, steps, (width, height) = 77, 4, (72, 64)
    result = CliRunner().invoke(app, [
        "generate", PROMPT, "--negative", NEGATIVE, "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32",
        "-W", str(width), "-H", str(height), "--steps", str(steps), "--sampler", "euler", "--schedule", "normal",
        "--cfg", str(CFG), "--seed", str(seed), "-o", "out.png", "--latent-out", "out.safetensors"])  # fmt: skip
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert Image.open(tmp_path / "out.png").size == (width, height)
    ours = load_latent(tmp_path / "out.safetensors").unet_space()
    assert ours.shape == (1, 4, height // 8, width // 8)

    plan = P.make_plan("euler", "normal", steps, cfg=CFG)
    pipe = make_pipe(diffusers_parts, Case("sd1", "euler", "normal", steps))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 4, height // 8, width // 8), generator=gen)  # our first draw, as in the oracle test
    pipe.scheduler.set_timesteps(sigmas=plan.sigmas.tolist())
    final = FinalLatents()
    pipe(PROMPT, negative_prompt=NEGATIVE, height=height, width=width, guidance_scale=CFG, generator=gen,
         latents=noise * plan.sigmas[0] / pipe.scheduler.init_noise_sigma, sigmas=plan.sigmas.tolist(),
         output_type="latent", callback_on_step_end=final)  # fmt: skip
    ref = final.latents
    assert torch.isfinite(ref).all() and ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5 * max(1.0, float(ref.abs().max())))
    assert len(np.unique(np.asarray(Image.open(tmp_path / "out.png")))) > 16
