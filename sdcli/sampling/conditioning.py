"""What the UNet is conditioned on besides the noisy latent and the timestep, carried as one structure from prompt
encoding to the UNet call (k-diffusion passes it as ``extra_args``, ComfyUI as its ``c_crossattn`` / ``y`` /
``c_concat`` / ``control`` dict).

The CFG denoiser batches cond and uncond field by field and otherwise passes the structure through untouched; the
denoiser appends `concat` to the scaled input's channels and hands `y` (and later `control`) to the UNet only when
present, so a UNet that takes ``unet(x, t, context)`` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable

import torch
from torch import Tensor

from sdcli.text.editing import ScheduledCond


@dataclass(frozen=True)
class Cond:
    context: Tensor | None  # (B, T, D) cross-attention tokens (77 per prompt chunk)
    y: Tensor | None = None  # (B, adm) vector for the UNet's label_emb (SDXL: pooled text + size/crop embeddings)
    concat: Tensor | None = None  # (B, C, h, w) channels after the latent's (inpainting: mask + masked-image latent)
    # ControlNet: the job's units (control.ControlSet), turned into residuals inside each UNet call (they depend
    # on x and t); not a tensor, so batching passes it through and `cat` lets it join its CFG halves itself
    control: Any = None
    # (B, P) pooled text (SDXL's bigG), carried from the prompt encoding until the family's size vector turns it
    # into `y` (pipeline.with_size_vector); never given to the UNet itself
    pooled: Tensor | None = None
    # (B,) the strength of a guidance-distilled network (FLUX dev), an input of every call
    guidance: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> Cond:
        """`fn` applied to every tensor held (tuples element-wise); absent fields stay None."""
        return replace(self, **{f.name: _apply(fn, getattr(self, f.name)) for f in fields(self)})

    def unet_kwargs(self, sigma: Tensor | None = None) -> dict[str, Any]:
        """The optional UNet arguments, only those present; `control` as it stands at noise level `sigma`."""
        control = self.control.at(sigma) if hasattr(self.control, "at") and sigma is not None else self.control
        present = (("y", self.y), ("guidance", self.guidance), ("control", control))
        return {name: value for name, value in present if value is not None}

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    def layout(self) -> tuple:
        """Shapes of every field without the batch: two Conds batch together when their layouts are equal."""
        return tuple(_shapes(getattr(self, f.name)) for f in fields(self))


def _apply(fn, value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(fn(v) for v in value)
    return fn(value) if isinstance(value, Tensor) else value  # a ControlSet holds no batch


def _shapes(value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(tuple(v.shape[1:]) for v in value)
    return tuple(value.shape[1:]) if isinstance(value, Tensor) else value.layout()


def as_cond(value) -> Cond:
    """A Cond from a Cond or a bare context tensor (or None, for a UNet that ignores its conditioning)."""
    return value if isinstance(value, Cond) else Cond(value)


def cat(conds: list[Cond]) -> Cond:
    """Field by field concatenation along the batch (CFG's [uncond; cond])."""
    out = {}
    for f in fields(Cond):
        values = [getattr(c, f.name) for c in conds]
        if all(v is None for v in values):
            out[f.name] = None
        elif isinstance(values[0], tuple):
            out[f.name] = tuple(torch.cat(parts) for parts in zip(*values))
        elif not isinstance(values[0], Tensor):
            out[f.name] = type(values[0]).cat(values)  # a ControlSet: records which rows are which half
        else:
            out[f.name] = torch.cat(values)
    return Cond(**out)


def conditioning(value, concat: Tensor | None = None):
    """Cond(s) from what the text encoding gave (a tensor, a Cond, or a prompt-editing schedule of them), with the
    `concat` channels attached to every entry (the inpainting model's mask and masked image)."""
    if isinstance(value, ScheduledCond):
        return ScheduledCond(tuple((end, conditioning(c, concat)) for end, c in value.entries))
    cond = as_cond(value)
    return cond if concat is None else replace(cond, concat=concat)


def for_batch(value, batch: int, device: torch.device, sigmas: Tensor | None = None):
    """Conditioning of one image (batch 1), or a schedule of it, expanded to `batch` images on `device`; a
    ControlNet set is told the pass's `sigmas` (it counts steps by them)."""
    if isinstance(value, ScheduledCond):
        return ScheduledCond(tuple((end, for_batch(c, batch, device, sigmas)) for end, c in value.entries))
    cond = as_cond(value).map(lambda t: t.expand(batch, *t.shape[1:]).to(device))
    if sigmas is not None and hasattr(cond.control, "for_pass"):
        cond = replace(cond, control=cond.control.for_pass(sigmas))
    return cond
