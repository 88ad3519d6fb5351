"""Live preview: the sampler's current estimate of the image, written to a PNG while the render runs.

With a TAESD decoder (--preview-vae, or the family's taesd file in vae_dir) the estimate is decoded by it: a real
picture at full size for a few percent of a step. Otherwise:
a full VAE decode per step would cost as much as a UNet step on a CPU, so the preview is A1111's "Approx cheap":
a fixed linear map from the latent channels to RGB, at 1/8 of the size and scaled up bilinearly. The factors are
the model family's (``LatentSpec.rgb_factors``, families/); for SD 1.x/2.x they are what A1111's
``sd_vae_approx.cheap_approximation`` uses.

Writes are atomic (an image viewer never sees half a file) and at most every `interval` seconds (--preview-interval),
plus the last step, so that a fast GPU is not slowed down by PNG encoding. Each file carries the PREVIEW_KEY text
chunk (output/metadata.py): a later run replaces its own scratch file without --overwrite, and nothing else."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sdcli.runtime.errors import OutputError
from sdcli.families import DEFAULT


def cheap_rgb(latent: torch.Tensor, rgb_factors=DEFAULT.latent.rgb_factors, bias=None) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> a rough image (B, 3, h, w) in [-1, 1]; `rgb_factors` (C, 3), `bias` (3,)
    added after (ComfyUI's latent_rgb_factors_bias of the 16-channel spaces)."""
    factors = torch.tensor(rgb_factors, device=latent.device)
    rgb = torch.einsum("bchw,cr->brhw", latent.float(), factors)
    if bias is not None and any(bias):
        rgb = rgb + torch.tensor(bias, device=latent.device).view(1, 3, 1, 1)
    return rgb.clamp(-1, 1)


class PreviewWriter:
    """A sampler callback (step, total, x, denoised) that keeps `path` showing image 0's current estimate."""

    def __init__(self, path: str | Path, interval: float = 0.5, rgb_factors=DEFAULT.latent.rgb_factors,
                 downscale: int = DEFAULT.latent.downscale, decoder=None, rgb_bias=None):
        self.path, self.interval = Path(path), interval
        self.decoder = decoder  # a TAESD (models/taesd.py): a real picture of the estimate, on scaled latents
        self.rgb_factors, self.downscale, self.rgb_bias = rgb_factors, downscale, rgb_bias
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
            from sdcli.runtime import console

            self.failed = True
            console.info(f"preview off: {e}")

    def write(self, latent: torch.Tensor) -> None:
        from PIL import Image

        from sdcli.formats.images import tensor_to_pil
        from sdcli.output.targets import atomic_write_bytes

        _, _, h, w = latent.shape
        if self.decoder is not None:
            with torch.inference_mode():
                img = tensor_to_pil(self.decoder.decode(latent).float().cpu()[0])  # clamped to [-1, 1] there
        else:
            rgb = cheap_rgb(latent.cpu(), self.rgb_factors, self.rgb_bias)[0]
            img = tensor_to_pil(rgb).resize((w * self.downscale, h * self.downscale), Image.BILINEAR)
        atomic_write_bytes(self.path, _png_bytes(img), overwrite=True)


def _png_bytes(img) -> bytes:
    import io

    from PIL.PngImagePlugin import PngInfo

    from sdcli.output.metadata import PREVIEW_KEY

    info = PngInfo()
    info.add_text(PREVIEW_KEY, "1")  # the mark that lets the next run replace this file without --overwrite
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1, pnginfo=info)  # fast: it is rewritten while the render runs
    return buf.getvalue()
