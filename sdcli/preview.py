"""Live preview: the sampler's current estimate of the image, written to a PNG while the render runs.

A full VAE decode per step would cost as much as a UNet step on a CPU, so the preview is A1111's "Approx cheap":
a fixed linear map from the 4 latent channels to RGB (SD 1.x/2.x share the VAE latent space), at 1/8 of the
size and scaled up bilinearly. The coefficients were fitted by a community member
(https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2) and are what A1111's
``sd_vae_approx.cheap_approximation`` uses for SD 1.x.

Writes are atomic (an image viewer never sees half a file) and at most every `interval` seconds, plus the last
step, so that a fast GPU is not slowed down by PNG encoding."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .errors import OutputError

LATENT_TO_RGB = torch.tensor([  # (4 latent channels, 3 colours), on the scaled latent
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])  # fmt: skip


def cheap_rgb(latent: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> a rough image (B, 3, h, w) in [-1, 1]."""
    rgb = torch.einsum("bchw,cr->brhw", latent.float(), LATENT_TO_RGB.to(latent.device))
    return rgb.clamp(-1, 1)


class PreviewWriter:
    """A sampler callback (step, total, x, denoised) that keeps `path` showing image 0's current estimate."""

    def __init__(self, path: str | Path, interval: float = 0.5):
        self.path, self.interval = Path(path), interval
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
        img = tensor_to_pil(cheap_rgb(latent.cpu())[0]).resize((w * 8, h * 8), Image.BILINEAR)
        atomic_write_bytes(self.path, _png_bytes(img), overwrite=True)


def _png_bytes(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: it is rewritten while the render runs
    return buf.getvalue()
