"""Images in and out: tensor <-> PIL conversions and a forgiving, safe image loader.

Conversions match diffusers' VaeImageProcessor exactly (so pipeline tests can compare pixels):
https://github.com/huggingface/diffusers/blob/main/src/diffusers/image_processor.py
  postprocess: (x * 0.5 + 0.5).clamp(0, 1) -> float32 -> (* 255).round() -> uint8   (round = half to even)
  preprocess:  uint8 / 255.0 (float32) -> 2 * x - 1
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sdcli.runtime.errors import BadInputError, NumericalError
from sdcli.formats.inputs import read_input

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as A1111 does for img2img
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) float in [-1, 1] -> RGB uint8 image; NumericalError on NaN/Inf."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"tensor_to_pil expects (3, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise NumericalError("the decoded image holds NaN or Inf values; refusing to save it")
    # Same op order and dtypes as diffusers: denormalise in the input dtype, then float32 *255 and round.
    x = (x.detach() * 0.5 + 0.5).clamp(0, 1).float().cpu()
    arr = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (H, W, 3)
    return Image.fromarray(arr, mode="RGB")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img).astype(np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)
    return 2.0 * x - 1.0


def _read_source(path: str | Path) -> tuple[str, bytes]:
    return read_input(path, "an image")


def _open_checked(name: str, data: bytes, max_pixels: int | None) -> Image.Image:
    """Open and fully decode the first frame; every decoder failure becomes a BadInputError naming the file."""
    if not data:
        raise BadInputError(f"{name}: empty file")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():  # PIL warns on stderr past its limit; the size is refused just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
        if limit and w * h > limit:
            raise BadInputError(f"{name}: {w}x{h} pixels is over the {limit:,}-pixel limit "
                                "(a decompression bomb?)")
        img.seek(0)
        img.load()
    except UnidentifiedImageError as exc:
        raise BadInputError(f"{name}: not an image file (starts with {data[:8]!r})") from exc
    except Image.DecompressionBombError as exc:  # PIL's own check, at twice Image.MAX_IMAGE_PIXELS
        raise BadInputError(f"{name}: over the pixel limit (a decompression bomb?): {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise BadInputError(f"{name}: cannot decode image ({exc})") from exc
    return img


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode -> RGB; alpha composited on white, 16-bit scaled to 8-bit; each change noted."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit PNGs arrive as I;16 or I; 65535 / 257 = 255 maps the range exactly.
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
        notes.append(f"16-bit image ({mode}) reduced to 8 bits")
    elif mode == "F":
        img = Image.fromarray(np.clip(np.round(np.asarray(img)), 0, 255).astype(np.uint8), mode="L")
        notes.append("floating-point image clipped to 0..255")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema() != (255, 255):
            notes.append("transparency composited on a white background")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    elif img.mode == "CMYK":
        notes.append("CMYK image converted to RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _center_crop(img: Image.Image, multiple: int, notes: list[str]) -> Image.Image:
    """Crop equally from both sides down to a multiple of `multiple` (the VAE downsamples by 8)."""
    w, h = img.size
    cw, ch = w - w % multiple, h - h % multiple
    if cw == 0 or ch == 0:
        raise BadInputError(f"image is {w}x{h}: smaller than {multiple} pixels on a side")
    if (cw, ch) == (w, h):
        return img
    left, top = (w - cw) // 2, (h - ch) // 2
    notes.append(f"size {w}x{h} is not a multiple of {multiple}: centre-cropped to {cw}x{ch}")
    return img.crop((left, top, left + cw, top + ch))


def crop_to_multiple(img: Image.Image, multiple: int) -> tuple[Image.Image, list[str]]:
    """(the image centre-cropped to sides that are multiples of `multiple`, notes saying so when it was)."""
    notes: list[str] = []
    return _center_crop(img, multiple, notes), notes


def load_image(path: str | Path, multiple: int = 8, max_pixels: int | None = None
               ) -> tuple[Image.Image, list[str]]:
    """Read any image as RGB with a size that is a multiple of `multiple`.

    Returns (image, notes): notes say what was changed (frame chosen, rotation, alpha, 16-bit, crop), for
    the CLI to print. `max_pixels` defaults to PIL's Image.MAX_IMAGE_PIXELS; 0 disables the check."""
    name, data = _read_source(path)
    img = _open_checked(name, data, max_pixels)
    notes: list[str] = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"multi-frame image ({frames} frames): used the first frame")
    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    try:
        img = _to_rgb(img, notes)
    except _DECODE_ERRORS as exc:
        raise BadInputError(f"{name}: cannot convert image mode {img.mode} to RGB ({exc})") from exc
    try:
        img = _center_crop(img, multiple, notes)
    except BadInputError as exc:
        raise BadInputError(f"{name}: {exc}") from exc
    return img.copy(), notes


