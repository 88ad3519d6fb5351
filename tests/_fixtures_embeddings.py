"""Random textual-inversion files in every format sdcli reads, for tests: the writers live in
scripts/make_extras.py (also behind `scripts/make_checkpoint.py --kind embedding`), re-exported here.

``write_embedding(path, fmt, vectors)`` writes `vectors` ({"*": (n, d)} or {"clip_l": ..., "clip_g": ...}) as:
``a1111_pt`` (A1111's dict with string_to_param), ``old_pt`` (the same with a torch.nn.ParameterDict, as very old
files), ``emb_params`` (kohya .safetensors), ``diffusers_bin`` / ``diffusers_st`` (learned_embeds {token: tensor},
1-D when n == 1), ``sdxl`` (clip_l/clip_g .safetensors).
"""

from make_extras import random_vectors, write_embedding

__all__ = ["random_vectors", "write_embedding"]
