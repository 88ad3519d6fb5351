"""Token merging (models/tome.py) equals tomesd's own patch as A1111 applies it (use_rand=False, max_downsample 1,
2x2 strides, self-attention only) on the same weights, and ratio 0 is the untouched UNet bit for bit."""

from __future__ import annotations

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
import tomesd  # the oracle: A1111 applies this package's patch (test-only dependency, pyproject's dev extra)
from diffusers import UNet2DConditionModel

from sdcli.loading.checkpoint import load_models
from sdcli.models.tome import merge_plan, set_token_merging


def _inputs(h: int, w: int, context_dim: int, batch: int = 2):
    g = torch.Generator().manual_seed(h * 100 + w)
    return (torch.randn(batch, 4, h, w, generator=g), torch.tensor([999.0, 250.0][:batch]),
            torch.randn(batch, 77, context_dim, generator=g))


@pytest.fixture(scope="module")
def pair(tiny_sd1, tiny_sd1_diffusers):  # noqa: F811
    ours = load_models(tiny_sd1, dtype=torch.float32, device="cpu").unet
    theirs = UNet2DConditionModel.from_pretrained(tiny_sd1_diffusers / "unet").eval()
    return ours, theirs


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("size", [(16, 16), (13, 10), (9, 14)])
def test_unet_equals_tomesd(pair, ratio, size):
    ours, theirs = pair
    x, t, ctx = _inputs(*size, ours.config.context_dim)
    with torch.no_grad():
        tomesd.apply_patch(theirs, ratio=ratio, use_rand=False, merge_attn=True, merge_crossattn=False,
                           merge_mlp=False, max_downsample=1, sx=2, sy=2)
        try:
            ref = theirs(x, t, encoder_hidden_states=ctx).sample
        finally:
            tomesd.remove_patch(theirs)
        plain = theirs(x, t, encoder_hidden_states=ctx).sample
        set_token_merging(ours, ratio)
        try:
            out = ours(x, t, ctx)
        finally:
            set_token_merging(ours, 0)
    # tokens merge in another order than tomesd's (its argsort of ties is not stable): attention sums the same
    # terms in another order, so fp32 rounding, not a different merge
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (ref - plain).abs().max() > 1e-3 * plain.abs().max()  # merging did change the output


def test_ratio_zero_is_the_untouched_unet(pair):
    ours, _ = pair
    x, t, ctx = _inputs(16, 16, ours.config.context_dim)
    with torch.no_grad():
        before = ours(x, t, ctx)
        set_token_merging(ours, 0.5)
        ours(x, t, ctx)
        set_token_merging(ours, 0.0)
        after = ours(x, t, ctx)
    assert torch.equal(before, after) and not ours._forward_pre_hooks


def test_merge_then_unmerge_is_exact_on_merged_means():
    """Independent check of the matching: with tokens that are exact copies inside each 2x2 cell, merging loses
    nothing, so unmerge(merge(x)) == x; and merge averages (mean of the destination and its sources)."""
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(1, 4 * 4, 8, generator=g)  # a 4x4 grid of cells, each one token value
    grid = cells.view(1, 4, 4, 8).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(1, 64, 8)
    merge, unmerge = merge_plan(grid, 8, 8, 2, 2, r=48)  # every source merges into its own cell's destination
    merged = merge(grid)
    assert merged.shape == (1, 16, 8)
    assert torch.allclose(unmerge(merged), grid, atol=1e-6)
    noisy = grid + 0.01 * torch.randn(grid.shape, generator=g)
    m, _ = merge_plan(noisy, 8, 8, 2, 2, r=48)
    cell_means = noisy.view(1, 4, 2, 4, 2, 8).mean(dim=(2, 4)).reshape(1, 16, 8)
    assert torch.allclose(m(noisy), cell_means, atol=1e-6)


def test_cli_records_and_replays_token_merging(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    from _cli import invoker, pixels

    from sdcli.output.metadata import read_image_metadata

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    render = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "-W", "64", "-H", "64",
              "--seed", "5", "--sampler", "euler"]
    run = invoker({"generate": render})
    run("generate", "a fox", "-o", "plain.png")
    run("generate", "a fox", "-o", "tome.png", "--tome-ratio", "0.5", "--hires-scale", "1.5", "--hires-steps", "1",
        "--tome-ratio-hr", "0.3")
    meta = read_image_metadata(tmp_path / "tome.png")
    extra = meta["parameters"]["extra"]
    assert float(extra["Token merging ratio"]) == 0.5 and float(extra["Token merging ratio hr"]) == 0.3
    assert meta["sdcli"]["config"]["tome_ratio"] == 0.5
    plain = read_image_metadata(tmp_path / "plain.png")
    assert "Token merging ratio" not in plain["parameters"].get("extra", {}) and "tome_ratio" not in plain["sdcli"]["config"]
    run("generate", "--from-image", "tome.png", "-m", str(tiny_sd1), "-o", "again.png")
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "tome.png").read_bytes()
    run("generate", "a fox", "-o", "small.png", "--tome-ratio", "0.5")
    assert (pixels(tmp_path / "small.png") != pixels(tmp_path / "plain.png")).any()
