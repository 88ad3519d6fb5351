"""3x3 convolutions whose weight is packed once for oneDNN's brgemm kernel (fp32 on the CPU, small maps).

torch runs an fp32 3x3 convolution on a contiguous map through oneDNN's direct kernel in 8-channel blocks and
reorders the weight into that kernel's layout at every call: a 1280x1280x3x3 weight is 59 MB rewritten into a
freshly mapped buffer (page faults above glibc's 32 MB mmap threshold) for a convolution of 128 pixels. On the
UNet's 8x8 and 16x16 levels that reorder costs as much as the convolution itself. OpenVINO packs its weights once,
at compile time, for oneDNN's brgemm convolution (brgconv) on channels-last maps. Here the same: the weight is
packed once (`torch.ops.mkldnn._reorder_convolution_weight`) and the map runs through the brgemm convolution
(`_convolution_pointwise`), whose output is made contiguous again for the ops after it.

Where: fp32 CPU tensors, no autograd, zero padding (not `--seamless`'s circular), and maps of at most
PACKED_MAX_PIXELS pixels, where the weight outweighs the map; on larger maps the direct kernel is as fast or
faster (docs/benchmarks.md). The brgemm kernel sums in another order than the direct one: outputs move by a few
ulp (~5e-6 of the largest value), so this is a numerics change of the fp32 CPU path, switched on only by
SDCLI_CPU_PACKED_CONV=1 (see docs/benchmarks.md for what it gains). The result does not depend on the thread
count (checked at 1-4 threads, tests/test_packed_conv.py).

The packed weight is kept beside the module's weight (memory: the weights of the packed convolutions once more)
and made again when the weight is replaced (a LoRA merge puts a new Parameter), edited in place, or the input
shape changes.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor, nn

SWITCH_ENV = "SDCLI_CPU_PACKED_CONV"
PACKED_MAX_PIXELS = 256  # 16x16: at 512px the UNet's two deepest levels (1280 channels)


def packing_enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "0") == "1"


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (a 3x3 one in the UNet) that runs its small fp32 CPU maps on a weight packed once."""

    plain_conv = True  # nn.Conv2d's math: a GGUF's quantized weight replaces it with QuantizedConv2d (quant/layers.py)
    _packed: Tensor | None = None
    _packed_key: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self._packable(x):
            return super().forward(x)
        packed = self._packed_for(x)
        out = torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "",
        )  # (B, C_out, H', W'), channels_last memory
        return out.contiguous()

    def _packable(self, x: Tensor) -> bool:
        w = self.weight
        return (
            packing_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.dim() == 4 and x.shape[-2] * x.shape[-1] <= PACKED_MAX_PIXELS
            and self.padding_mode == "zeros" and isinstance(self.padding, tuple)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and type(w) in (Tensor, nn.Parameter)
        )  # fmt: skip

    def _packed_for(self, x: Tensor) -> Tensor:
        """The packed weight for this input shape, packed again when the weight tensor or its contents changed."""
        w = self.weight
        key = (tuple(x.shape), 0 if w.is_inference() else w._version)  # inference tensors keep no version
        ref = self.__dict__.get("_packed_ref")
        if self._packed is None or self._packed_key != key or ref is None or ref() is not w:
            with torch.inference_mode(False), torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                    w.detach().contiguous(), list(self.padding), list(self.stride), list(self.dilation),
                    self.groups, list(x.shape),
                )
            self._packed_key = key
            self.__dict__["_packed_ref"] = weakref.ref(w)
        return self._packed

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: the packed weight belongs to the old tensor
        self._packed = None
        return super()._apply(fn, recurse)
