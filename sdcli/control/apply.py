"""ControlNet at sampling time: the units of a job, carried in `Cond.control`, turned into residuals inside each
UNet call (they depend on the noisy latent and the timestep, so they cannot be computed ahead).

How it flows (the CFG denoiser stays generic; it only batches Cond fields):
- render attaches a `ControlSet` to the cond and the uncond Cond, each marked with its side ("cond"/"uncond");
  conditioning.cat joins the two sides of one batched CFG call (`ControlSet.cat`);
- conditioning.for_batch binds it to the pass's sigmas (`for_pass`): the step index is found from sigma, so the
  hires pass and img2img's shortened schedule count their own steps, as diffusers' img2img/hires pipelines do;
- the Denoiser asks the Cond for the UNet's arguments at this sigma (`at`): a `ControlStep` holding the units
  active at this step, or None when none is (then the UNet runs exactly as without ControlNet);
- the UNet adapter (pipeline._UNetAdapter) calls `ControlStep.residuals` per image on the very rows the UNet gets.

Per unit and step, as diffusers' StableDiffusionControlNetPipeline: skipped unless `unit_active` (diffusers'
start/end rule) and weight != 0; run on the same scaled latent, timestep, context and y as the UNet (the latent's
channels only: an inpainting UNet's extra mask channels are not the ControlNet's input); under CFG on both halves,
except in guess mode (forced for global-pool/shuffle models), where it runs on the conditional half only and the
unconditional half gets no residual; scaled by `scale_residuals`; summed over units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdcli.models.controlnet import Residuals, scale_residuals, sum_residuals, unit_active

RESIZE_MODES = ("just", "crop", "fill")  # A1111: "Just Resize", "Crop and Resize", "Resize and Fill"


def fit_hint(image: Image.Image, width: int, height: int, mode: str = "just") -> Image.Image:
    """The hint image at exactly (width, height): `just` stretches it (A1111's default; diffusers' resize),
    `crop` scales it to cover and cuts the middle, `fill` scales it to fit and pads with black (no control).
    Resampling: PIL Lanczos, as diffusers' control image processor; an image already the size is untouched."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    if mode == "just":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    sx, sy = width / image.width, height / image.height
    scale = max(sx, sy) if mode == "crop" else min(sx, sy)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if mode == "crop":
        return _cover_crop(image, (w, h), width, height)
    scaled = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - w) // 2, (height - h) // 2))
    return canvas


def _cover_crop(image: Image.Image, scaled: tuple[int, int], width: int, height: int) -> Image.Image:
    """The middle (width, height) of `image` scaled to `scaled`, resampling only the part that stays: scaling all
    of a 1x20000 hint to cover 512x512 would make a 512x10240000 picture first. The same two Lanczos passes as
    the whole resize (horizontal, then vertical: PIL's order), each over the source pixels its filter reaches,
    so the result equals scale-then-crop (within one level where float rounding moves a filter weight)."""
    w, h = scaled
    left, top = (w - width) // 2, (h - height) // 2
    kx, ky = image.width / w, image.height / h  # source pixels per scaled pixel
    x0, x1, y0, y1 = left * kx, (left + width) * kx, top * ky, (top + height) * ky
    c0, c1 = _reach(x0, x1, kx, image.width)
    r0, r1 = _reach(y0, y1, ky, image.height)
    part = image.crop((c0, r0, c1, r1))  # exact: no resampling
    rows = part.resize((width, part.height), Image.Resampling.LANCZOS, box=(x0 - c0, 0, x1 - c0, part.height))
    return rows.resize((width, height), Image.Resampling.LANCZOS, box=(0, y0 - r0, width, y1 - r0))


def _reach(start: float, end: float, step: float, size: int) -> tuple[int, int]:
    """Source pixels a Lanczos filter (support 3, widened by `step` when shrinking) reads for [start, end)."""
    support = 3 * max(step, 1.0) + 2  # + 2: whole pixels past PIL's rounding of the filter's ends
    return max(0, math.floor(start - support)), min(size, math.ceil(end + support))


def hint_tensor(image: Image.Image, bgr: bool = False) -> Tensor:
    """(1, 3, H, W) float32 in [0, 1] (no [-1, 1] normalisation: diffusers' do_normalize=False), channels
    flipped for models trained on BGR hints."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0  # (H, W, 3)
    t = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()
    return t.flip(1) if bgr else t


@dataclass(frozen=True, eq=False)
class Unit:
    """One ControlNet unit ready to run: the loaded network, its hint picture (already preprocessed, at any
    size: it is fitted to each pass), and its settings."""

    net: torch.nn.Module  # models.controlnet.ControlNet
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    resize: str = "just"
    bgr: bool = False

    @property
    def cond_only(self) -> bool:
        """Under CFG the unit runs on the conditional half only: guess mode, forced for global-pool models."""
        return self.guess_mode or self.net.config.global_pool

    def hint(self, height: int, width: int, device, dtype) -> Tensor:
        """(1, 3, height, width) on the network's device; cached per size (a hires pass asks for another)."""
        cache = self.__dict__.setdefault("_hints", {})
        key = (height, width, str(device), dtype)
        if key not in cache:
            cache[key] = hint_tensor(fit_hint(self.image, width, height, self.resize), self.bgr).to(device, dtype)
        return cache[key]


