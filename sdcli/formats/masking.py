"""Inpainting masks and pictures as AUTOMATIC1111's web UI prepares them, in pixels (no model here): the mask's
Gaussian blur, the "Only masked" crop region, the resize modes, the "fill" masked content, the overlay that puts
the original back, the mask at latent size, and sdcli's outpainting canvas.

Definitions followed (stable-diffusion-webui, read and written anew here):
- modules/processing.py StableDiffusionProcessingImg2Img.init: blur (cv2.GaussianBlur, x then y), crop region,
  the overlay mask (doubled in "Whole picture"), fill, and the latent mask (bicubic downscale, rounded);
- modules/masking.py: get_crop_region_v2, expand_crop_region, fill;
- modules/images.py resize_image (0 just resize, 1 crop and resize, 2 resize and fill: Lanczos) and
  processing.py apply_overlay / uncrop.
Masks are PIL "L" images, 255 = repaint. Everything is 8-bit, as there, so the same input gives the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

LANCZOS = Image.Resampling.LANCZOS
FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # masking.fill: (blur radius, composites)


# --- blur ----------------------------------------------------------------------------------------

def blur_mask(mask: Image.Image, radius_x: int, radius_y: int | None = None) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur(mask, (k, 1), r) across, then (1, k) down, k = 2 * int(2.5 r + 0.5) + 1
    (a kernel of about +-2.5 sigma, sigma = r pixels). 0 leaves that direction alone."""
    radius_y = radius_x if radius_y is None else radius_y
    out = np.asarray(mask.convert("L"))
    if radius_x > 0:
        out = _blur_rows(out, radius_x)
    if radius_y > 0:
        out = _blur_rows(out.T, radius_y).T
    return Image.fromarray(np.ascontiguousarray(out), "L")


def _blur_rows(a: np.ndarray, sigma: float) -> np.ndarray:
    """Each row of uint8 `a` convolved with OpenCV's 8-bit Gaussian taps, borders mirrored without repeating the
    edge pixel (BORDER_REFLECT_101, GaussianBlur's default), rounded as OpenCV's fixed point does."""
    taps = gaussian_taps(sigma, 2 * int(2.5 * sigma + 0.5) + 1)
    half = len(taps) // 2
    padded = np.pad(a.astype(np.int64), ((0, 0), (half, half)), mode="reflect")  # numpy's reflect = REFLECT_101
    total = np.zeros(a.shape, np.int64)
    for i, tap in enumerate(taps):
        total += int(tap) * padded[:, i:i + a.shape[1]]
    # the taps carry 8 fractional bits: (sum + 0.5) / 256 rounded down, OpenCV's ufixedpoint -> uint8 conversion
    return np.clip((total + 128) >> 8, 0, 255).astype(np.uint8)


def gaussian_taps(sigma: float, size: int) -> np.ndarray:
    """OpenCV's integer Gaussian kernel for 8-bit images (smooth.dispatch.cpp getGaussianKernelBitExact +
    getGaussianKernelFixedPoint_ED): exp(-x^2 / (2 sigma^2)) normalised to sum 1, then quantised to 1/256 from the
    outside in, each tap carrying the previous one's rounding error, and the centre taking what is left, so the
    taps sum to exactly 256."""
    half = size // 2
    x2 = np.array([(2 * (i - half)) ** 2 for i in range(half)], np.float64)  # OpenCV's doubled x, squared
    values = np.exp(x2 * (-0.125 / (sigma * sigma)))  # = exp(-d^2 / (2 sigma^2)), d = i - half
    scale = 1.0 / (values.sum() * 2 + 1.0)
    taps = np.zeros(size, np.int64)
    error = 0.0
    for i in range(half):
        wanted = values[i] * scale * 256 + error
        taps[i] = taps[size - 1 - i] = round(wanted)  # Python's round: to nearest, ties to even, as cvRound
        error = wanted - taps[i]
    taps[half] = 256 - 2 * taps[:half].sum()
    return taps


# --- crop region ("Only masked") -----------------------------------------------------------------

def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """(x1, y1, x2, y2), ends exclusive, of the mask's non-zero pixels grown by `pad` on every side and kept
    inside the picture; None for an all-black mask (masking.get_crop_region_v2)."""
    a = np.asarray(mask.convert("L"))
    cols, rows = np.flatnonzero(a.any(axis=0)), np.flatnonzero(a.any(axis=1))
    if cols.size == 0:
        return None
    w, h = mask.size
    x1, y1, x2, y2 = int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, w), min(y2 + pad, h)


