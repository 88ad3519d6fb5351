"""AUTOMATIC1111's noise, replayable on any device: the random numbers an image was made from, not just its seed.

A1111's webui draws all its noise from one of three sources (setting "Random number generator source"; the infotext
field `RNG: CPU` / `RNG: NV`, and no field at all for the default, GPU):

- `cpu`: torch's CPU generator (Mersenne Twister) - what sdcli has always drawn from;
- `gpu`: torch's CUDA generator, `torch.randn(shape, device="cuda", generator=g)`: cuRAND's Philox4x32-10 counter
  generator and its Box-Muller transform. A1111's default, so what most images online were made with;
- `nv`: A1111's NumPy emulation of `gpu` (modules/rng_philox.py), for machines without an NVIDIA card.

Here `nv` and `gpu` run on the CPU in NumPy integer arithmetic, so they need no CUDA and give the same numbers on
every machine; `gpu` can also use torch's own CUDA generator when the run is on CUDA (`native_cuda`).

How torch's CUDA randn lays out its numbers (torch aten/src/ATen/native/cuda/DistributionTemplates.h:
calc_execution_policy, distribution_elementwise_grid_stride_kernel, normal_and_transform; cuRAND curand_kernel.h
curand_init, curand_normal.h curand_normal4 / _curand_box_muller):
- one call launches `grid` blocks of 256 threads, grid = min(ceil(numel / 256), SMs * (max threads per SM // 256));
  stride = grid * 256 threads in all (the GPU's "thread capacity" caps it);
- thread t starts a Philox state with key = the 64-bit seed, counter = (offset_lo, offset_hi, t_lo, t_hi), where
  offset is the generator's offset in counter blocks (torch's philox_offset_per_thread / 4);
- each loop j of the thread makes one Philox block (counter word 0 = offset + j) of 4 words -> 2 Box-Muller pairs
  -> 4 normals (s1 sin v1, s1 cos v1, s2 sin v2, s2 cos v2), written to elements t + (4 j + i) * stride, i = 0..3;
- the generator's offset then moves on by the loops each thread made: ceil(numel / (4 * stride)) blocks, 1 for
  every tensor up to 4 * stride elements.
So up to `stride` elements, element n is the sine half of block (offset, thread n): exactly A1111's NV generator
(one block per element, offset + 1 per call). Past the capacity the numbers depend on the GPU model (the cosine
halves and the 2nd pair come in: pytorch/pytorch PR 176584 and issue 194676 measure it), so `cuda_threads` lets
a replay name it. An SD1 512x512 latent has 16384 elements, SDXL 1024x1024 65536: under the capacity of recent
cards (e.g. 175104 on a 4090D, 159744 on an H20, per that PR) but over an RTX 3060's 43008 (28 SMs x 1536).

Bit-exactness against real CUDA: Philox words and the element layout are exact integer arithmetic. The Box-Muller
is not: cuRAND computes it in float32 with logf and the `__sincosf` hardware approximation (absolute error about
2^-21 for |v| <= pi, more above), and rounds the uint32 to float32 before scaling; A1111's NV computes it in
float64 from the same float32 constants and rounds once. The two agree to about 1e-6 (a few float32 ulps), not
bit for bit; the published CUDA outputs checked in tests/test_rng.py agree to their 4 printed decimals. This module
computes the Box-Muller as NV does, so `gpu` (emulated) == `nv` bit for bit wherever their layouts agree.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from sdcli.runtime.errors import UsageError, quote
from sdcli.sampling.a1111_params import SOURCES  # noqa: F401 - the source names, kept with A1111's other rules
from sdcli.sampling.seeds import batch_seeds  # noqa: F401 - re-exported

# Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), as cuRAND's
# curand_philox4x32_x.h and Random123's philox.h define it.
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (Weyl) increments
_MASK32 = np.uint64(0xFFFFFFFF)
_BLOCK = 256  # torch's block_size_bound: threads per block of its random kernels

# cuRAND's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI (curand_normal_static.h) as A1111's rng_philox.py writes
# them: float32 constants, used in float64 arithmetic.
_U_SCALE = float(np.float32(2.3283064e-10))  # 2**-32 exactly
_V_SCALE = float(np.float32(2.3283064e-10 * 6.2831855))  # 2**-32 * 2 pi, rounded to float32


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 on N counters at once: counter (4, N) and key (2, N) or (2,) of uint32 -> (4, N) uint32.

    Each round multiplies counter words 0 and 2 by the round constants (32 x 32 -> 64 bits, exact in uint64) and
    mixes the high halves with the other words and the key; the key is bumped by the Weyl constants between rounds.
    """
    c = [np.asarray(word, dtype=np.uint64) for word in counter]
    k0, k1 = (np.asarray(word, dtype=np.uint64) for word in key)
    m0, m1, shift = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1]), np.uint64(32)
    for round_ in range(10):
        if round_:
            k0 = (k0 + np.uint64(_PHILOX_W[0])) & _MASK32
            k1 = (k1 + np.uint64(_PHILOX_W[1])) & _MASK32
        p0, p1 = c[0] * m0, c[2] * m1
        c = [(p1 >> shift) ^ c[1] ^ k0, p1 & _MASK32, (p0 >> shift) ^ c[3] ^ k1, p0 & _MASK32]
    return np.stack(c).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray, cosine: np.ndarray | None = None) -> np.ndarray:
    """Two uint32 words per value -> s sin v (or s cos v where `cosine`), float64, with u = (x + 1/2) 2^-32 in
    (0, 1) and v = (y + 1/2) 2^-32 2pi, s = sqrt(-2 log u): cuRAND _curand_box_muller's formula, computed in float64
    as A1111's rng_philox.box_muller does (the module docstring says how far this is from CUDA's float32)."""
    u = x.astype(np.float64) * _U_SCALE + _U_SCALE / 2
    v = y.astype(np.float64) * _V_SCALE + _V_SCALE / 2
    s = np.sqrt(-2.0 * np.log(u))
    if cosine is None:
        return s * np.sin(v)
    return s * np.where(cosine, np.cos(v), np.sin(v))


