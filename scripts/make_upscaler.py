"""Random-weight upscaler files (ESRGAN / RRDBNet in its three key layouts, Real-ESRGAN Compact), deterministic
from a seed, for tests and benchmarks.

    python scripts/make_upscaler.py OUT.safetensors --arch rrdb --layout old --blocks 23 --features 64
    python scripts/make_upscaler.py OUT.pth --arch compact --convs 16 --features 64 --scale 4

Random init alone gives a near-constant image (the 0.2 residual scaling and PyTorch's default init shrink the
signal), which would hide errors: the last conv is rescaled so every output channel has mean 0.5 and standard
deviation 0.25 on a smooth test image (RRDBNet), or so the residual over the nearest-upsampled input has
standard deviation 0.1 (Compact, whose PReLU slopes are also drawn, 0.05 to 0.4).
Layouts: ``basicsr`` (Real-ESRGAN names, saved in a .pth as {"params_ema": ...} like Real-ESRGAN's files),
``old`` (the original ESRGAN Sequential, model.N: 4x-UltraSharp and most community models), ``2019``
(xinntao/ESRGAN's RRDB_trunk / trunk_conv / upconv / HRconv: BSRGAN, RealSR). The old-layout names are written
out here independently of sdcli's rename table, and spandrel's strict load of its old-arch model checks them.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdcli.models.esrgan import CompactConfig, RRDBConfig, RRDBNet, SRVGGNetCompact


def smooth_image(h: int, w: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A picture-like input (1, C, h, w) in [0, 1]: low-frequency colour plus some fine noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, channels, max(2, h // 4), max(2, w // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (0.8 * x + 0.2 * torch.rand(1, channels, h, w, generator=g)).clamp(0, 1)


def rrdb_state(cfg: RRDBConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """An RRDBNet's weights under BasicSR names, outputs about N(0.5, 0.25^2) per channel."""
    torch.manual_seed(seed)
    net = RRDBNet(cfg).eval()
    last = net.conv_last
    with torch.no_grad():
        out = net(smooth_image(24, 20, cfg.image_channels, seed=99))  # (1, C', H, W)
        k = 0.25 / out.std((0, 2, 3))
        centre = out.mean((0, 2, 3)) - last.bias  # the conv's output before its bias
        last.weight.mul_(k[:, None, None, None])
        last.bias.copy_(0.5 - k * centre)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def compact_state(cfg: CompactConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Compact model's weights (``body.N``), its residual about 0.1 and PReLU slopes that matter."""
    torch.manual_seed(seed)
    net = SRVGGNetCompact(cfg).eval()
    last = net.body[-1]
    x = smooth_image(24, 20, cfg.in_channels, seed=99)
    with torch.no_grad():
        for m in net.body:
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.4)
        k = 0.1 / (net(x) - torch.nn.functional.interpolate(x, scale_factor=cfg.scale, mode="nearest")).std()
        last.weight.mul_(k)
        last.bias.mul_(k)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def old_layout(state: dict, cfg: RRDBConfig) -> dict:
    """BasicSR names -> the original ESRGAN Sequential: model.0 conv_first, model.1.sub.N the trunk (convs with
    an activation carry ".0"; the last entry, N = blocks, is conv_body), conv_upI at model.3I, conv_hr at
    model.3n+2, conv_last at model.3n+4."""
    n, out = cfg.num_upsamples, {}
    for key, v in state.items():
        name, _, kind = key.rpartition(".")
        if name.startswith("body."):
            _, b, rdb, conv = name.split(".")
            new = f"model.1.sub.{b}.RDB{rdb[-1]}.{conv}.0"
        elif name.startswith("conv_up"):
            new = f"model.{3 * int(name[7:])}"
        else:
            new = {"conv_first": "model.0", "conv_body": f"model.1.sub.{cfg.num_blocks}",
                   "conv_hr": f"model.{3 * n + 2}", "conv_last": f"model.{3 * n + 4}"}[name]  # fmt: skip
        out[f"{new}.{kind}"] = v
    return out


def layout_2019(state: dict) -> dict:
    """BasicSR names -> xinntao/ESRGAN's 2019 names (BSRGAN, RealSR)."""

    def rename(key: str) -> str:
        if key.startswith("body."):
            _, b, rdb, rest = key.split(".", 3)
            return f"RRDB_trunk.{b}.RDB{rdb[-1]}.{rest}"
        for ours, theirs in (("conv_body.", "trunk_conv."), ("conv_hr.", "HRconv."), ("conv_up", "upconv")):
            if key.startswith(ours):
                return theirs + key[len(ours):]
        return key

    return {rename(k): v for k, v in state.items()}


def write(state: dict, path: Path, wrapper: str | None = None, legacy: bool = False) -> Path:
    """A .safetensors file, or a .pth as training code writes it: torch.save of an OrderedDict (a module's
    state_dict), optionally nested under `wrapper`; `legacy`: the pre-zip pickle format of 2018-era files."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        state = OrderedDict(state)
        torch.save({wrapper: state} if wrapper else state, path, _use_new_zipfile_serialization=not legacy)
    return path


def write_rrdb(path: Path, cfg: RRDBConfig, layout: str = "basicsr", seed: int = 0) -> Path:
    state = rrdb_state(cfg, seed)
    state = {"basicsr": state, "old": old_layout(state, cfg), "2019": layout_2019(state)}[layout]
    return write(state, path, "params_ema" if layout == "basicsr" else None)


def write_compact(path: Path, cfg: CompactConfig, seed: int = 0) -> Path:
    return write(compact_state(cfg, seed), path, "params")  # realesr-general-x4v3.pth nests under "params"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help=".safetensors or .pth")
    p.add_argument("--arch", choices=["rrdb", "compact"], default="rrdb")
    p.add_argument("--layout", choices=["basicsr", "old", "2019"], default="basicsr", help="RRDBNet key names")
    p.add_argument("--blocks", type=int, default=23, help="RRDB blocks")
    p.add_argument("--convs", type=int, default=16, help="Compact body convs")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--scale", type=int, default=4, help="x4 (RRDB: 2 upsamplings; x2/x1 by pixel-unshuffle)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.arch == "compact":
        write_compact(a.out, CompactConfig(num_features=a.features, num_convs=a.convs, scale=a.scale), a.seed)
    else:
        if a.scale not in (1, 2, 4):
            p.error("RRDBNet files here are x4, or x2/x1 by Real-ESRGAN's pixel-unshuffle")
        unshuffle = 4 // a.scale
        cfg = RRDBConfig(in_channels=3 * unshuffle**2, num_features=a.features, num_blocks=a.blocks,
                         unshuffle=unshuffle)
        write_rrdb(a.out, cfg, a.layout, a.seed)
    print(a.out)


if __name__ == "__main__":
    main()