def load_image_as_is(path: str | Path, max_pixels: int | None = None, data: bytes | None = None
                     ) -> tuple[Image.Image, list[str]]:
    """Read any image keeping its mode (gray, alpha: what an upscaler keeps), as load_image reads it otherwise:
    the first frame, EXIF orientation applied; 16-bit and float images reduced to 8-bit gray (noted). `data`:
    the file's bytes when they were read already (stdin can be read once)."""
    name, data = _read_source(path) if data is None else (str(path), data)
    img = _open_checked(name, data, max_pixels)
    notes: list[str] = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"multi-frame image ({frames} frames): used the first frame")
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        try:
            img = _to_rgb(img, notes).convert("L")  # the exact 8-bit reduction, then back to one channel
        except _DECODE_ERRORS as exc:
            raise BadInputError(f"{name}: cannot convert image mode {img.mode} to 8 bits ({exc})") from exc
    return img.copy(), notes


def load_mask(path: str | Path, size: tuple[int, int], max_pixels: int | None = None
              ) -> tuple[torch.Tensor, list[str]]:
    """An inpainting mask as (1, 1, H, W) float32 of 0/1 for an image of `size` = (width, height).

    White (>= 0.5 after /255) = repaint, black = keep: the A1111 / diffusers convention. As diffusers'
    mask processor (VaeImageProcessor(do_binarize=True, do_convert_grayscale=True), image_processor.py
    `preprocess` + `binarize`): any mode -> L (ITU-R 601 luma), then x / 255 binarised at 0.5. A mask of another
    size is resized to the image's (noted)."""
    img, notes = load_mask_image(path, size, max_pixels)
    return binarize(img), notes


def load_mask_image(path: str | Path, size: tuple[int, int], max_pixels: int | None = None
                    ) -> tuple[Image.Image, list[str]]:
    """An inpainting mask as a grayscale ("L") image of `size` = (width, height), its levels kept (load_mask
    binarises them): any mode -> L (ITU-R 601 luma), EXIF orientation applied, another size resized (noted)."""
    name, data = _read_source(path)
    img = _open_checked(name, data, max_pixels)
    notes: list[str] = []
    if img.getexif().get(0x0112, 1) not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append("EXIF orientation applied")
    try:
        # 16-bit and float masks go through _to_rgb's exact 8-bit reduction first; PIL's own L conversion clips.
        img = _to_rgb(img, []).convert("L") if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F") \
            else img.convert("L")
    except _DECODE_ERRORS as exc:
        raise BadInputError(f"{name}: cannot convert mask mode {img.mode} to grayscale ({exc})") from exc
    if img.size != tuple(size):
        notes.append(f"mask {img.width}x{img.height} resized to the image size {size[0]}x{size[1]}")
        img = img.resize(tuple(size), Image.Resampling.LANCZOS)  # diffusers' default resample
    return img, notes


def binarize(mask: Image.Image) -> torch.Tensor:
    """A grayscale mask as (1, 1, H, W) float32 of 0/1: level / 255 >= 0.5 repaints."""
    arr = np.asarray(mask.convert("L")).astype(np.float32) / 255.0  # (H, W) in [0, 1]
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]  # (1, 1, H, W)
