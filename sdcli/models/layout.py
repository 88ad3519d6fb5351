"""Memory layout of the convolutional models: channels_last where it measured faster, contiguous elsewhere.

On a CPU in bf16 (oneDNN, AVX512-BF16/AMX) channels_last convolutions run 1.1-2.5x faster than contiguous ones
(docs/benchmarks.md: UNet ResBlocks 0.78-0.90x the time, 1x1 projections 0.4x, VAE decode 0.93x). In fp32 on an
x86-64 CPU too, since issue 31's round 4 (Zen 3, AVX2, alternated in one process): the UNet call a median 0.94x
and 0.97x in two runs (1.04x in a third, the machine drifting), with every large 3x3 convolution on a packed weight (packed_conv.py: oneDNN's brgemm kernel, what OpenVINO runs; the
transformer blocks' reshapes to tokens become free), the VAE decode ~0.86x, ESRGAN 0.7-0.9x. The fp32 results move
by a few ulp (another summation order of the same convolutions; ~4e-6 of a UNet call's largest value). On CUDA it
was slower, and an Arm CPU was not measured: those stay contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdcli.runtime.device import is_channels_last, prefers_channels_last

CHANNELS_LAST = torch.channels_last


def wants_channels_last(x: Tensor) -> bool:
    return prefers_channels_last(x.device, x.dtype)


def run_layout(module: nn.Module, x: Tensor) -> Tensor:
    """`x` in the layout `module` runs fastest in; the first channels_last call also converts the module's conv
    weights, once (a weight replaced later, by a LoRA merge, keeps working in either layout, only slower)."""
    if not wants_channels_last(x):
        return x
    if not getattr(module, "_channels_last", False):
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors even when called under inference
            module.to(memory_format=CHANNELS_LAST)
        module._channels_last = True
    return x.contiguous(memory_format=CHANNELS_LAST)


def same_layout(t: Tensor, like: Tensor) -> Tensor:
    """`t` in the memory format of `like` (a copy only when they differ): channels_last maps stay channels_last,
    and a contiguous run keeps its convolutions on contiguous inputs (the same fp32 bytes as ever)."""
    return t.contiguous(memory_format=CHANNELS_LAST if is_channels_last(like) else torch.contiguous_format)

