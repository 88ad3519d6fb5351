"""Model ids: a local file or folder, or a Hugging Face hub id fetched (safetensors only) into the HF cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sdcli.runtime.errors import ModelNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | Path, patterns: list[str]) -> Path:
    """A local file/folder, or a hub id (``owner/name``) fetched into / found in the HF cache. `patterns`: the files
    to fetch (the families' hub patterns, see families.hub_patterns)."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    text = str(model)
    if not _HUB_ID.match(text) or text.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        raise ModelNotFoundError(f"{text}: no such file or folder (pass a .safetensors file, a diffusers folder "
                                 "or a hub id like stable-diffusion-v1-5/stable-diffusion-v1-5)")  # fmt: skip
    return _hub_snapshot(text, patterns)


def _hub_snapshot(repo_id: str, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # comes with transformers, but be explicit if it is gone
        raise ModelNotFoundError(f"{repo_id}: huggingface_hub is not installed; pass a local path instead") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:  # offline/cold cache, network, gated or missing repo: one clear message
        why = "offline (HF_HUB_OFFLINE=1) and not in the HF cache" if offline else _first_sentence(e)
        raise ModelNotFoundError(
            f"{repo_id}: could not get the model ({why}); download it when online, or pass a local "
            ".safetensors file or diffusers folder with --model PATH"
        ) from e
    if not ((folder / "unet").is_dir() or (folder / "transformer").is_dir()):
        raise ModelNotFoundError(f"{repo_id}: the hub snapshot at {folder} has no unet/ or transformer/ safetensors "
                                 "weights")
    return folder


def _first_sentence(e: Exception, limit: int = 160) -> str:
    """`Type: first line of the message`, cut at a word boundary: hub errors are long and multi-line."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}"
