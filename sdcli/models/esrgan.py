"""ESRGAN-family super-resolution networks in plain PyTorch: RRDBNet (ESRGAN, Real-ESRGAN x4plus/x2plus,
4x-UltraSharp, BSRGAN, ...) and SRVGGNetCompact (Real-ESRGAN Compact: realesr-general-x4v3, animevideov3).

Module attribute paths are the Real-ESRGAN / BasicSR tensor names (``conv_first``, ``body.N.rdb1.conv1``,
``conv_body``, ``conv_up1``, ``conv_hr``, ``conv_last``; ``body.N`` for Compact). The two other RRDBNet layouts
in the wild are renamed to these by the tables in ``sdcli.upscale.files``. Hyperparameters come from tensor
shapes (``rrdb_config``, ``compact_config``), mirroring spandrel's ``architectures/ESRGAN`` and ``Compact``.

Both take an image (B, C, H, W) in [0, 1], RGB order (as the models were trained: BasicSR and xinntao/ESRGAN
convert OpenCV's BGR to RGB before the network), and return (B, C', sH, sW), not clamped.

Sources: https://github.com/XPixelGroup/BasicSR/blob/master/basicsr/archs/rrdbnet_arch.py,
https://github.com/XPixelGroup/BasicSR/blob/master/basicsr/archs/srvgg_arch.py,
https://github.com/chaiNNer-org/spandrel (``architectures/ESRGAN``, ``architectures/Compact``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdcli.runtime.errors import BadInputError
from sdcli.models.layout import run_layout

LEAKY_SLOPE = 0.2  # every LeakyReLU of RRDBNet (BasicSR: negative_slope=0.2)
RESIDUAL_SCALE = 0.2  # RDB and RRDB add their residual scaled by 0.2 (ESRGAN paper, "residual scaling")


def _conv(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1)


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad bottom/right to a multiple of `multiple`: reflected (as Real-ESRGAN and spandrel do), replicated where
    the image is too small to reflect that far (spandrel's ``pad_tensor``)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    rh, rw = min(ph, h - 1), min(pw, w - 1)
    x = F.pad(x, (0, rw, 0, rh), mode="reflect")
    return F.pad(x, (0, pw - rw, 0, ph - rh), mode="replicate") if (ph - rh or pw - rw) else x


# --- RRDBNet ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int = 3  # of conv_first: image channels x unshuffle^2
    out_channels: int = 3
    num_features: int = 64
    num_blocks: int = 23
    growth: int = 32  # channels each dense conv adds (BasicSR num_grow_ch)
    num_upsamples: int = 2  # nearest x2 + conv, each (conv_up1, conv_up2, ...)
    unshuffle: int = 1  # pixel-unshuffle of the input: Real-ESRGAN x2plus 2, x1 4

    @property
    def scale(self) -> int:
        return 2**self.num_upsamples // self.unshuffle

    @property
    def image_channels(self) -> int:
        return self.in_channels // self.unshuffle**2


# BasicSR rrdbnet_arch.py ResidualDenseBlock
class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each fed the concatenation of the block input and every earlier conv's output."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.conv1 = _conv(features, growth)
        self.conv2 = _conv(features + growth, growth)
        self.conv3 = _conv(features + 2 * growth, growth)
        self.conv4 = _conv(features + 3 * growth, growth)
        self.conv5 = _conv(features + 4 * growth, features)

    def forward(self, x: Tensor) -> Tensor:  # (B, F, H, W)
        x1 = _lrelu(self.conv1(x))  # (B, G, H, W)
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))  # (B, F, H, W)
        return x5 * RESIDUAL_SCALE + x


# BasicSR rrdbnet_arch.py RRDB
class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, their result scaled and added to the input."""

    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


