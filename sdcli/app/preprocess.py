"""`sdcli preprocess KIND IMAGE -o OUT`: a ControlNet hint from a picture, with the preprocessors that need no
network (sdcli/preprocess.py). Depth, pose, HED and segmentation maps need models: make them elsewhere and pass
them to --control-image as they are."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from sdcli.runtime import console
from sdcli.runtime.errors import UsageError

KINDS = ("canny", "invert", "threshold", "scribble", "tile", "shuffle", "inpaint")


@dataclass
class PreprocessRequest:
    kind: str
    image: str
    output: str
    low: float = 100.0  # canny thresholds on the L1 Sobel magnitude of 0..255 gray (cv2.Canny's)
    high: float = 200.0
    blur: float = 0.0  # canny / tile: Gaussian sigma in pixels
    level: int = 128  # threshold / scribble / inpaint mask: gray >= level is white
    invert_first: bool = False  # threshold: dark strokes on a light page
    factor: float = 8.0  # tile: downscale factor
    seed: int = 0  # shuffle
    mask: str | None = None  # inpaint: white = the hole
    overwrite: bool = False


def run_preprocess(req: PreprocessRequest) -> None:
    from sdcli.formats.images import load_image
    from sdcli.output.targets import atomic_write_bytes, check_target

    if req.kind not in KINDS:
        raise UsageError(f"unknown preprocessor '{req.kind}' (known: {', '.join(KINDS)}; depth, pose, HED and "
                         "segmentation need models: pass such maps to --control-image as they are)")  # fmt: skip
    if (req.kind == "inpaint") != (req.mask is not None):
        raise UsageError("--mask goes with the inpaint preprocessor, which needs it")
    check_target(Path(req.output), req.overwrite)
    image, notes = load_image(req.image, multiple=1)
    for note in notes:
        console.info(f"{req.image}: {note}")
    out = _apply(req, image)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    path = atomic_write_bytes(req.output, buf.getvalue(), overwrite=req.overwrite)
    console.info(f"saved {path} ({req.kind}, {out.width}x{out.height})")


def _apply(req: PreprocessRequest, image):
    from sdcli.control import preprocess as pp
    from sdcli.formats.images import load_image

    try:
        if req.kind == "canny":
            return pp.canny(image, req.low, req.high, req.blur)
        if req.kind in ("threshold", "scribble"):
            return pp.threshold(image, req.level, req.invert_first)
        if req.kind == "tile":
            return pp.tile(image, req.factor, req.blur)
        if req.kind == "shuffle":
            return pp.shuffle(image, req.seed)
        if req.kind == "inpaint":
            return pp.inpaint_mask(image, load_image(req.mask, multiple=1)[0], req.level)
        return pp.invert(image)
    except ValueError as e:  # out-of-range parameters, a mask of another size
        raise UsageError(str(e)) from None
