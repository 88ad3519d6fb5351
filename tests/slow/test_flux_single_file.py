"""diffusers' own Flux single-file loader against our BFL -> diffusers converter, at the real width.

diffusers' `convert_flux_transformer_checkpoint_to_diffusers` hard-codes inner_dim = 3072 when it splits
``single_blocks.N.linear1``, so a tiny Flux cannot go through it: this builds a full-width but shallow FLUX.1-dev
(width 3072, 24 heads of 128, 1 double + 1 single block, T5 4096 / CLIP 768 inputs: 531 M parameters), writes it
in BFL's layout, loads it with `FluxTransformer2DModel.from_single_file` (a local config, nothing downloaded) and
checks that every tensor equals tests/test_flux_model.py's `bfl_to_diffusers`, that `config_from_shapes` reads the
file's header back, and that our model on the file's weights matches diffusers' forward.

Outside the default run (tests/conftest.py): ~45 s and ~8 GB of RAM on 2 cores.

    SDCLI_SLOW=1 .venv/bin/python -m pytest tests/slow/test_flux_single_file.py -q
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

from test_flux_model import assert_close, bfl_to_diffusers, inputs, run_both
from sdcli.models.flux import FluxConfig, FluxModel, config_from_shapes

SHALLOW_DEV = FluxConfig(depth=1, depth_single_blocks=1)  # every other hyperparameter as FLUX.1-dev


@pytest.fixture
def all_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def _random_bfl_file(path, cfg: FluxConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        names = {k: v.shape for k, v in FluxModel(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in names.items():
        r = torch.randn(shape, generator=g)
        sd[name] = 1 + 0.3 * r if name.endswith(".scale") else r / shape[1] ** 0.5 if len(shape) == 2 else 0.3 * r
    save_file(sd, str(path))
    return sd


def _config_folder(root, cfg: FluxConfig) -> str:
    (root / "transformer").mkdir()
    config = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=cfg.in_channels,
                  num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
                  num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
                  pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
                  axes_dims_rope=list(cfg.axes_dim))  # fmt: skip
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    return str(root)


def test_single_file_loader_equals_our_converter(tmp_path, all_threads):
    cfg = SHALLOW_DEV
    path = tmp_path / "flux1-dev-shallow.safetensors"
    sd = _random_bfl_file(path, cfg)
    with safe_open(str(path), "pt") as f:
        header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert config_from_shapes(header) == cfg  # head width 128: the real RoPE split by default

    ref = FluxTransformer2DModel.from_single_file(str(path), config=_config_folder(tmp_path, cfg),
                                                  subfolder="transformer", local_files_only=True,
                                                  torch_dtype=torch.float32).eval()  # fmt: skip
    theirs, ours_converted = ref.state_dict(), bfl_to_diffusers(sd, cfg)
    assert set(theirs) == set(ours_converted)
    for name, tensor in ours_converted.items():
        assert torch.equal(theirs[name], tensor), name
    del theirs, ours_converted

    ours = FluxModel(cfg).eval()
    ours.load_state_dict(sd, strict=True)
    del sd
    a, b = run_both(ours, ref, inputs(cfg, seed=1, real_ids=True, n_txt=8))
    assert_close(a, b)
