"""Tileable output (A1111's "Tiling"): while `seamless` is active, every padded convolution of the UNet and the
VAE pads circularly, so the picture wraps around at its edges. Moved out of pipeline.py, which re-exports
`seamless`."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from sdcli.runtime import cuda_graphs


@contextmanager
def seamless(models, enabled: bool = True):
    """Tileable output: every padded convolution of the UNet and the VAE pads circularly while inside, so the
    picture wraps around at its edges (A1111's "Tiling"). Attention and GroupNorm are global, so with it the
    networks commute with circular shifts. A part built inside (residency lean/offload) gets the padding too;
    the modules still in memory are restored on exit."""
    if not enabled:
        yield
        return
    padding = _CircularPadding()
    models.parts.watch("seamless", padding)
    try:
        yield
    finally:
        models.parts.unwatch("seamless")
        padding.undo()


class _CircularPadding:
    """The residency watcher of `seamless`: pads the UNet's and the VAE's convolutions circularly as they are
    in memory or built, remembering each one's mode until undone."""

    def __init__(self):
        self.saved: dict[str, tuple] = {}  # part -> (its modules, [(conv, its mode before)])

    def built(self, part: str, modules: tuple) -> None:
        if part not in ("unet", "vae"):
            return
        convs = [m for module in modules for m in module.modules()
                 if isinstance(m, torch.nn.Conv2d) and any(p > 0 for p in m.padding)]
        self.saved[part] = (modules, [(m, m.padding_mode) for m in convs])
        for m in convs:
            m.padding_mode = "circular"  # Conv2d pads with F.pad(mode=padding_mode) when it is not "zeros"
        self._forget_graphs(part, modules)

    def released(self, part: str, modules: tuple) -> None:
        self.saved.pop(part, None)

    def undo(self) -> None:
        for part, (modules, convs) in self.saved.items():
            for m, mode in convs:
                m.padding_mode = mode
            self._forget_graphs(part, modules)
        self.saved.clear()

    @staticmethod
    def _forget_graphs(part: str, modules: tuple) -> None:
        if part == "unet":
            cuda_graphs.forget(modules[0])  # a captured graph keeps the padding it was captured with
