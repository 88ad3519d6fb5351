"""3x3 convolutions whose weight is packed once for oneDNN's brgemm kernel while a CPU samples (channels_last maps,
what a CPU runs in fp32 and bf16, of any size; contiguous fp32 maps when small).

torch runs an fp32 3x3 convolution on a contiguous map through oneDNN's direct kernel in 8-channel blocks and
reorders the weight into that kernel's layout at every call: a 1280x1280x3x3 weight is 59 MB rewritten (out of the
caches) for a convolution of 64 pixels. On the UNet's 8x8 and 16x16 levels that reorder costs about as much as the
convolution itself. OpenVINO packs its weights once, at compile time, for oneDNN's brgemm convolution on
channels-last maps. Here the same: the weight is packed once (`torch.ops.mkldnn._reorder_convolution_weight`) and
the map runs through the brgemm convolution (`_convolution_pointwise`), whose output comes back in the map's own
layout (contiguous in fp32) for the ops after it. Measured (Zen 3, AVX2, fp32, 512px SD1.5 UNet call, alternated in
one process): 0.84-0.89x the time; per convolution 0.67-0.91x on maps of 8x8 and 16x16 (docs/benchmarks.md).

Memory: while packed, the packed copy *is* the weight. The plain weight's storage is freed (its shape, dtype and
Parameter object stay), so a sampling run holds each weight once, as before. Packing lives only inside
`packed_convs`, which `pipeline._sample` enters: on the way out every packed convolution still alive gets its plain
weight back, bit for bit (oneDNN's reorder back to the plain layout), so LoRA merges, `.to()`, state dicts and
everything else outside sampling see an ordinary nn.Conv2d. A render's last batch opens the session around its
sampling and the lean residency's release of the UNet, so that UNet goes without being unpacked (0.6-1.4 s of a
cold 512px SD1.5 render). Only a weight that owns its whole, resizable storage is packed
(not a view into a shared or memory-mapped buffer).

channels_last maps (a CPU's fp32 and bf16 runs: layout.py; bf16 where oneDNN has bf16 kernels, AVX-512 and up):
torch's own path already runs the brgemm kernel, on a weight reordered at every call; packed once, the same bytes,
in bf16 0.45-0.79x the time per convolution on 8x8 maps, 0.76-0.96x on 16x16, 0.98-1.0x on larger ones, the UNet
call 0.94-0.97x (Zen 4). In fp32 (Zen 3, AVX2) the UNet call channels_last with every large convolution packed took
a median 0.94x and 0.97x the time of the contiguous one with the small maps packed (1.04x in a third run; oneDNN's
convolution time per call 5.4-6.2 -> 5.1-5.2 s; docs/benchmarks.md, round 4).

Where: fp32 or bf16 tensors on an x86-64 CPU (oneDNN's kernels, as measured), no autograd, zero padding (not
`--seamless`'s circular), channels_last maps of any size and contiguous fp32 maps of at most PACKED_MAX_PIXELS
pixels (on larger contiguous ones the direct kernel is as fast or faster), weights of at least PACKED_MIN_BYTES
(smaller ones stay in the caches; packing saves < 0.05 ms a call there). In fp32 the brgemm kernel sums in another
order than the direct one: outputs move by a few ulp (~3e-6 of the largest value of a UNet call, an image PSNR of
~82 dB against torch's path: far inside the bf16 guard). The result does not depend on the thread count
(tests/test_packed_conv.py, 1-4 threads). SDCLI_CPU_PACKED_CONV=0 switches it off (torch's own path, the A/B).
Calls are serialized per model (`sdcli serve` renders one request at a time), as the freed weights require.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor, nn

from sdcli.models.layout import same_layout
from sdcli.runtime.device import (cpu_onednn, cpu_onednn_bf16, free_storage, is_channels_last, pinned_heap,
                                  trim_heap)

SWITCH_ENV = "SDCLI_CPU_PACKED_CONV"
# The largest contiguous map packed, in pixels, per dtype: fp32 16x16 (at 512px the UNet's two deepest levels, 1280
# channels; a larger contiguous map runs as fast on the direct kernel), bf16 any size. channels_last maps (what a
# CPU runs in bf16 and fp32: layout.py) are packed at any size: the brgemm kernel is torch's own path for them.
PACKED_MAX_PIXELS = {torch.float32: 256, torch.bfloat16: float("inf")}
PACKED_MIN_BYTES = 1 << 20  # 1 MiB of fp32 weight (~170 channels in and out)

_session: list[weakref.ref] | None = None  # the convolutions packed inside the current packed_convs


def packing_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1") != "0" and cpu_onednn()


@contextmanager
def packed_convs(device: torch.device):
    """While a CPU samples: PackedConv2d packs its weight at its first eligible call; on the way out (also on an
    error or an interrupt) every packed weight still in use is unpacked (a module let go of meanwhile is not: its
    weights go with it). Nested uses leave the unpacking to the outermost."""
    global _session
    if device.type != "cpu" or not packing_enabled() or _session is not None:
        yield
        return
    _session = []
    try:
        yield
    finally:
        refs, _session = _session, None
        for ref in refs:
            conv = ref()
            if conv is not None:
                conv.unpack()
        if refs:
            trim_heap()  # what the packed weights and the unpacking's temporaries left in the heap


@lru_cache(maxsize=None)
def _max_pixels(dtype: torch.dtype, channels_last: bool) -> float:
    """The largest map packed (PACKED_MAX_PIXELS; any size channels_last), 0 where `dtype` is not packed: bf16
    only where oneDNN has bf16 kernels (AVX-512 and up, where sdcli's `auto` runs bf16)."""
    if dtype not in PACKED_MAX_PIXELS or (dtype == torch.bfloat16 and not cpu_onednn_bf16()):
        return 0
    return float("inf") if channels_last else PACKED_MAX_PIXELS[dtype]


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (a 3x3 one in the UNet) that runs its CPU maps (fp32 small ones, bf16 all) on a weight packed once
    per sampling."""

    plain_conv = True  # nn.Conv2d's math: a GGUF's quantized weight replaces it with QuantizedConv2d (quant/layers.py)
    _packed: Tensor | None = None  # oneDNN's packed weight; meanwhile the plain weight's storage is freed
    _packed_shape: tuple | None = None  # the input shape it was packed for

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is not None and (tuple(x.shape) != self._packed_shape or not self._packable(x)):
            self.unpack()  # another input shape in the same sampling (never in a render), or autograd
        if self._packed is None:
            if _session is None or not self._packable(x) or not _owns_storage(self.weight):
                return super().forward(x)
            self._pack(x)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "",
        )  # (B, C_out, H', W'), channels_last memory
        return same_layout(out, x)  # channels_last out of a channels_last map; contiguous out of a contiguous one

    def _packable(self, x: Tensor) -> bool:
        w = self.weight
        return (
            x.device.type == "cpu" and x.dtype == w.dtype
            and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= _max_pixels(x.dtype, is_channels_last(x))
            and w.numel() * w.element_size() >= PACKED_MIN_BYTES
            and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and type(w) in (Tensor, nn.Parameter)
        )  # fmt: skip

    def _pack(self, x: Tensor) -> None:
        w = self.weight
        with torch.inference_mode(False), torch.no_grad(), pinned_heap():  # mapped alone, freed to the system
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape),
            )
        free_storage(w)  # the packed copy is the weight now: held once, the plain one's pages given back
        self._packed_shape = tuple(x.shape)
        _session.append(weakref.ref(self))

    def unpack(self) -> None:
        """The plain weight back from the packed one (the same bits); no-op when not packed."""
        packed, self._packed = self._packed, None
        if packed is None:
            return
        w = self.weight
        plain = packed.to_dense()
        del packed
        w.untyped_storage().resize_(w.numel() * w.element_size())
        with torch.inference_mode():  # an in-place copy allowed into normal and inference tensors alike
            w.copy_(plain)

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: from the plain weight
        self.unpack()
        return super()._apply(fn, recurse)


def _owns_storage(w: Tensor) -> bool:
    """Whether freeing w's storage frees w alone: dense (contiguous or channels_last), from offset 0, the whole
    (resizable) storage, and no other tensor on it (a view or an alias kept elsewhere would lose its data while
    packed; the use count is w's reference and that of the storage object asked)."""
    s = w.untyped_storage()
    dense = w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)  # bf16 CPU weights: the latter
    return (dense and w.storage_offset() == 0 and s.nbytes() == w.numel() * w.element_size()
            and s.resizable() and torch._C._storage_Use_Count(s._cdata) <= 2)  # fmt: skip
