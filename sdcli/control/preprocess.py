"""ControlNet preprocessors that need no network: each a pure function of a PIL image (and its parameters).

canny, invert, threshold (scribble), tile (blurred downscale), shuffle (seeded warp), inpaint mask. The
model-based ones (depth, pose, HED/soft edge, segmentation, line art) are not built in: users pass their own
maps. Outputs are RGB (ControlNet hints have 3 channels) except `inpaint_mask`, whose alpha marks the hole.

canny vs OpenCV's ``cv2.Canny(img, low, high)`` (what diffusers' docs and sd-webui-controlnet use, 100/200):
same grayscale (PIL "L", ITU-R 601 luma rounded to uint8), same unnormalised 3x3 Sobel with replicated borders,
same L1 magnitude ``|gx| + |gy|`` (so the thresholds mean the same numbers), same four-sector non-maximum
suppression with OpenCV's tie rule, same 8-connected hysteresis: on the test images the output equals
cv2.Canny pixel for pixel (tests/test_preprocess.py). Differences: an optional Gaussian pre-blur (``blur``
sigma; cv2.Canny has none; kornia's canny, which ComfyUI uses, blurs 5x5 sigma 1 and uses the L2 magnitude on
[0, 1] images with thresholds 0.4/0.8, so its maps differ), and float32 arithmetic where
OpenCV uses fixed point for the direction test, so a pixel exactly on a sector boundary could fall the other way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

TAN_22_5 = 0.41421356  # sector bounds of the gradient direction, as OpenCV's canny.cpp (TG22)


def _gray(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.float32)  # (H, W) in 0..255


def _rgb(mask: np.ndarray) -> Image.Image:
    """A boolean (H, W) map as a black/white RGB image."""
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB")


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gx, gy) of the unnormalised 3x3 Sobel kernels, borders replicated."""
    p = np.pad(gray, 1, mode="edge")
    dx = p[:, 2:] - p[:, :-2]  # (H+2, W): central difference along x
    dy = p[2:, :] - p[:-2, :]  # (H, W+2)
    gx = dx[:-2] + 2 * dx[1:-1] + dx[2:]
    gy = dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
    return gx, gy


