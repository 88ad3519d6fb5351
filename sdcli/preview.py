"""Live preview: the sampler's current estimate of the image, written to a PNG while the render runs.

A full VAE decode per step would cost as much as a UNet step on a CPU, so the preview is A1111's "Approx cheap":
a fixed linear map from the latent channels to RGB, at 1/8 of the size and scaled up bilinearly. The factors are
the model family's (``LatentSpec.rgb_factors``, families/); for SD 1.x/2.x they are what A1111's
``sd_vae_approx.cheap_approximation`` uses.

Writes are atomic (an image viewer never sees half a file) and at most every `interval` seconds, plus the last
step, so that a fast GPU is not slowed down by PNG encoding."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import OutputError
from .families import DEFAULT


def cheap_rgb(latent: torch.Tensor, rgb_factors=DEFAULT.latent.rgb_factors) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> a rough image (B, 3, h, w) in [-1, 1]; `rgb_factors` (C, 3)."""
    factors = torch.tensor(rgb_factors, device=latent.device)
    rgb = torch.einsum("bchw,cr->brhw", latent.float(), factors)
    return rgb.clamp(-1, 1)


class PreviewWriter:
    """A sampler callback (step, total, x, denoised) that keeps `path` showing image 0's current estimate."""

    def __init__(self, path: str | Path, interval: float = 0.5, rgb_factors=DEFAULT.latent.rgb_factors,
                 downscale: int = DEFAULT.latent.downscale):
        self.path, self.interval = Path(path), interval
        self.rgb_factors, self.downscale = rgb_factors, downscale
        self.last = -float("inf")
        self.failed = False

    def __call__(self, i: int, total: int, _x: torch.Tensor, denoised: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.failed or (now - self.last < self.interval and i + 1 < total):
            return
        self.last = now
        try:
            self.write(denoised[:1])
        except OutputError as e:  # a preview is a convenience: the render goes on without it
            from . import console

            self.failed = True
            console.info(f"preview off: {e}")

    def write(self, latent: torch.Tensor) -> None:
        from PIL import Image

        from .images import tensor_to_pil
        from .outputs import atomic_write_bytes

        _, _, h, w = latent.shape
        rgb = cheap_rgb(latent.cpu(), self.rgb_factors)[0]
        img = tensor_to_pil(rgb).resize((w * self.downscale, h * self.downscale), Image.BILINEAR)
        atomic_write_bytes(self.path, _png_bytes(img), overwrite=True)


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: it is rewritten while the render runs
    return buf.getvalue()
