"""Tiled decoding equals whole decoding for a local (pointwise-upsampling) decoder, and covers every pixel."""

import pytest
import torch

from sdcli.runtime.tiling import decode_tiled, tile_starts


def _upsample(z: torch.Tensor) -> torch.Tensor:
    # A decoder with no spatial context: each latent pixel becomes an 8x8 block of 3 channels.
    rgb = z[:, :3] * 0.5 + z[:, 3:4]
    return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")


@pytest.mark.parametrize("h, w", [(20, 20), (64, 96), (100, 37), (16, 16)])
def test_tiled_equals_whole(h, w):
    z = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    whole = _upsample(z)
    tiled = decode_tiled(_upsample, z, tile=16, overlap=4)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_tile_starts_cover_with_overlap():
    for size in range(1, 200, 7):
        starts = tile_starts(size, 32, 8)
        assert starts[0] == 0 and starts[-1] + min(32, size) == size
        assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))