# BasicSR rrdbnet_arch.py RRDBNet (plus its x2/x1 pixel-unshuffle input; spandrel RRDB.py for the padding)
class RRDBNet(nn.Module):
    def __init__(self, cfg: RRDBConfig):
        super().__init__()
        f = cfg.num_features
        self.cfg = cfg
        self.conv_first = _conv(cfg.in_channels, f)
        self.body = nn.Sequential(*(RRDB(f, cfg.growth) for _ in range(cfg.num_blocks)))
        self.conv_body = _conv(f, f)
        for i in range(1, cfg.num_upsamples + 1):
            self.add_module(f"conv_up{i}", _conv(f, f))
        self.conv_hr = _conv(f, f)
        self.conv_last = _conv(f, cfg.out_channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [0, 1]
        h, w = x.shape[-2:]
        x = run_layout(self, x)
        if self.cfg.unshuffle > 1:  # (B, C*u*u, H/u, W/u): the x4 body then makes x4/u
            x = F.pixel_unshuffle(pad_to_multiple(x, self.cfg.unshuffle), self.cfg.unshuffle)
        feat = self.conv_first(x)  # (B, F, h, w)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.cfg.num_upsamples + 1):
            up = getattr(self, f"conv_up{i}")
            feat = _lrelu(up(F.interpolate(feat, scale_factor=2, mode="nearest")))  # (B, F, 2h, 2w)
        out = self.conv_last(_lrelu(self.conv_hr(feat)))  # (B, C', H*s, W*s) (+ padding)
        return out[..., : h * self.cfg.scale, : w * self.cfg.scale]


def _indices(shapes: dict, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return sorted(found)


def _need(shapes: dict, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the {what}: tensor {key!r} is missing")
    return tuple(shapes[key])


def rrdb_config(shapes: dict[str, tuple[int, ...]]) -> RRDBConfig:
    """An RRDBNet's config from its tensor shapes under our (Real-ESRGAN) names. A pixel-unshuffle input is
    recognised as spandrel does: conv_first takes 4x or 16x the channels conv_last makes."""
    first = _need(shapes, "conv_first.weight", "ESRGAN model")
    last = _need(shapes, "conv_last.weight", "ESRGAN model")
    growth = _need(shapes, "body.0.rdb1.conv1.weight", "ESRGAN model")[0]
    blocks = _indices(shapes, r"body\.(\d+)\.")
    ups = _indices(shapes, r"conv_up(\d+)\.weight$")
    if ups != list(range(1, len(ups) + 1)):
        raise BadInputError(f"unusual ESRGAN upsampling convs conv_up{ups} (expected conv_up1, conv_up2, ...)")
    c_in, c_out = first[1], last[0]
    unshuffle = int(math.isqrt(c_in // c_out)) if c_in in (4 * c_out, 16 * c_out) else 1
    if 2 ** len(ups) < unshuffle:
        raise BadInputError(f"ESRGAN model unshuffles its input by {unshuffle} but upsamples only x{2 ** len(ups)}")
    return RRDBConfig(in_channels=c_in, out_channels=c_out, num_features=first[0], num_blocks=blocks[-1] + 1,
                      growth=growth, num_upsamples=len(ups), unshuffle=unshuffle)  # fmt: skip


# --- SRVGGNetCompact ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_features: int = 64
    num_convs: int = 16  # body convs between the first and the last (each followed by a PReLU)
    scale: int = 4

    @property
    def image_channels(self) -> int:
        return self.in_channels


# BasicSR srvgg_arch.py SRVGGNetCompact (act_type "prelu", the only one the released weights use)
class SRVGGNetCompact(nn.Module):
    """conv + PReLU, `num_convs` x (conv + PReLU), a conv to C'*s*s channels, pixel shuffle; the nearest-upsampled
    input is added, so the network learns the residual."""

    def __init__(self, cfg: CompactConfig):
        super().__init__()
        f = cfg.num_features
        self.cfg = cfg
        layers: list[nn.Module] = [_conv(cfg.in_channels, f), nn.PReLU(f)]
        for _ in range(cfg.num_convs):
            layers += [_conv(f, f), nn.PReLU(f)]
        layers.append(_conv(f, cfg.out_channels * cfg.scale**2))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [0, 1]
        x = run_layout(self, x)
        out = F.pixel_shuffle(self.body(x), self.cfg.scale)  # (B, C', sH, sW)
        return out + F.interpolate(x, scale_factor=self.cfg.scale, mode="nearest")


def compact_config(shapes: dict[str, tuple[int, ...]]) -> CompactConfig:
    """Config from shapes: body.0 gives input channels and width; the last conv's channels = C' * scale^2, split
    as spandrel's ``get_scale_and_output_channels`` does (C' the input channels, else 3, 4 or 1)."""
    first = _need(shapes, "body.0.weight", "Compact model")
    last_index = _indices(shapes, r"body\.(\d+)\.")[-1]
    if last_index % 2:
        raise BadInputError(f"unusual Compact model: its last layer body.{last_index} is not a conv")
    width = _need(shapes, f"body.{last_index}.weight", "Compact model")[0]
    c_in = first[1]
    for c_out in (c_in, 3, 4, 1):
        scale = math.isqrt(width // c_out)
        if width % c_out == 0 and scale * scale * c_out == width:
            return CompactConfig(in_channels=c_in, out_channels=c_out, num_features=first[0],
                                 num_convs=(last_index - 2) // 2, scale=scale)  # fmt: skip
    raise BadInputError(f"Compact model: its last conv's {width} channels are not channels x scale^2")