def expand_crop_region(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
                       image_height: int) -> tuple[int, int, int, int]:
    """The region grown along its short side to the render's aspect ratio width/height (whole pixels, the extra
    split with the odd one after), shifted back inside the picture where it crosses an edge and cut at the edge
    if it is still too long (masking.expand_crop_region)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:  # too wide for the render: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), image_height)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:  # past the far edge: slide back
        lo, hi = lo - (hi - limit), limit
    if lo < 0:  # past the near edge: slide forward
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


# --- resizing ------------------------------------------------------------------------------------

def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's img2img resize modes with its default upscaler (none: Lanczos), in the image's own mode.
    0: stretch to width x height. 1: scale to cover, centred, the overflow cropped. 2: scale to fit, centred, the
    bands left over filled by stretching the picture's outer row or column (images.resize_image)."""
    if mode == 0:
        return image.resize((width, height), LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == 1
    # cover: the side that is short for the render's ratio takes its full length; fit: the long side does
    full_width = ratio > src_ratio if cover else ratio < src_ratio
    full_height = ratio <= src_ratio if cover else ratio >= src_ratio
    src_w = width if full_width else image.width * height // image.height
    src_h = height if full_height else image.height * width // image.width
    resized = image.resize((src_w, src_h), LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if not cover:
        _fill_bands(out, resized, ratio, src_ratio)
    return out


def _fill_bands(out: Image.Image, resized: Image.Image, ratio: float, src_ratio: float) -> None:
    """Resize and fill's empty bands: the picture's first/last row (or column) stretched over them."""
    width, height = out.size
    if ratio < src_ratio:
        band = height // 2 - resized.height // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)),
                      (0, band + resized.height))
    elif ratio > src_ratio:
        band = width // 2 - resized.width // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)),
                      (band + resized.width, 0))


# --- masked content and overlay ------------------------------------------------------------------

def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"Masked content: fill": the repainted area painted with the kept colours around it, by compositing ever
    sharper blurs (radius 256 down to 0) of the kept part, in premultiplied alpha so the hole adds no black
    (masking.fill). The kept pixels come out unchanged."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_LAYERS:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


def overlay_mask(mask: Image.Image, doubled: bool) -> Image.Image:
    """Where the original shows in the result: A1111 doubles the blurred mask for "Whole picture" (so the
    original fades out over the outer half of the blur only), and uses it as is for "Only masked"."""
    if not doubled:
        return mask.convert("L")
    a = np.asarray(mask.convert("L")).astype(np.float32)
    return Image.fromarray(np.clip(a * 2, 0, 255).astype(np.uint8), "L")


def overlay_of(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original as an RGBA layer, opaque where it is kept, transparent where repainted (processing.py
    init's image_masked: pasted through the inverted mask in premultiplied alpha)."""
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return layer.convert("RGBA")


def apply_overlay(image: Image.Image, overlay: Image.Image,
                  paste_to: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The render with the original composited over it (processing.apply_overlay). With `paste_to` (x, y, w, h,
    "Only masked"), the render is first scaled (crop and resize) into that rectangle of an empty canvas the
    size of the overlay."""
    if paste_to is not None:
        image = uncrop(image, overlay.size, paste_to)
    out = image.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


def uncrop(image: Image.Image, size: tuple[int, int], paste_to: tuple[int, int, int, int],
           base: Image.Image | None = None) -> Image.Image:
    """The render scaled back into its rectangle (x, y, w, h) of `base` (default: a transparent canvas of
    `size`): processing.uncrop."""
    x, y, w, h = paste_to
    canvas = Image.new("RGBA", size) if base is None else base.convert("RGBA")
    canvas.paste(resize_image(1, image, w, h), (x, y))
    return canvas


# --- latent mask ---------------------------------------------------------------------------------

def latent_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 of 0/1, 1 = repaint, at latent size (w, h): the mask scaled down with PIL's default
    (bicubic, which averages over the area) and rounded, as processing.py's latmask with mask_round."""
    small = mask.convert("RGB").resize(size)  # PIL's default resample for RGB: bicubic
    return np.around(np.asarray(small, dtype=np.float32)[..., 0] / 255)


# --- outpainting ---------------------------------------------------------------------------------

def pad_canvas(image: Image.Image, mask: Image.Image | None, pad: tuple[int, int, int, int],
               overlap: int = 0) -> tuple[Image.Image, Image.Image]:
    """Outpainting: the picture on a canvas grown by (left, top, right, bottom) pixels, the new border filled by
    repeating the picture's edge pixels outward, and the mask: the new border white (repaint), reaching `overlap`
    pixels into the picture on each grown side (A1111's poor man's outpainting reaches 2 x mask blur in, so the
    blurred seam is repainted too), with the given mask (or black) inside."""
    left, top, right, bottom = pad
    rgb = np.asarray(image.convert("RGB"))
    canvas = np.pad(rgb, ((top, bottom), (left, right), (0, 0)), mode="edge")
    inner = np.zeros(rgb.shape[:2], np.uint8) if mask is None else np.asarray(mask.convert("L"))
    grown = np.pad(inner, ((top, bottom), (left, right)), constant_values=255)
    h, w = grown.shape
    for width, sl in ((left, np.s_[:, :left + overlap]), (right, np.s_[:, w - right - overlap:]),
                      (top, np.s_[:top + overlap, :]), (bottom, np.s_[h - bottom - overlap:, :])):
        if width > 0:
            grown[sl] = 255
    return Image.fromarray(canvas, "RGB"), Image.fromarray(grown, "L")
