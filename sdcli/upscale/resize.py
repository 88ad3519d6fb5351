"""A1111's resize of a decoded image to the hires fix's second-pass size, with a named upscaler: the pixel half
of "Hires. fix" with any upscaler that is not a latent mode.

A1111 modules/images.py ``resize_image(0, im, width, height, upscaler_name)`` (resize mode 0, "just resize"):
- upscaler "None" (or a grayscale image): one Lanczos resize to (width, height);
- otherwise, with scale = max(width / w, height / h) > 1, ``Upscaler.upscale(im, scale)`` (modules/upscaler.py):
  the destination is the scaled size floored to a multiple of 8, ``int((w * scale) // 8 * 8)``; the upscaler runs
  (a model: at most 3 times, until the image reaches it; Lanczos / Nearest: one resize by `scale`), then one
  Lanczos resize to the destination where it differs;
- then one more Lanczos resize to exactly (width, height) where the image is not that size yet.
The model passes are ``tiled.upscale_pil`` (RGB in, as the models were trained; A1111 flips to BGR).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdcli.upscale.names import UpscalerChoice
from sdcli.upscale.tiled import DEFAULT_OVERLAP, DEFAULT_TILE, upscale_pil

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


@dataclass(frozen=True)
class HiresUpscaler:
    """The hires fix's upscaler: what it is, and the loaded network when it is a model (files.Upscaler)."""

    choice: UpscalerChoice
    model: Any = None
    tile: int | None = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP

    @property
    def in_pixels(self) -> bool:
        """Whether it works on the decoded image (anything but a latent mode)."""
        return self.choice.kind != "latent"

    def resize(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        """`img` brought to `size` (width, height) as A1111's resize_image(0, ...) does with this upscaler."""
        return resize_image(img, size, self.choice, self.model, self.tile, self.overlap)


def resize_image(img: Image.Image, size: tuple[int, int], choice: UpscalerChoice, model: Any = None,
                 tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """A1111 images.resize_image(0, img, w, h, choice.name): see the module's docstring."""
    w, h = size
    if choice.mode == "none" or img.mode == "L":
        return img.resize((w, h), resample=LANCZOS)
    scale = max(w / img.width, h / img.height)
    if scale > 1.0:
        img = upscale_by(img, scale, choice, model, tile, overlap)
    if img.size != (w, h):
        img = img.resize((w, h), resample=LANCZOS)
    return img


def upscale_by(img: Image.Image, scale: float, choice: UpscalerChoice, model: Any = None,
               tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Image.Image:
    """A1111 Upscaler.upscale(img, scale): to the scaled size floored to a multiple of 8."""
    dest = (int((img.width * scale) // 8 * 8), int((img.height * scale) // 8 * 8))
    if choice.kind == "model":
        return upscale_pil(img, model, tile=tile, overlap=overlap, size=dest)  # passes until dest, then Lanczos
    if choice.kind != "resize":
        raise ValueError(f"{choice.name} is a latent upscaler: it resizes latents, not images")
    if choice.mode != "none":  # UpscalerNone.do_upscale returns the image as it is
        resample = LANCZOS if choice.mode == "lanczos" else NEAREST
        img = img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)  # do_upscale
    return img if img.size == dest else img.resize(dest, resample=LANCZOS)
