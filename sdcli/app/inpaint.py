"""Inpainting and outpainting as AUTOMATIC1111's img2img does them, for `sdcli img2img --mask / --pad`: the mask
inverted, grown onto an outpainting canvas, blurred; "Only masked" crops the mask's region (plus padding, at the
render's aspect ratio) and renders it at the full size; the masked content filled; the result put back over the
original outside the blurred mask. A1111: modules/processing.py StableDiffusionProcessingImg2Img.init and
apply_overlay (see formats/masking.py for each step's definition).

Any model: its x0 is pinned to the original latent where the mask keeps it (sampling/inpaint.py). A 9-channel
inpainting model keeps its own path: it sees the mask and the kept picture through its extra channels and
nothing is blended in the latent; its defaults (no blur, no overlay) keep its images as they were.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sdcli.config import RunConfig, pad_of
from sdcli.runtime import console

A1111_BLUR = 4  # the web UI's "Mask blur" default
FILL_LABELS = {"fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}  # A1111's words


@dataclass(frozen=True)
class InpaintSettings:
    """The config's inpaint keys with the model's defaults filled in."""

    blur: int
    fill: str  # original | fill | latent-noise | latent-nothing
    area: str  # whole | masked ("Only masked")
    padding: int  # pixels around the mask's region, "Only masked"
    invert: bool  # repaint what the mask keeps ("Inpaint not masked")
    overlay: bool  # put the original back outside the blurred mask
    pad: tuple[int, int, int, int] | None  # outpainting: left, top, right, bottom


def settings(cfg: RunConfig, inpainting_model: bool) -> InpaintSettings:
    """A1111's defaults (mask blur 4, the original put back) for any model; a 9-channel inpainting model leaves
    both off unless asked, so it renders as diffusers' inpainting pipeline (and earlier sdcli) did."""
    blur = cfg.mask_blur if cfg.mask_blur is not None else (0 if inpainting_model else A1111_BLUR)
    overlay = cfg.overlay if cfg.overlay is not None else not inpainting_model
    pad = pad_of(cfg.pad) if cfg.pad else None
    return InpaintSettings(blur, cfg.inpaint_fill, cfg.inpaint_area, cfg.inpaint_padding, cfg.mask_invert, overlay,
                           pad)


def canvas_size(size: tuple[int, int], pad_text: str | None) -> tuple[int, int]:
    """(width, height) of the picture rendered: the image's, grown by --pad; a multiple of 8 or UsageError."""
    from sdcli.runtime.errors import UsageError

    left, top, right, bottom = pad_of(pad_text) if pad_text else (0, 0, 0, 0)
    width, height = size[0] + left + right, size[1] + top + bottom
    if pad_text and (width % 8 or height % 8):
        raise UsageError(f"option --pad: the canvas {size[0]}+{left}+{right} x {size[1]}+{top}+{bottom} = "
                         f"{width}x{height} must be a multiple of 8 on each side")
    return width, height


