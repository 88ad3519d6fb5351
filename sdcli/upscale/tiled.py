"""Running an upscaler on images of any size: tiles with context, blended seams, out-of-memory fallback, and
the PIL-level wrapper (modes, a requested scale other than the model's).

Tiling: the image is covered by the fewest windows of at most `tile` x `tile` input pixels whose neighbours
can share at least `overlap` pixels, each shrunk to what that needs and spread evenly (512 px at tile 256: three
windows of 192 along each side, 1.27x the untiled work, where full 256 px windows would be 2.25x). Of each
shared band, the outer three eighths on each side are context only
(Real-ESRGAN's ``tile_pad``: the model sees real pixels there, and that part of its output is cropped away) and
the middle quarter is blended with complementary linear ramps, so no seam can show. (At the default overlap of 32:
12 px of context, as Real-ESRGAN's 10, and an 8 px blend, 32 px of output at x4. More context and less blend
measured closer to the untiled result: a network is deterministic, the blend only hides what context lacks.)
A window that covers the whole image is a plain call: untiled output equals the model's direct call exactly.

Colour order: RGB in, RGB out. spandrel, ComfyUI and chaiNNer feed RGB, as the models were trained (BasicSR and
xinntao/ESRGAN convert OpenCV's BGR to RGB first); A1111 flips to BGR around the model
(``modules/upscaler_utils.py: pil_image_to_torch_bgr``), which makes its output differ slightly from theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdcli.runtime.errors import BadInputError, NumericalError, OutOfMemoryError

DEFAULT_TILE = 512  # ComfyUI's ImageUpscaleWithModel: 512, overlap 32, halved on out-of-memory
DEFAULT_OVERLAP = 32
MIN_TILE = 64  # the out-of-memory halving stops here
MAX_PASSES = 3  # A1111 Upscaler.upscale: the model runs at most 3 times to reach a larger requested scale


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in input pixels."""

    start: int  # the window the model sees: [start, stop)
    stop: int
    keep_start: int  # the part of the image this tile's output contributes to: [keep_start, keep_stop)
    keep_stop: int
    ramp_in: int  # input pixels over which its weight rises at keep_start (0: an image edge, no neighbour)
    ramp_out: int  # ... and falls at keep_stop


