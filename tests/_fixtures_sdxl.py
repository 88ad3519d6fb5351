"""Session-scoped tiny random SDXL single files (scripts/make_checkpoint.py, seed 0, fp32), and helpers that
build our networks from them without the checkpoint loader (module attribute paths = the file's keys).

Use with ``from _fixtures_sdxl import tiny_sdxl, tiny_sdxl_refiner  # noqa: F401``.
Shapes (make_checkpoint.SDXL_PRESETS): UNet 64 model channels, mult (1, 2, 2) (refiner (1, 2, 2, 2)), no
attention at level 0, depths (0, 1, 2) (refiner 2), 64-channel heads; CLIP-L width 64 and bigG width 128 with a
128 -> 96 projection, 3 layers each; y = 96 + 6 x 8 (refiner 96 + 5 x 8); VAE as the SD tiny one, scale 0.13025.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from make_checkpoint import make_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from sdcli.models import UNetModel
from sdcli.models.unet import infer_unet_config

UNET_PREFIX = "model.diffusion_model."


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir: Path) -> Path:
    return make_checkpoint(tiny_sdxl_dir / "tiny_sdxl.safetensors", family="sdxl", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tiny_sdxl_dir: Path) -> Path:
    return make_checkpoint(tiny_sdxl_dir / "tiny_sdxl_refiner.safetensors", family="sdxl-refiner", size="tiny",
                           seed=1)  # fmt: skip


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def our_unet(path: Path) -> UNetModel:
    """Our UNet with the config inferred from the file's shapes and the file's weights, loaded strictly."""
    unet = UNetModel(infer_unet_config(header_shapes(path), UNET_PREFIX, head_dim=64))
    state = {k[len(UNET_PREFIX):]: v for k, v in load_file(path).items() if k.startswith(UNET_PREFIX)}
    unet.load_state_dict(state, strict=True)
    return unet.eval()