@dataclass(frozen=True)
class ControlSet:
    """The units of a job as one Cond field. `parts`: which CFG half each block of rows is, in batch order
    ("cond", "uncond", or both after conditioning.cat). `sigmas`: the pass's schedule once bound."""

    units: tuple[Unit, ...]
    parts: tuple[str, ...] = ("cond",)
    sigmas: Tensor | None = None

    def side(self, name: str) -> ControlSet:
        return replace(self, parts=(name,))

    @staticmethod
    def cat(values: list[ControlSet]) -> ControlSet:
        return replace(values[0], parts=tuple(p for v in values for p in v.parts))

    def layout(self) -> tuple:
        return ("control", id(self.units))  # both halves of a job batch together

    def for_pass(self, sigmas: Tensor) -> ControlSet:
        return replace(self, sigmas=sigmas.detach().float().cpu())

    def step_of(self, sigma: float) -> tuple[int, int]:
        """(step index, steps) of this pass at `sigma`: the last schedule entry at or above it (a second model
        evaluation within a step, at a sigma between two entries, belongs to the step it started from)."""
        if self.sigmas is None:
            raise RuntimeError("ControlSet used before for_pass bound it to the pass's sigmas")
        steps = len(self.sigmas) - 1
        at_or_above = int((self.sigmas[:-1] >= sigma * (1 - 1e-6)).sum())
        return min(max(at_or_above - 1, 0), steps - 1), steps

    def at(self, sigma: Tensor) -> ControlStep | None:
        step, steps = self.step_of(float(sigma.max()))
        active = tuple(u for u in self.units if u.weight != 0 and unit_active(step, steps, u.start, u.end))
        if not active:
            return None
        return ControlStep(active, self.parts)


@dataclass(frozen=True)
class ControlStep:
    """The units active at one step, for rows laid out as `parts` (equal blocks, in order)."""

    units: tuple[Unit, ...]
    parts: tuple[str, ...]

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Residuals | None:
        """Summed, scaled residuals for the UNet input x (R, C, h, w) (its first channels are the latent),
        timesteps (R,), context (R, T, D), SDXL's y (R, adm); None when no unit has rows to run on."""
        rows = x.shape[0]
        n = rows // len(self.parts)
        total = None
        for unit in self.units:
            take = self._rows(unit, n)
            if take is None:
                continue  # guess mode in a call of the unconditional half alone: no residual there
            res = self._run(unit, x[take], t[take], context[take], None if y is None else y[take])
            if take != slice(None):
                res = _placed(res, take, rows)
            total = sum_residuals(total, res)
        return total

    def _rows(self, unit: Unit, n: int) -> slice | None:
        if not unit.cond_only or len(self.parts) == 1 and self.parts[0] == "cond":
            return slice(None)
        if "cond" not in self.parts:
            return None
        k = self.parts.index("cond")
        return slice(k * n, (k + 1) * n)

    @staticmethod
    def _run(unit: Unit, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Residuals:
        net = unit.net
        param = next(net.parameters())
        latent = x[:, : net.config.unet.in_channels]  # an inpainting UNet's mask channels are not the CN's input
        hint = unit.hint(8 * x.shape[-2], 8 * x.shape[-1], param.device, param.dtype)
        res = net(latent, hint.expand(x.shape[0], -1, -1, -1), t, context, y)
        return scale_residuals(res, unit.weight, unit.guess_mode, net.config.global_pool)


def _placed(res: Residuals, rows: slice, total: int) -> Residuals:
    """Residuals computed on some rows, zero on the others (diffusers: zeros for the unconditional half)."""
    def spread(r: Tensor) -> Tensor:
        out = r.new_zeros((total, *r.shape[1:]))
        out[rows] = r
        return out

    down, mid = res
    return [spread(d) for d in down], spread(mid)


def attach(cond, uncond, units: list[Unit]):
    """(cond, uncond) with the job's units in their `control` field, each marked with its CFG half; either may
    be a Cond, a bare context tensor or a prompt-editing schedule of them. No units: unchanged."""
    if not units:
        return cond, uncond
    control = ControlSet(tuple(units))
    return _attach(cond, control.side("cond")), _attach(uncond, control.side("uncond"))


def _attach(value, control: ControlSet):
    from sdcli.sampling.conditioning import as_cond
    from sdcli.text.editing import ScheduledCond

    if value is None:
        return None
    if isinstance(value, ScheduledCond):
        return ScheduledCond(tuple((end, _attach(c, control)) for end, c in value.entries))
    return replace(as_cond(value), control=control)
