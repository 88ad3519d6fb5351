"""Pickled .ckpt files, read only through torch's weights_only unpickler (no code of the file ever runs), and
their conversion to safetensors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdcli.runtime.errors import BadInputError
from sdcli.formats.safetensors import is_safetensors

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read only through load_ckpt's restricted unpickler


def looks_pickled(head: bytes) -> bool:
    """A zip (torch.save) or a raw pickle stream, from a file's first bytes."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def is_pickle(path: Path) -> bool:
    """Whether `path` is a pickle checkpoint: its first bytes say so AND it is not a valid safetensors file (whose
    8-byte header length may itself begin with 0x80, a pickle's first byte)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return looks_pickled(head) and not is_safetensors(path)


class _StateOnly:
    """Stands in for a class named in ALLOWED_CLASSES: unpickling it only records its state (a dict); no module
    is built and no code of the file runs."""

    def __setstate__(self, state: Any) -> None:
        self.state = state


class LightningCheckpointStub(_StateOnly):
    """pytorch_lightning's ModelCheckpoint callback, pickled inside old SD .ckpt files."""


class ParameterDictData(_StateOnly):
    """torch.nn.ParameterDict in very old A1111 / rinongal textual-inversion .pt files: read as its parameters."""

    @property
    def parameters(self) -> dict:
        return self.state.get("_parameters", {}) if isinstance(self.state, dict) else {}


# The only names a pickle may instantiate besides what torch's weights_only unpickler allows (tensors, dicts,
# lists, strings, numbers): data, each stood in for by a state-only class.
ALLOWED_CLASSES = {
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": LightningCheckpointStub,
    "torch.nn.modules.container.ParameterDict": ParameterDictData,
}


def load_pickle(path: str | Path, what: str = "checkpoint") -> Any:
    """A pickle file's object, read with torch's weights_only unpickler plus ALLOWED_CLASSES' stand-ins: the one
    restricted loader of sdcli. A refused global or a broken file is BadInputError naming the file and `what`."""
    path = Path(path)
    allowed = [(stub, name) for name, stub in ALLOWED_CLASSES.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=None)
    except Exception as e:  # the unpickler raises UnpicklingError, RuntimeError, EOFError...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{path}: refused or unreadable {what} pickle ({first[:200]})") from e


def load_ckpt(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a pickled .ckpt, read with the restricted loader (no arbitrary code)."""
    path = Path(path)
    obj = load_pickle(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise BadInputError(f"{path}: pickle checkpoint holds no state_dict")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def convert_ckpt(src: str | Path, dst: str | Path) -> Path:
    """Write the tensors of a .ckpt to a .safetensors file (restricted load; shared storage is cloned)."""
    from safetensors.torch import save_file

    state = load_ckpt(src)
    seen: set[int] = set()
    out = {}
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.contiguous().clone() if ptr in seen else t.contiguous()  # safetensors refuses shared memory
        seen.add(ptr)
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    try:
        save_file(out, str(tmp), metadata={"format": "pt", "converted_from": Path(src).name})
        os.replace(tmp, dst)
    except BaseException:  # a full disk or Ctrl-C must not leave a half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    return dst