def spans(size: int, tile: int, overlap: int) -> list[Span]:
    """Windows of `tile` covering [0, size), evenly spread, neighbours sharing >= `overlap` pixels; each shared
    band split into context (outer 3/8 on each side, cropped) and a blend (the middle quarter) around its centre."""
    if size <= tile:
        return [Span(0, size, 0, size, 0, 0)]
    n = 1 + math.ceil((size - tile) / (tile - overlap))  # the fewest windows of `tile` that can do it
    window = -(-(size + (n - 1) * overlap) // n)  # ...then as small as they can be: less work than full tiles
    while True:
        starts = [(i * (size - window) + (n - 1) // 2) // (n - 1) for i in range(n)]
        if window >= tile or all(a + window - b >= overlap for a, b in zip(starts, starts[1:])):
            break
        window += 1  # rounding the starts lost a pixel of overlap somewhere
    seams = []  # (centre, half width of the blend) between window i and i + 1
    for a, b in zip(starts, starts[1:]):
        shared = a + window - b  # >= overlap
        seams.append((b + shared // 2, shared // 8))
    out = []
    for i, a in enumerate(starts):
        lo, lo_half = seams[i - 1] if i else (0, 0)
        hi, hi_half = seams[i] if i < n - 1 else (size, 0)
        out.append(Span(a, a + window, lo - lo_half, hi + hi_half, 2 * lo_half, 2 * hi_half))
    return out


def _weights(span: Span, scale: int) -> Tensor:
    """1-D blend weights over the kept output pixels: linear ramps that sum to 1 with the neighbour's."""
    w = torch.ones((span.keep_stop - span.keep_start) * scale)
    for ramp, at_start in ((span.ramp_in * scale, True), (span.ramp_out * scale, False)):
        if ramp:
            edge = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
            part = w[:ramp] if at_start else w[w.numel() - ramp:]
            part.copy_(torch.minimum(part, edge if at_start else edge.flip(0)))
    return w


def _run(model: Any, x: Tensor) -> Tensor:
    """model(x) as float32 in [0, 1] on x's device. `model` is an ``Upscaler`` or a spandrel descriptor (its
    dtype and device are read from it) or any callable with a ``scale``."""
    device, dtype = getattr(model, "device", x.device), getattr(model, "dtype", x.dtype)
    with torch.inference_mode():
        return model(x.to(device, dtype)).float().clamp(0, 1).to(x.device)


def _tiled(model: Any, image: Tensor, tile: int | None, overlap: int) -> Tensor:
    _, _, h, w = image.shape
    t = max(h, w) if tile is None else tile
    ys, xs = spans(h, t, min(overlap, t // 4)), spans(w, t, min(overlap, t // 4))
    if len(ys) == len(xs) == 1:
        return _run(model, image)  # one window: the direct call, bit for bit
    s = model.scale
    out = total_y = total_x = None
    for y in ys:
        wy = _weights(y, s)
        for x in xs:
            wx = _weights(x, s)
            piece = _run(model, image[..., y.start:y.stop, x.start:x.stop])  # (1, C', th*s, tw*s)
            if piece.shape[-2:] != ((y.stop - y.start) * s, (x.stop - x.start) * s):
                raise ValueError(f"upscaler returned {tuple(piece.shape)} for a tile, expected scale {s}")
            kept = piece[..., (y.keep_start - y.start) * s:(y.keep_stop - y.start) * s,
                         (x.keep_start - x.start) * s:(x.keep_stop - x.start) * s]  # fmt: skip
            if out is None:
                out = torch.zeros(1, piece.shape[1], h * s, w * s, device=image.device)
                total_y, total_x = torch.zeros(h * s), torch.zeros(w * s)
            out[..., y.keep_start * s:y.keep_stop * s, x.keep_start * s:x.keep_stop * s] += (
                kept * (wy[:, None] * wx[None, :]).to(image.device))
            if y is ys[0]:
                total_x[x.keep_start * s:x.keep_stop * s] += wx
        total_y[y.keep_start * s:y.keep_stop * s] += wy
    return out / (total_y[:, None] * total_x[None, :]).to(image.device)  # the weights sum to 1 up to rounding


def _is_oom(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA), or the RuntimeError the CPU allocator raises instead."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def upscale(model: Any, image: Tensor, tile: int | None = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """(1, C, H, W) in [0, 1] -> (1, C', sH, sW) in [0, 1] at the model's native scale `s`, tiled by `tile`
    (None: the whole image at once). Out of memory halves the tile (the whole image first becomes tiles of half
    its longer side) down to MIN_TILE, then raises sdcli's OutOfMemoryError (exit 6). NaN or Inf in the result
    (an fp16 overflow) is NumericalError (exit 5), never a silently black image."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"upscale expects one image (1, C, H, W), got {tuple(image.shape)}")
    while True:
        try:
            out = _tiled(model, image, tile, overlap)
            if not bool(torch.isfinite(out).all()):
                raise NumericalError("the upscaler produced NaN or Inf (an fp16 overflow?): run it in fp32 or bf16")
            return out
        except Exception as e:
            if not _is_oom(e):
                raise
            smaller = (max(image.shape[-2:]) if tile is None else tile) // 2
            if smaller < MIN_TILE:
                raise OutOfMemoryError(f"out of memory upscaling even in tiles of {tile or max(image.shape[-2:])} px: "
                                       "use --device cpu or a smaller image") from None  # fmt: skip
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            tile = smaller


# --- PIL images --------------------------------------------------------------------------------------------

_AS_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


def normal_mode(img: Image.Image) -> Image.Image:
    """The image as L, LA, RGB or RGBA: palettes and premultiplied or other colour spaces converted."""
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode in ("La", "RGBa"):
        return img.convert(img.mode[:-1] + "A")
    if img.mode in _AS_RGB:
        return img.convert("RGB")
    raise BadInputError(f"image mode {img.mode} (16-bit or float) is not supported: convert it to 8-bit first")


def _to_tensor(img: Image.Image) -> Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W) or (H, W, C)
    t = torch.from_numpy(arr)
    return (t[None] if t.dim() == 2 else t.permute(2, 0, 1)).unsqueeze(0).contiguous()  # (1, C, H, W)


def _to_pil(x: Tensor) -> Image.Image:
    # (H, W, C), rounded as spandrel and chaiNNer do: A1111 (upscaler_utils.upscale_without_tiling) truncates
    # with astype(uint8), which darkens by half a level on average
    arr = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]])


def _one_pass(img: Image.Image, model: Any, tile: int | None, overlap: int) -> Image.Image:
    """An L, RGB or RGBA image through the model once, in the channels the model takes, back in img's mode.
    Gray goes in replicated to RGB (and comes back as PIL's luma); RGB goes to a 1-channel model as luma."""
    want = getattr(model, "input_channels", 3)
    given = {1: "L", 3: "RGB", 4: "RGBA"}.get(want)
    if given is None:
        raise BadInputError(f"the upscaler takes {want}-channel images; only 1, 3 or 4 can be fed to it")
    out = _to_pil(upscale(model, _to_tensor(img.convert(given)), tile, overlap))
    return out if out.mode == img.mode else out.convert(img.mode)


def _target(img: Image.Image, model: Any, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    if size is not None:
        return int(size[0]), int(size[1])
    factor = model.scale if scale is None else scale
    return max(1, round(img.width * factor)), max(1, round(img.height * factor))


def _passes(img: Image.Image, model: Any, target: tuple[int, int], tile: int | None, overlap: int) -> Image.Image:
    """Run the model until the image reaches `target` (at most MAX_PASSES times; at least once even at the same
    size, for 1x restoration models), as A1111's Upscaler.upscale; stop when a pass does not grow it."""
    for i in range(MAX_PASSES):
        if img.width >= target[0] and img.height >= target[1] and (i > 0 or img.size != target):
            break
        before = img.size
        img = _one_pass(img, model, tile, overlap)
        if img.size == before:
            break
    return img


def upscale_pil(img: Image.Image, model: Any, scale: float | None = None, tile: int | None = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP, size: tuple[int, int] | None = None) -> Image.Image:
    """`img` upscaled by the model to `size` (w, h), else to `scale` x its size, else to the model's native scale;
    resized with Lanczos where the model's passes do not land exactly there. L, LA, RGB and RGBA keep their mode
    (palette images come back RGB/RGBA). Alpha: a constant alpha stays that constant; any other alpha goes
    through the model on its own as a gray image (chaiNNer's "separate alpha"; A1111 drops alpha)."""
    img = normal_mode(img)
    target = _target(img, model, scale, size)
    colour, alpha = (img.convert(img.mode[:-1]), img.getchannel("A")) if img.mode in ("LA", "RGBA") else (img, None)
    out = _passes(colour, model, target, tile, overlap)
    if alpha is not None:
        lo, hi = alpha.getextrema()
        out.putalpha(Image.new("L", out.size, lo) if lo == hi else _passes(alpha, model, target, tile, overlap))
    # one Lanczos resize at the end; PIL premultiplies alpha for it, so transparent pixels do not bleed colour
    return out if out.size == target else out.resize(target, Image.Resampling.LANCZOS)
