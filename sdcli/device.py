"""Device and dtype choice: `auto` picks CUDA+fp16, then MPS+fp16, then the CPU with bf16 where the CPU computes
bf16 natively (AVX512-BF16 or AMX), else fp32. fp16 on a CPU is never chosen: it runs ~300x slower there."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import UsageError

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" | "cuda" | "mps"
    dtype_name: str  # "fp32" | "bf16" | "fp16"

    @property
    def dtype(self):
        import torch

        return getattr(torch, DTYPE_NAMES[self.dtype_name])


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists AVX512-BF16 or AMX-BF16 (Linux x86); False where we cannot tell."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool({"avx512_bf16", "amx_bf16"} & flags)
    return False


def _available(device: str) -> bool:
    import torch

    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return device == "cpu"


def choose(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve `auto` values; UsageError when an explicit device is not there."""
    if device == "auto":
        device = next(d for d in ("cuda", "mps", "cpu") if _available(d))
    elif not _available(device):
        raise UsageError(f"--device {device} was asked for but is not available here (try --device cpu)")
    if dtype == "auto":
        if device in ("cuda", "mps"):
            dtype = "fp16"
        else:
            dtype = "bf16" if cpu_has_native_bf16() else "fp32"
    return Placement(device, dtype)


def configure(placement: Placement) -> None:
    """fp32 on CUDA means fp32: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default, which moves
    fp32 results ~1e-3 off the CPU's. Whoever asks for fp32 asks for that precision, so TF32 is turned off then."""
    import torch

    if placement.device == "cuda" and placement.dtype_name == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