@dataclass
class Inpaint:
    """One image's inpainting, prepared in pixels: what the model renders, and how the result goes back."""

    settings: InpaintSettings
    image: Any  # PIL RGB at the render size: the picture (or its "Only masked" crop), masked content filled
    mask: Any  # PIL L at the render size, 255 = repaint, blurred
    overlay: Any = None  # PIL RGBA the size of the canvas: the original where it is kept (None: no overlay)
    canvas: Any = None  # PIL RGB: the whole picture ("Only masked" without overlay pastes the render into it)
    paste_to: tuple[int, int, int, int] | None = None  # "Only masked": (x, y, w, h) of the crop in the canvas

    def keep(self, latent_shape: tuple[int, ...]):
        """(1, 1, h, w) fp32, 1 = keep: the mask at latent size, as A1111's `mask` (1 - its rounded latmask)."""
        import torch

        from sdcli.formats.masking import latent_mask

        h, w = latent_shape[-2:]
        return 1 - torch.from_numpy(latent_mask(self.mask, (w, h)))[None, None]

    def start(self, latent, seeds: list[int], source: str = "cpu"):
        """The latent img2img starts from for these seeds: A1111's latent masked content, if chosen (its noise from
        the run's noise source, as A1111's create_random_tensors)."""
        from sdcli.sampling.inpaint import masked_start, seed_noise

        if self.settings.fill not in ("latent-noise", "latent-nothing"):
            return latent
        keep = self.keep(latent.shape).to(latent)
        noise = seed_noise(seeds, tuple(latent.shape[1:]), source).to(latent) if self.settings.fill == "latent-noise" \
            else None
        return masked_start(latent, keep, self.settings.fill, noise)

    def finish(self, rendered):
        """The rendered PIL image put back: composited under the original's overlay ("Only masked": scaled back
        into its place first); without overlay an "Only masked" render is pasted into the canvas as it is."""
        from sdcli.formats import masking

        if self.overlay is not None:
            return masking.apply_overlay(rendered, self.overlay, self.paste_to)
        if self.paste_to is not None:
            return masking.uncrop(rendered, self.canvas.size, self.paste_to, base=self.canvas).convert("RGB")
        return rendered

    def fields(self) -> dict:
        """The infotext fields A1111 writes for this inpainting, in its order; sdcli's own for outpainting."""
        s, out = self.settings, {}
        if s.invert:
            out["Mask mode"] = "Inpaint not masked"
        if s.blur > 0:
            out["Mask blur"] = s.blur
        if self.paste_to is not None:
            out["Inpaint area"], out["Masked area padding"] = "Only masked", s.padding
        if s.fill in FILL_LABELS:
            out["Masked content"] = FILL_LABELS[s.fill]
        if s.pad is not None:
            out["Outpaint pad"] = " ".join(str(p) for p in s.pad)
        return out


def prepare(image, mask, s: InpaintSettings) -> Inpaint:
    """An image (PIL RGB) and its mask (PIL L of the same size, 255 = repaint; None with --pad alone) made ready
    to render at the canvas size, in A1111's order: invert, (sdcli: the outpainting canvas), blur, crop region,
    overlay, crop and resize, fill."""
    from PIL import ImageOps

    from sdcli.formats import masking

    if s.invert and mask is not None:  # the given mask; an outpainting border is always repainted
        mask = ImageOps.invert(mask.convert("L"))
    if s.pad is not None:
        image, mask = masking.pad_canvas(image, mask, s.pad, overlap=2 * s.blur)
    mask = masking.blur_mask(mask, s.blur) if s.blur > 0 else mask.convert("L")
    region = _region(mask, image.size, s) if s.area == "masked" else None
    if region is None:
        return _whole(image, mask, s)
    x1, y1, x2, y2 = region
    size = image.size
    work = Inpaint(s, masking.resize_image(2, image.crop(region), *size),
                   masking.resize_image(2, mask.crop(region), *size), canvas=image, paste_to=(x1, y1, x2 - x1, y2 - y1))
    if s.overlay:
        work.overlay = masking.overlay_of(image, masking.overlay_mask(mask, doubled=False))
    return _filled(work)


def _region(mask, size: tuple[int, int], s: InpaintSettings) -> tuple[int, int, int, int] | None:
    """"Only masked": the mask's region plus padding, at the render's aspect ratio; None for a blank mask."""
    from sdcli.formats import masking

    region = masking.crop_region(mask, s.padding)
    if region is None:
        console.info("--inpaint-area masked: the mask is blank, so the whole picture is inpainted")
        return None
    return masking.expand_crop_region(region, *size, *size)


def _whole(image, mask, s: InpaintSettings) -> Inpaint:
    """"Whole picture": the picture at its own size; the overlay mask doubled (the original returns only where
    the blurred mask is under half)."""
    from sdcli.formats import masking

    overlay = masking.overlay_of(image, masking.overlay_mask(mask, doubled=True)) if s.overlay else None
    return _filled(Inpaint(s, image, mask, overlay, canvas=image))


def _filled(work: Inpaint) -> Inpaint:
    """A1111 fills the masked area from its surroundings for every masked content but "original" (the latent
    ones then replace it in the latent too)."""
    from sdcli.formats import masking

    if work.settings.fill == "original":
        return work
    return dataclasses.replace(work, image=masking.fill(work.image, work.mask))
