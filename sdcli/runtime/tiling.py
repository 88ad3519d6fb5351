"""Tiled decoding: run a latent->image function on overlapping tiles and blend them with linear ramps.

Used when a whole-image VAE decode runs out of memory. Each tile sees `overlap` latent pixels of context on the
sides it shares with a neighbour, and the blend weights ramp linearly across that band, so seams do not show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

TILING_MODES = ("auto", "on", "off")
LATENT_SCALE = 8  # pixels per latent pixel a side of every VAE sdcli reads (SD, SDXL, SD3, FLUX, TAESD)


@dataclass(frozen=True)
class VaeTiling:
    """How a VAE decode is tiled (config keys vae_tiling, vae_tile_size): `auto` decodes whole and tiles only as the
    retry of a decode that ran out of memory; `on` always tiles (bounded memory; the blended seams move pixels a
    little); `off` never (out of memory is an error). `tile_px`: a tile's side in image pixels."""

    mode: str = "auto"
    tile_px: int = 512

    @property
    def tile(self) -> int:
        """The side in latent pixels (64 at the default 512 px, the out-of-memory retry's tile before the option)."""
        return max(1, self.tile_px // LATENT_SCALE)

    @property
    def overlap(self) -> int:
        """A quarter of the tile (16 latent pixels at 64: the retry's overlap before the option)."""
        return self.tile // 4


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile` overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, band: int, ramp_in: bool, ramp_out: bool) -> torch.Tensor:
    """1-D blend weights: rise over `band` at the start and fall over `band` at the end where a neighbour is."""
    w = torch.ones(length)
    edge = (torch.arange(band, dtype=torch.float32) + 0.5) / band
    if ramp_in and band:
        w[:band] = edge
    if ramp_out and band:
        w[length - band:] = edge.flip(0)
    return w


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int = 64,
                 overlap: int = 16) -> torch.Tensor:
    """z (B,C,h,w) -> decode(z) computed tile by tile; `decode` maps (B,C,th,tw) -> (B,3,th*s,tw*s)."""
    _, _, h, w = z.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for y in ys:
        for x in xs:
            piece = decode(z[..., y:y + tile, x:x + tile]).float()  # (B, 3, th*s, tw*s)
            s = piece.shape[-1] // min(tile, w)
            if out is None:
                out = torch.zeros(*piece.shape[:2], h * s, w * s)
                weight = torch.zeros(h * s, w * s)
            wy = _ramp(piece.shape[-2], overlap * s, y > 0, y != ys[-1])
            wx = _ramp(piece.shape[-1], overlap * s, x > 0, x != xs[-1])
            mask = wy[:, None] * wx[None, :]
            out[..., y * s:y * s + piece.shape[-2], x * s:x * s + piece.shape[-1]] += piece.cpu() * mask
            weight[y * s:y * s + piece.shape[-2], x * s:x * s + piece.shape[-1]] += mask
    return (out / weight).to(z.device)
