"""Device and dtype choice: `auto` picks CUDA+fp16, then MPS+fp16, then the CPU with bf16 where the CPU computes
bf16 natively (AVX512-BF16 or AMX), else fp32. fp16 on a CPU is never chosen: it runs ~300x slower there."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sdcli.runtime.errors import UsageError

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" | "cuda" | "mps"
    dtype_name: str  # "fp32" | "bf16" | "fp16"

    @property
    def dtype(self):
        import torch

        return getattr(torch, DTYPE_NAMES[self.dtype_name])


# Forces the CPU's bf16 answer, for running the whole suite as if `auto` had resolved the other way here:
# SDCLI_CPU_BF16=1 (as on AVX512-BF16/AMX machines) or 0 (as on AVX2-only ones). Unset: read the CPU.
FORCE_BF16_ENV = "SDCLI_CPU_BF16"
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 flags in /proc/cpuinfo


def native_bf16_from_cpuinfo(text: str | None) -> bool:
    """Whether a /proc/cpuinfo text lists a native bf16 unit. None (no such file: macOS, Windows) and ARM's
    `Features:` lines count as no: torch's CPU bf16 kernels are only known to beat fp32 on those x86 units."""
    for line in (text or "").splitlines():
        if line.startswith("flags"):
            return bool(NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def cpuinfo() -> str | None:
    """/proc/cpuinfo's text; None where there is none (macOS, Windows). Its readers cache what they derive."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None


def intel_cpu() -> bool:
    """Whether this is an Intel CPU (/proc/cpuinfo's vendor_id; elsewhere, Windows' processor string)."""
    text = cpuinfo()
    return "GenuineIntel" in (text if text is not None else platform.processor())


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), or when SDCLI_CPU_BF16 says so."""
    forced = os.environ.get(FORCE_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise UsageError(f"{FORCE_BF16_ENV}={forced!r}: use 1 (treat the CPU as bf16-native), 0 (as fp32-only) "
                         "or leave it unset")
    return native_bf16_from_cpuinfo(cpuinfo())


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether torch's CPU kernels run bf16 matrix products on AMX tiles (Sapphire Rapids and later), as torch
    itself decides (the CPU flag and the kernel's permission to use the tiles). Kernels tuned for AVX-512 can lose
    there to torch's own: models/unet.py picks its bf16 attention by this."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent: no AMX path
    return bool(probe and probe())


@lru_cache(maxsize=1)
def cpu_onednn() -> bool:
    """x86-64 with torch's oneDNN: where sdcli's oneDNN-specific CPU paths (packed convolutions, post-op linears)
    were measured; elsewhere (an Arm Mac's CPU) torch's own ops run."""
    import platform

    import torch

    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


@lru_cache(maxsize=1)
def cpu_onednn_bf16() -> bool:
    """cpu_onednn() with oneDNN's native bf16 kernels (AVX-512 and up: where sdcli's `auto` runs bf16)."""
    import torch

    return cpu_onednn() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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
    return Placement(device, auto_dtype(device) if dtype == "auto" else dtype)


def auto_dtype(device: str) -> str:
    """fp16 on CUDA/MPS, bf16 on a CPU with native bf16, else fp32. fp16 on a CPU is never picked: ~300x slower."""
    if device in ("cuda", "mps"):
        return "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def runs_well(device: str, dtype: str) -> bool:
    """Whether `dtype` is a sensible choice on `device`: what a replay may take from an image as it is. fp32 runs
    everywhere; fp16 only on GPUs; bf16 on CPUs with native bf16 and on CUDA cards that support it."""
    if dtype == "fp32":
        return True
    if device == "cpu":
        return dtype == "bf16" and cpu_has_native_bf16()
    if device == "cuda" and dtype == "bf16":
        import torch

        return torch.cuda.is_bf16_supported()
    return dtype == "fp16"


def replay_dtype(recorded: str | None, device: str) -> tuple[str, str | None]:
    """The dtype a replay renders in on `device` (already resolved): the recorded one when it runs well here,
    else what `auto` picks, with a one-line note naming both. No recorded dtype (A1111, ComfyUI): `auto`."""
    if recorded is None:
        return "auto", None
    if recorded in DTYPE_NAMES and runs_well(device, recorded):
        return recorded, None
    chosen = auto_dtype(device)
    return chosen, (f"the image was rendered in {recorded}, which does not run well on this {device}; "
                    f"replaying in {chosen} (pixels may differ; --dtype {recorded} forces it)")


def configure(placement: Placement, threads: int | None = None) -> None:
    """fp32 on CUDA means fp32: PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default, which moves
    fp32 results ~1e-3 off the CPU's. Whoever asks for fp32 asks for that precision, so TF32 is turned off then.
    `threads`: torch's intra-op CPU threads for the run (None: torch's default, one per core); the bytes do not
    depend on it (models/invariant.py)."""
    import torch

    if placement.device == "cuda" and placement.dtype_name == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if threads is not None:
        torch.set_num_threads(threads)
    fix_heap_threshold()


# glibc's mallopt parameters: M_TRIM_THRESHOLD (-1), free heap top kept before it is handed back;
# M_MMAP_THRESHOLD (-3), blocks above it get their own mapping, returned (and page-faulted afresh) on free.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 10  # glibc's default
SAMPLING_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: ~2 GiB, above any one activation of a step
HOLD_ENV = "SDCLI_SAMPLING_HEAP"  # 0: the pinned thresholds while sampling too (the A/B of scripts/bench_heap.py)


def fix_heap_threshold() -> bool:
    """Pin glibc's mmap threshold at 32 MB (its dynamic maximum) instead of letting it float, and its trim
    threshold at glibc's default. Floating, it rises with every freed mapping, and the heap then kept ~1.1 GB of
    freed read and reduction buffers beside the SDXL weights at the peak of a load (8.1 GB vs 7.0 GB of weights and
    libraries, measured on 2 threads; SD1.5 0.1-0.3 GB); pinned, the peak is the weights. Step time was unchanged
    (5.5 s per 512px bf16 step either way; a 4 MB threshold cost 15%). Sampling holds its heap instead
    (`sampling_heap`). No-op outside glibc. Returns whether it was set."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@contextmanager
def sampling_heap(device, hold: bool = True, blocks=()):
    """While a CPU samples, every block (up to ~2 GiB) comes from glibc's heap and the heap keeps what is freed:
    the large blocks of one UNet call (GEGLU's 84 MB projections, oneDNN's per-call weight reorders, ...) are then
    the same pages at every call instead of fresh mappings faulted in each time (512px fp32: ~1M page faults and
    2-3 s of system CPU per step before, ~0 after; the same peak RSS). Parts are read before, under the pinned
    thresholds (`fix_heap_threshold`), which come back when sampling ends, the heap trimmed. Allocation never
    changes a result's bits. `device`: the torch.device sampled on.

    `hold` False (a denoiser of GGUF blocks, or --offload: a run that chose memory) keeps the pinned thresholds (a
    held heap kept +0.25 GiB of fragments beside a full-size FLUX.1 Q4_K block at 1024 px) and trims the heap after
    each module of `blocks` (the network's blocks): left alone, the fragments one block's activations left behind
    varied from 0 to 0.24 GiB under the next block's peak (FLUX.1 Q4_K, 1024 px, fp32), which is what put that
    render over 8 GB in one run of three. SDCLI_SAMPLING_HEAP=0 keeps the pinned thresholds without trimming
    (what scripts/bench_heap.py compares)."""
    libc = _glibc()
    if libc is None or device.type != "cpu" or os.environ.get(HOLD_ENV, "1") == "0":
        yield
    elif not hold:
        def trim(*_) -> None:  # a forward hook's non-None return would replace the block's output
            trim_heap()

        hooks = [block.register_forward_hook(trim) for block in blocks]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
    else:
        global _held
        _hold_heap(libc)
        _held = True
        try:
            yield
        finally:
            _held = False
            fix_heap_threshold()
            trim_heap()


_held = False  # inside a holding sampling_heap


def _hold_heap(libc) -> None:
    libc.mallopt(M_MMAP_THRESHOLD, SAMPLING_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, SAMPLING_THRESHOLD)


@contextmanager
def pinned_heap():
    """The pinned thresholds for a moment inside a held sampling heap, for blocks made once and kept (a packed
    convolution weight, models/packed_conv.py): each large one then gets its own mapping, as do the temporaries
    made beside it, instead of heap space where the freed temporaries stay resident (+65 MB per packed
    1280x1280x3x3 weight, measured: +0.7 GB on a 512px SD1.5 render's peak)."""
    libc = _glibc()
    if libc is None or not _held:
        yield
        return
    fix_heap_threshold()
    try:
        yield
    finally:
        _hold_heap(libc)


def trim_heap() -> None:
    """Hand glibc's freed heap back to the system: it keeps what a released part or a finished stage freed
    (0.45 GB measured after two 512px bf16 steps). No-op outside glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


MADV_DONTNEED = 4  # Linux's madvise advice: the pages go back to the system now, and read as zeros if touched


def free_storage(t) -> None:
    """Free CPU tensor `t`'s storage (the caller knows no other tensor shares it), its whole pages handed back to
    the system first. A freed block under the 32 MB mmap threshold (a bf16 weight) otherwise stays a resident heap
    hole; handing back just its pages costs one madvise, where malloc_trim walks the whole heap (~10 ms each, 0.5 s
    for the 50 packed weights of SD1.5's first step)."""
    storage = t.untyped_storage()
    libc = _glibc()
    if libc is not None and t.device.type == "cpu":
        import ctypes
        import mmap

        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:  # only pages wholly inside the block: its neighbours keep theirs
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
    storage.resize_(0)


@lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (mallopt, malloc_trim), else None (macOS, musl, Windows)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


# SDCLI_CPU_CHANNELS_LAST=0 keeps CPU runs contiguous: scripts/bench.py measures the lever with it.
SWITCH_ENV = "SDCLI_CPU_CHANNELS_LAST"


def prefers_channels_last(device, dtype) -> bool:
    """Whether convolutional networks run channels_last here (models/layout.py says why): bf16 on a CPU, and fp32
    on an x86-64 CPU (oneDNN's brgemm convolutions, where it was measured)."""
    import torch

    wanted = dtype == torch.bfloat16 or (dtype == torch.float32 and cpu_onednn())
    return device.type == "cpu" and wanted and os.environ.get(SWITCH_ENV, "1") != "0"


def is_channels_last(t) -> bool:
    """A 4-D map in channels_last memory (and not also contiguous, as a 1x1 map or one channel is)."""
    import torch

    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