def _neighbour(mag: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """mag shifted so that out[y, x] = mag[y + dy, x + dx] (zero outside)."""
    p = np.pad(mag, 1)
    h, w = mag.shape
    return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _thin(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keep a pixel that beats its two neighbours across the edge (OpenCV's rule:
    strictly above the one before, at least the one after)."""
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay < ax * TAN_22_5
    vertical = ay > ax / TAN_22_5
    same_sign = (gx * gy) >= 0  # diagonal from top-left to bottom-right (y grows downwards)
    keep = np.zeros(mag.shape, dtype=bool)
    keep |= horizontal & (mag > _neighbour(mag, 0, -1)) & (mag >= _neighbour(mag, 0, 1))
    keep |= vertical & (mag > _neighbour(mag, -1, 0)) & (mag >= _neighbour(mag, 1, 0))
    diagonal = ~horizontal & ~vertical
    keep |= diagonal & same_sign & (mag > _neighbour(mag, -1, -1)) & (mag > _neighbour(mag, 1, 1))
    keep |= diagonal & ~same_sign & (mag > _neighbour(mag, -1, 1)) & (mag > _neighbour(mag, 1, -1))
    return keep


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected (through weak pixels) to a strong one; a flood fill from every strong pixel."""
    edges = strong.copy()
    h, w = strong.shape
    stack = list(zip(*np.nonzero(strong)))
    while stack:
        y, x = stack.pop()
        for ny in range(max(y - 1, 0), min(y + 2, h)):
            for nx in range(max(x - 1, 0), min(x + 2, w)):
                if weak[ny, nx] and not edges[ny, nx]:
                    edges[ny, nx] = True
                    stack.append((ny, nx))
    return edges


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0, blur: float = 0.0) -> Image.Image:
    """Canny edges, white on black, RGB. Thresholds on the L1 Sobel magnitude of 0..255 gray, as cv2.Canny;
    `blur` is an optional Gaussian pre-blur sigma in pixels (0: none, like cv2.Canny)."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high (got {low}, {high})")
    if blur > 0:
        image = image.convert("L").filter(ImageFilter.GaussianBlur(blur))
    gx, gy = _sobel(_gray(image))
    mag = np.abs(gx) + np.abs(gy)
    thin = _thin(mag, gx, gy) & (mag > low)
    return _rgb(_hysteresis(thin & (mag > high), thin))


def invert(image: Image.Image) -> Image.Image:
    """Negative: white-background line art or scribbles become the white-on-black maps ControlNets expect."""
    return Image.fromarray(255 - np.asarray(image.convert("RGB"))).convert("RGB")


def threshold(image: Image.Image, level: int = 128, invert_first: bool = False) -> Image.Image:
    """Binary map (scribble): gray >= level is white. `invert_first` for dark strokes on a light page."""
    gray = _gray(image)
    if invert_first:
        gray = 255 - gray
    return _rgb(gray >= level)


def tile(image: Image.Image, factor: float = 8.0, blur: float = 0.0) -> Image.Image:
    """The tile model's hint: the image scaled down by `factor` (box filter) and back up (bicubic) to its own
    size, optionally Gaussian-blurred, so only colours and coarse layout are left."""
    if factor < 1:
        raise ValueError(f"tile factor must be >= 1 (got {factor})")
    rgb = image.convert("RGB")
    small = (max(1, round(rgb.width / factor)), max(1, round(rgb.height / factor)))
    out = rgb.resize(small, Image.Resampling.BOX).resize(rgb.size, Image.Resampling.BICUBIC)
    return out.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else out


def _noise_field(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """A smooth random field in [0, 1] of size (h, w): uniform noise on a grid of `cell`-pixel cells, bicubic
    up (the shape of sd-webui-controlnet's make_noise_disk)."""
    coarse = rng.random((h // cell + 2, w // cell + 2), dtype=np.float32)
    big = Image.fromarray(coarse, mode="F").resize((w + 2 * cell, h + 2 * cell), Image.Resampling.BICUBIC)
    field = np.asarray(big)[cell : cell + h, cell : cell + w]
    field = field - field.min()
    return field / max(float(field.max()), 1e-12)


def shuffle(image: Image.Image, seed: int = 0, cell: int = 256) -> Image.Image:
    """Content shuffle: every output pixel is a copy of some input pixel, taken from a smoothly random place
    (two noise fields give its source x and y); the same seed gives the same warp."""
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(seed)
    src_x = np.rint(_noise_field(rng, h, w, cell) * (w - 1)).astype(np.int64)
    src_y = np.rint(_noise_field(rng, h, w, cell) * (h - 1)).astype(np.int64)
    return Image.fromarray(rgb[src_y, src_x])


def inpaint_mask(image: Image.Image, mask: Image.Image, level: int = 128) -> Image.Image:
    """The inpaint ControlNet's hint as an RGBA image: the picture, alpha 0 where the mask is white
    (gray >= level), 255 elsewhere. `inpaint_condition` turns it into the network's input."""
    if image.size != mask.size:
        raise ValueError(f"the mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}")
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(_gray(mask) >= level, 0, 255).astype(np.uint8)))
    return rgba


def inpaint_condition(rgba: Image.Image) -> np.ndarray:
    """(H, W, 3) float32: RGB in [0, 1], and -1 in every channel of a hole (alpha 0), as diffusers'
    ``make_inpaint_condition`` and sd-webui-controlnet's inpaint_only make it."""
    arr = np.asarray(rgba.convert("RGBA"), dtype=np.float32) / 255.0
    out = arr[..., :3].copy()
    out[arr[..., 3] == 0] = -1.0
    return out


PREPROCESSORS = {"canny": canny, "invert": invert, "threshold": threshold, "scribble": threshold, "tile": tile,
                 "shuffle": shuffle}  # fmt: skip  (inpaint needs a mask too: inpaint_mask)