def cuda_thread_capacity(sm_count: int, max_threads_per_sm: int) -> int:
    """How many threads torch's random kernels launch at most on a GPU (torch calc_execution_policy): the
    `cuda_threads` of that GPU. Both numbers are in `torch.cuda.get_device_properties` (multi_processor_count,
    max_threads_per_multi_processor)."""
    return sm_count * (max_threads_per_sm // _BLOCK) * _BLOCK


def _launch(numel: int, cuda_threads: int | None) -> tuple[int, int]:
    """(threads launched, Philox blocks per thread) of one torch CUDA normal_ call (calc_execution_policy with
    curand_normal4's 4 values per block). `cuda_threads` None: no cap, a thread per element."""
    blocks = -(-numel // _BLOCK)
    if cuda_threads is not None:
        blocks = min(blocks, max(cuda_threads // _BLOCK, 1))
    stride = blocks * _BLOCK
    return stride, -(-numel // (4 * stride))


def _normals(seed: int, offset: int, numel: int, stride: int) -> np.ndarray:
    """The `numel` float32 normals of torch's CUDA randn kernel with `stride` threads, from counter block `offset`
    of key `seed` (module docstring; DistributionTemplates.h distribution_elementwise_grid_stride_kernel)."""
    index = np.arange(numel, dtype=np.uint64)
    loop, rest = np.divmod(index, np.uint64(4 * stride))
    part, thread = np.divmod(rest, np.uint64(stride))  # part i of the thread's float4 in this loop
    block = loop + np.uint64(offset)
    counter = (block & _MASK32, block >> np.uint64(32), thread & _MASK32, thread >> np.uint64(32))
    key = (np.uint64(seed) & _MASK32, np.uint64(seed) >> np.uint64(32))
    words = philox4x32_10(counter, key)  # (4, numel)
    second_pair = part >= 2
    x = np.where(second_pair, words[2], words[0])
    y = np.where(second_pair, words[3], words[1])
    return box_muller(x, y, cosine=(part % np.uint64(2)) == 1).astype(np.float32)


def _seed64(seed: int) -> int:
    """The 64-bit seed torch's manual_seed keeps (a negative seed wraps, as there)."""
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise UsageError(f"seed {seed} does not fit in 64 bits")
    return seed % 2**64


class NoiseGenerator(Protocol):
    def randn(self, shape: Sequence[int]) -> Tensor: ...


class PhiloxGenerator:
    """torch's CUDA generator, emulated: a 64-bit seed and an offset in Philox counter blocks. `cuda_threads` None
    is A1111's NV generator (rng_philox.Generator: a block per element, offset + 1 per call), which is also any
    GPU's output for tensors up to its thread capacity; a number emulates a GPU of that capacity
    (`cuda_thread_capacity`) for bigger tensors too."""

    def __init__(self, seed: int, cuda_threads: int | None = None):
        if cuda_threads is not None and cuda_threads < _BLOCK:
            raise UsageError(f"cuda_threads must be at least {_BLOCK}, got {cuda_threads}")
        self.seed, self.cuda_threads, self.offset = _seed64(seed), cuda_threads, 0

    def randn(self, shape: Sequence[int]) -> Tensor:
        """The next standard-normal tensor, float32 on the CPU."""
        shape = tuple(int(n) for n in shape)
        numel = math.prod(shape)
        if numel == 0:
            return torch.zeros(shape)
        stride, loops = _launch(numel, self.cuda_threads)
        values = _normals(self.seed, self.offset, numel, stride)
        self.offset += loops
        return torch.from_numpy(values.reshape(shape))


class TorchGenerator:
    """A torch.Generator drawn from with torch.randn: `cpu` on the CPU, or `gpu` natively on a CUDA device."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device).manual_seed(_seed64(seed))

    def randn(self, shape: Sequence[int]) -> Tensor:
        """The next standard-normal tensor, float32 on the generator's device."""
        shape = tuple(int(n) for n in shape)
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)


def check_source(source: str) -> str:
    """A source name in any case ("GPU" as A1111's infotext writes it) -> "cpu" / "gpu" / "nv"."""
    name = str(source).strip().lower()
    if name not in SOURCES:
        raise UsageError(f"unknown noise source {quote(repr(source), 60)}: choose one of {', '.join(SOURCES)}")
    return name


def make_generator(seed: int, source: str, cuda_threads: int | None = None,
                   native_cuda: torch.device | None = None) -> NoiseGenerator:
    """A fresh generator of `source` seeded with `seed` (A1111 rng.create_generator). `gpu` is the emulation unless
    `native_cuda` names a CUDA device, where torch's own CUDA generator draws (bit-exact with A1111 on GPUs of the
    same thread capacity, within ~1e-6 of the emulation)."""
    source = check_source(source)
    if source == "cpu":
        return TorchGenerator(seed, "cpu")
    if source == "gpu" and native_cuda is not None and torch.device(native_cuda).type == "cuda":
        return TorchGenerator(seed, native_cuda)
    return PhiloxGenerator(seed, cuda_threads if source == "gpu" else None)


def randn(seed: int, shape: Sequence[int], source: str = "cpu", cuda_threads: int | None = None) -> Tensor:
    """The first `shape` noise of a fresh `source` generator seeded with `seed`, float32 on the CPU (A1111
    rng.randn / randn_local)."""
    return make_generator(seed, source, cuda_threads).randn(shape)


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's blend of a seed's noise (`low`) with its variation seed's (`high`) at strength `val` (modules/rng.py
    slerp, after a PyTorch-forum post), its quirks kept because images depend on them:
    - norms and cosines run along dim 1 of an unbatched (C, H, W) noise, i.e. down each column: one angle per
      (channel, column);
    - when the mean cosine exceeds 0.9995 it blends linearly as low * val + high * (1 - val), the weights the other
      way round from the spherical branch (there val = 0 gives `low`)."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)  # (C, W)
    if cosine.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)  # (C, 1, W)
    high_weight = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


def paste_centred(small: Tensor, big: Tensor) -> Tensor:
    """A1111's "Resize seed from" (ImageRNG.first): the noise drawn at the other size pasted centred on the noise
    drawn at the real size, both (C, H, W); a bigger one is cropped. The offsets floor-divide the size difference,
    so an odd shrink drops the first rows/columns and leaves the last one of `big` showing, as in A1111."""
    out = big.clone()
    dy, dx = (big.shape[1] - small.shape[1]) // 2, (big.shape[2] - small.shape[2]) // 2
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


# batch_seeds (A1111's numbering of a batch) lives in sampling/seeds.py, without torch: a `--server` client plans
# its images with it and never imports torch. Kept importable from here.


class ImageNoise:
    """noise() for a batch in A1111's order (modules/rng.py ImageRNG), image k drawing only from its own seeds, so
    it equals a batch of one with image k's seeds:

    - the first call is the initial noise: seed's first draw at `shape`; with a variation, slerp'd towards the
      variation seed's first draw; with `seed_resize_from` (w, h) in pixels, drawn at that size instead (fresh
      generators) and pasted centred on the seed's first draw at `shape`;
    - each later call is one sampler draw: the next draw of image k's seed generator, or, when `ensd` (A1111's
      "Eta noise seed delta") is not 0, of a fresh generator seeded with seed + ensd;
    all fp32 on the CPU (or the CUDA device for native `gpu`), then moved to `device` and `dtype`.
    `shape` is one image's latent shape (C, H, W); `subseeds` as `batch_seeds` numbers them."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], source: str = "cpu", *,
                 subseeds: Sequence[int] | None = None, subseed_strength: float = 0.0,
                 seed_resize_from: tuple[int, int] = (0, 0), ensd: int = 0, downscale: int = 8,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cuda_threads: int | None = None, native_cuda: bool = False):
        self.shape, self.seeds = tuple(int(n) for n in shape), [int(s) for s in seeds]
        self.source, self.device, self.dtype = check_source(source), torch.device(device), dtype
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength, self.ensd = float(subseed_strength), int(ensd)
        self.resize_from, self.downscale = (int(seed_resize_from[0]), int(seed_resize_from[1])), int(downscale)
        self._cuda_threads = cuda_threads
        self._native = self.device if native_cuda else None
        self.generators = [self._generator(s) for s in self.seeds]
        self._drawn = False

    def _generator(self, seed: int) -> NoiseGenerator:
        return make_generator(seed, self.source, self._cuda_threads, self._native)

    def continued(self, shape: Sequence[int]) -> "ImageNoise":
        """The same generators drawing on at another shape, every call a plain draw (no variation, no resize):
        sdcli's hires pass with `cpu` noise, which goes on from the first pass's generator state."""
        other = copy.copy(self)
        other.shape, other._drawn = tuple(int(n) for n in shape), True
        return other

    def __call__(self) -> Tensor:
        if not self._drawn:
            self._drawn = True
            noise = self._initial()
        else:
            noise = torch.stack([g.randn(self.shape) for g in self.generators])  # (B, C, H, W)
        return noise.to(device=self.device, dtype=self.dtype)

    def _drawn_shape(self) -> tuple[int, ...]:
        """The shape the seed's noise is drawn at: `shape`, or the "resize seed from" size in latent pixels."""
        w, h = self.resize_from
        if w <= 0 or h <= 0:
            return self.shape
        return (self.shape[0], h // self.downscale, w // self.downscale)

    def _initial(self) -> Tensor:
        drawn_shape = self._drawn_shape()
        images = [self._initial_one(k, seed, drawn_shape) for k, seed in enumerate(self.seeds)]
        if self.ensd:  # the sampler's draws come from seed + ENSD from now on
            self.generators = [self._generator(seed + self.ensd) for seed in self.seeds]
        return torch.stack(images)  # (B, C, H, W)

    def _initial_one(self, k: int, seed: int, drawn_shape: tuple[int, ...]) -> Tensor:
        resized = drawn_shape != self.shape
        noise = self._generator(seed).randn(drawn_shape) if resized else self.generators[k].randn(self.shape)
        if self.subseeds is not None and self.subseed_strength != 0:
            subseed = self.subseeds[k] if k < len(self.subseeds) else 0  # A1111: 0 past the end of the list
            noise = slerp(self.subseed_strength, noise, self._generator(subseed).randn(drawn_shape))
        if resized:  # image k's own generator still makes its first draw, at the real size
            noise = paste_centred(noise, self.generators[k].randn(self.shape))
        return noise
