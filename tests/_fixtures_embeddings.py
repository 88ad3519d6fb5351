"""Random textual-inversion files in every format sdcli reads, for tests.

``write_embedding(path, fmt, vectors)`` writes `vectors` ({"*": (n, d)} or {"clip_l": ..., "clip_g": ...}) as:
``a1111_pt`` (A1111's dict with string_to_param), ``old_pt`` (the same with a torch.nn.ParameterDict, as very old
files), ``emb_params`` (kohya .safetensors), ``diffusers_bin`` / ``diffusers_st`` (learned_embeds {token: tensor},
1-D when n == 1), ``sdxl`` (clip_l/clip_g .safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def random_vectors(n: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write_embedding(path: Path, fmt: str, vectors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = vectors.get("*")
    if fmt == "a1111_pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(t.clone())},
                    "name": path.stem, "step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "model"}, path)
    elif fmt == "old_pt":
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(t.clone())})
        torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    elif fmt == "emb_params":
        save_file({"emb_params": t.contiguous()}, str(path))
    elif fmt in ("diffusers_bin", "diffusers_st"):
        value = t[0].clone() if t.shape[0] == 1 else t.clone()
        if fmt == "diffusers_bin":
            torch.save({"<my-token>": value}, path)
        else:
            save_file({"<my-token>": value.contiguous()}, str(path))
    elif fmt == "sdxl":
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(path))
    else:
        raise ValueError(fmt)
    return path
