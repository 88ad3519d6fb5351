"""Session-scoped tiny random checkpoints, shared by every test file that needs a model.

Use in a test module with ``from _fixtures_models import tiny_sd1, tiny_sd2_diffusers  # noqa: F401``
(pytest puts tests/ on sys.path). Each fixture returns a Path; files are generated once per session into a
temp dir by scripts/make_checkpoint.py (seed 0, fp32), never committed.

- tiny_sd1 / tiny_sd2: single-file LDM .safetensors (SD2 with OpenCLIP text keys, marked v-prediction
  through ``modelspec.prediction_type`` metadata, since random weights cannot pass the v probe reliably)
- tiny_sd1_diffusers / tiny_sd2_diffusers: diffusers folders (model_index.json, unet/, vae/, text_encoder/,
  scheduler/ with prediction_type) holding the SAME weights as the single files.
Shapes: UNet 32 (SD2: 64) model channels, mult (1, 2), 2 res blocks, attention on level 0 only,
context 64; VAE ch 32, mult (1, 1, 2, 2) so latents are image/8; CLIP width 64, 2 layers (SD2 file: 3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from make_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


def _make(folder: Path, name: str, **kw) -> Path:
    out = folder / name
    if not out.exists():
        make_checkpoint(out, size="tiny", seed=0, **kw)
    return out


@pytest.fixture(scope="session")
def tiny_sd1(tiny_models_dir: Path) -> Path:
    return _make(tiny_models_dir, "tiny_sd1.safetensors", family="sd1", layout="single")


@pytest.fixture(scope="session")
def tiny_sd2(tiny_models_dir: Path) -> Path:
    return _make(tiny_models_dir, "tiny_sd2.safetensors", family="sd2", layout="single", prediction="v")


@pytest.fixture(scope="session")
def tiny_sd1_diffusers(tiny_models_dir: Path) -> Path:
    return _make(tiny_models_dir, "tiny_sd1_diffusers", family="sd1", layout="diffusers", prediction="eps")


@pytest.fixture(scope="session")
def tiny_sd2_diffusers(tiny_models_dir: Path) -> Path:
    return _make(tiny_models_dir, "tiny_sd2_diffusers", family="sd2", layout="diffusers", prediction="v")
