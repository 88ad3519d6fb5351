"""A1111's noise sources (sdcli/sampling/rng.py) against references written here from the specs, not from rng.py:

- Philox4x32-10 as a scalar loop over Python ints, from the Random123 paper's constants, checked on Random123's
  published known-answer vectors;
- torch's CUDA randn kernel as a literal loop over threads, grid-stride loops and the float4 unroll
  (DistributionTemplates.h distribution_elementwise_grid_stride_kernel), with a Box-Muller in Python `math`;
- published values: torch CUDA output printed by a libtorch program, and A1111's rng_philox.py docstring;
- A1111's ImageRNG rules (variation seeds, slerp, "resize seed from", ENSD, batch seeds) in NumPy float64 loops.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from sdcli.runtime.errors import UsageError
from sdcli.sampling import a1111_params
from sdcli.sampling.rng import (
    ImageNoise, PhiloxGenerator, batch_seeds, cuda_thread_capacity, make_generator, paste_centred, philox4x32_10,
    randn, slerp,
)

# ----------------------------------------------------------------------------- references

M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # Salmon et al. 2011, Philox4x32 multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # golden ratio and sqrt(3) - 1 key increments


def ref_philox(counter: list[int], key: list[int]) -> list[int]:
    """Philox4x32-10, one block, plain integers."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = divmod(PHILOX_M0 * c0, 2**32)
        hi1, lo1 = divmod(PHILOX_M1 * c2, 2**32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
    return [c0, c1, c2, c3]


def f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


U_SCALE = f32(2.3283064e-10)  # cuRAND CURAND_2POW32_INV as a float32
V_SCALE = f32(2.3283064e-10 * 6.2831855)  # CURAND_2POW32_INV_2PI


def ref_box_muller(x: int, y: int) -> tuple[float, float]:
    """(s sin v, s cos v) rounded to float32, the arithmetic in double as A1111's rng_philox does."""
    u = x * U_SCALE + U_SCALE / 2
    v = y * V_SCALE + V_SCALE / 2
    s = math.sqrt(-2.0 * math.log(u))
    return f32(s * math.sin(v)), f32(s * math.cos(v))


def ref_cuda_randn(seed: int, numel: int, offset: int, threads: int | None = None) -> tuple[list[float], int]:
    """torch.randn on CUDA, kernel loop by loop: returns (values, Philox blocks the generator's offset advances)."""
    grid = -(-numel // 256)
    if threads is not None:
        grid = min(grid, threads // 256)  # SMs * blocks per SM caps the grid
    stride = grid * 256
    loops = ((numel - 1) // (stride * 4)) + 1
    out = [math.nan] * numel
    key = [seed & M32, seed >> 32]
    for thread in range(stride):
        for j in range(loops):
            block = offset + j
            w = ref_philox([block & M32, block >> 32, thread & M32, thread >> 32], key)
            four = (*ref_box_muller(w[0], w[1]), *ref_box_muller(w[2], w[3]))  # curand_normal4
            for i in range(4):
                index = thread + j * 4 * stride + i * stride
                if index < numel:
                    out[index] = four[i]
    return out, loops


def ref_slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp spelled out: one angle per (channel, column) of a (C, H, W) noise, float64."""
    channels, _, width = low.shape
    cosine = np.empty((channels, width))
    for c in range(channels):
        for w in range(width):
            a, b = low[c, :, w], high[c, :, w]
            cosine[c, w] = np.dot(a / np.sqrt(np.sum(a * a)), b / np.sqrt(np.sum(b * b)))
    if cosine.mean() > 0.9995:
        return low * val + high * (1 - val)
    out = np.empty_like(low)
    for c in range(channels):
        for w in range(width):
            omega = math.acos(cosine[c, w])
            out[c, :, w] = (math.sin((1 - val) * omega) * low[c, :, w] + math.sin(val * omega) * high[c, :, w]) \
                / math.sin(omega)
    return out


def ref_window(big: int, small: int) -> tuple[int, int, int]:
    """(first target index, first source index, length) of A1111's centred paste along one axis."""
    offset = math.floor((big - small) / 2)
    if offset >= 0:
        return offset, 0, small
    return 0, -offset, small - 2 * (-offset)


def ref_paste(small: np.ndarray, big: np.ndarray) -> np.ndarray:
    out = big.copy()
    ty, sy, h = ref_window(big.shape[1], small.shape[1])
    tx, sx, w = ref_window(big.shape[2], small.shape[2])
    for y in range(h):
        for x in range(w):
            out[:, ty + y, tx + x] = small[:, sy + y, sx + x]
    return out


def ref_initial(shape, seed, subseed, strength, resize_from, source) -> np.ndarray:
    """ImageRNG.first for one image, from fresh generators (A1111's randn(seed, shape) per draw)."""
    w0, h0 = resize_from
    drawn = shape if w0 <= 0 or h0 <= 0 else (shape[0], h0 // 8, w0 // 8)
    noise = randn(seed, drawn, source).double().numpy()
    if strength != 0:
        noise = ref_slerp(strength, noise, randn(subseed, drawn, source).double().numpy())
    if drawn != shape:
        noise = ref_paste(noise, randn(seed, shape, source).double().numpy())
    return noise


# ----------------------------------------------------------------------------- Philox

# Random123 tests/kat_vectors, the three "philox4x32 10" lines (counter[4] key[2] -> result[4]), as quoted from
# DEShawResearch/random123 by several repositories in the search index.
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([M32] * 4, [M32, M32], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    assert ref_philox(counter, key) == expected
    words = philox4x32_10(np.array(counter, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32))
    assert words[:, 0].tolist() == expected


def test_philox_vectorized_matches_scalar_on_random_blocks():
    rng = random.Random(1)
    counters = [[rng.getrandbits(32) for _ in range(4)] for _ in range(200)]
    keys = [[rng.getrandbits(32) for _ in range(2)] for _ in range(200)]
    words = philox4x32_10(np.array(counters, dtype=np.uint32).T, np.array(keys, dtype=np.uint32).T)
    assert words.T.tolist() == [ref_philox(c, k) for c, k in zip(counters, keys)]


# ----------------------------------------------------------------------------- normals

SEEDS = [0, 1, 12345, 2**32 - 1, 2**32 + 7, 2**63 + 3]


@pytest.mark.parametrize("seed", SEEDS)
def test_nv_matches_the_kernel_loop_call_after_call(seed):
    """NV (and `gpu` without a thread cap): element n is the sine half of block (offset, thread n), offset + 1 per
    call. Bit-exact: both sides round the same float64 value to float32 (math's and NumPy's log/sin can differ in
    the last float64 bit, which reaches a float32 result only on an exact rounding tie)."""
    generator = PhiloxGenerator(seed)
    for offset, numel in enumerate([37, 256, 700]):
        expected, loops = ref_cuda_randn(seed, numel, offset)
        assert loops == 1
        assert generator.randn((numel,)).tolist() == expected
    assert generator.offset == 3


@pytest.mark.parametrize("threads,numel", [(256, 300), (256, 1024), (256, 1025), (512, 2500), (768, 7000)])
def test_gpu_emulation_grid_stride_past_the_thread_capacity(threads, numel):
    """Past the capacity the cosine halves, the second pair and further loops come in, and the offset moves on by
    the loops each thread made."""
    seed = 987654321
    generator = PhiloxGenerator(seed, cuda_threads=threads)
    first, loops = ref_cuda_randn(seed, numel, 0, threads)
    assert generator.randn((numel,)).tolist() == first
    assert generator.offset == loops
    second, _ = ref_cuda_randn(seed, numel, loops, threads)
    assert generator.randn((numel,)).tolist() == second


def test_gpu_equals_nv_up_to_the_capacity_and_differs_past_it():
    capacity = cuda_thread_capacity(sm_count=2, max_threads_per_sm=1536)  # 2 SMs x 6 blocks x 256 threads
    assert capacity == 3072
    for numel in (100, capacity):
        gpu, nv = make_generator(5, "gpu", cuda_threads=capacity), make_generator(5, "nv")
        assert torch.equal(gpu.randn((numel,)), nv.randn((numel,)))
        assert torch.equal(gpu.randn((numel,)), nv.randn((numel,)))  # the offsets move together
    gpu, nv = make_generator(5, "gpu", cuda_threads=capacity).randn((capacity + 9,)), randn(5, (capacity + 9,), "nv")
    assert torch.equal(gpu[:capacity], nv[:capacity])
    assert not torch.equal(gpu[capacity:], nv[capacity:])
    assert torch.equal(randn(5, (capacity + 9,), "gpu"), nv)  # no cap given: a thread per element


# torch CUDA output published in kapilsh/cuda-mode-lecture README.md ("[CUDA] Fused Mul Add Relu", the output of
# kernels' fused_kernels_lora_test on an sm_75 GPU): after torch::manual_seed(0), randn {8, 10}, then {10}, then
# {8, 10} on CUDA, printed by libtorch to 4 decimals.
CUDA_SEED0_X = """
-0.9247 -0.4253 -2.6438  0.1452 -0.1209 -0.5797 -0.6229 -0.3284 -1.0745 -0.3631
-1.6711  2.2655  0.3117 -0.1842  1.2866  1.1820 -0.1271  1.2169  1.4353  1.0605
-0.4941 -1.4244 -0.7244 -1.2973  0.0697 -0.0074  1.8969  0.6878 -0.0779 -0.8373
 1.3506 -0.2879 -0.5965 -0.3283 -0.9086 -0.8059 -0.7407 -0.0504  0.5435  1.5150
 0.0141  0.4532  1.6349  0.7124 -0.1806  1.0252 -1.4622 -0.7554 -0.1836  0.3824
 0.3918 -0.0830  0.8971 -1.1123  0.1116  0.4863 -0.5499 -0.3231 -0.5469  0.9049
 0.2837  0.1210  0.4730 -1.0823 -0.0334 -0.9734  0.9559 -1.1795 -1.0064  0.1160
 0.6852 -0.4124 -0.6738 -0.5404  0.6898 -1.5517  0.3805 -0.0436  0.3597 -0.5043
"""
CUDA_SEED0_BIAS = "0.1808 -0.5523 0.9238 -0.7350 1.3800 0.8676 0.1297 -0.9406 0.8109 0.8821"
CUDA_SEED0_Y = """
 2.5441 -0.7163 -0.4934  0.1267  0.1014 -0.4035  0.9023  0.8099 -0.6884  0.1372
 1.0377  0.0925 -0.3752 -0.0908  2.0639 -1.8164 -0.2719  0.2811 -1.0399  0.7765
 0.8814  0.0444 -1.4870  1.1334  1.3268 -1.2616  0.9501 -0.6558  0.9098 -0.6290
-0.6587  2.0811  1.4151 -0.3091 -0.2055  2.0562 -0.0490 -0.6361 -0.5359 -0.1310
-0.2945  1.2275  1.0549  0.3576  1.6378 -0.2310  0.7883 -0.0807 -0.3924  1.2673
 1.0420 -0.4945 -1.1637  1.5740  0.7116  0.6104  1.2852 -0.6533  1.1171 -1.0067
 1.2912  1.6028  0.1332  1.0703 -1.1161 -0.8396 -3.6680  0.8189  0.1255 -0.7691
 0.1552 -0.8782 -0.4734  0.9690 -1.9985  0.1030  0.8580  0.7625 -1.2587 -0.8183
"""


@pytest.mark.parametrize("source", ["gpu", "nv"])
def test_matches_published_torch_cuda_output(source):
    """170 values of three successive CUDA draws. 4 printed decimals bound each to +-5e-5; the extra 2e-6 is CUDA's
    float32 Box-Muller (__sincosf, logf) against our float64 one, ~1e-6 at most (see rng.py)."""
    generator = make_generator(0, source)
    for text, shape in ((CUDA_SEED0_X, (8, 10)), (CUDA_SEED0_BIAS, (10,)), (CUDA_SEED0_Y, (8, 10))):
        published = torch.tensor([float(v) for v in text.split()], dtype=torch.float64).reshape(shape)
        assert (generator.randn(shape).double() - published).abs().max() <= 5e-5 + 2e-6


def test_a1111_rng_philox_docstring():
    """rng_philox.py's "Expected output" for Generator(seed=0).randn((3, 4)), 8 significant digits. Its digits are
    up to 2.6e-7 off what rng_philox's own float64 code returns (and what we return): they look like real CUDA
    output (float32, __sincosf), so the bound is CUDA's Box-Muller error, not the print precision."""
    published = torch.tensor([[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                              [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                              [-1.07454231, -0.36314407, -1.67105067, 2.26550497]], dtype=torch.float64)
    assert (randn(0, (3, 4), "nv").double() - published).abs().max() < 5e-7


def test_cpu_is_torch_cpu_randn():
    for seed in (0, 7, 2**40 + 1):
        g = torch.Generator().manual_seed(seed)
        gen = make_generator(seed, "cpu")
        for shape in ((4, 8, 8), (3, 5), (4, 64, 64)):
            assert torch.equal(gen.randn(shape), torch.randn(shape, generator=g))


def test_seed_range_and_source_names():
    assert torch.equal(randn(-1, (5,), "cpu"), randn(2**64 - 1, (5,), "cpu"))  # torch wraps negative seeds
    assert torch.equal(randn(-1, (5,), "nv"), randn(2**64 - 1, (5,), "nv"))
    assert torch.equal(randn(3, (5,), "GPU"), randn(3, (5,), "gpu"))  # the infotext's spelling
    with pytest.raises(UsageError, match="64 bits"):
        randn(2**64, (5,), "nv")
    with pytest.raises(UsageError, match="noise source"):
        randn(1, (5,), "mps")
    with pytest.raises(UsageError, match="cuda_threads"):
        PhiloxGenerator(1, cuda_threads=100)


# ----------------------------------------------------------------------------- A1111's ImageRNG

def test_slerp_and_resize_against_reference_on_many_cases():
    """Three hundred random (source, seed, variation seed, strength, size, resize-from) cases. float32 against a
    float64 reference: the angle goes through acos/sin in float32, hence the 2e-5 bound (values are O(1))."""
    rng = random.Random(29)
    for _ in range(300):
        source = rng.choice(["cpu", "gpu", "nv"])
        seed, subseed = rng.getrandbits(32), rng.getrandbits(32)
        strength = rng.choice([0.0, 1.0, round(rng.random(), 3), round(rng.random(), 3)])
        shape = (4, rng.randint(8, 14), rng.randint(8, 14))
        resize = (0, 0) if rng.random() < 0.4 else (rng.randint(64, 120), rng.randint(64, 120))
        noise = ImageNoise(shape, [seed], source, subseeds=[subseed], subseed_strength=strength,
                           seed_resize_from=resize)()
        expected = torch.from_numpy(ref_initial(shape, seed, subseed, strength, resize, source))
        assert noise.shape == (1, *shape)
        torch.testing.assert_close(noise[0].double(), expected, rtol=1e-5, atol=2e-5)


def test_paste_windows():
    """Hand-checked A1111 windows: a 7-row noise on 10 rows lands on rows 1..7; a 13-row one on 10 rows gives rows
    0..8 its rows 2..10 and leaves row 9 alone (-3 // 2 = -2 takes two rows off each side of 13, leaving 9)."""
    big = torch.zeros(1, 10, 10)
    small = torch.arange(1, 1 + 7 * 7, dtype=torch.float32).reshape(1, 7, 7)
    out = paste_centred(small, big)
    assert torch.equal(out[0, 1:8, 1:8], small[0]) and out[0, 0].abs().sum() == 0 and out[0, 8:].abs().sum() == 0
    small = torch.arange(1, 1 + 13 * 13, dtype=torch.float32).reshape(1, 13, 13)
    out = paste_centred(small, big)
    assert torch.equal(out[0, :9, :9], small[0, 2:11, 2:11])
    assert out[0, 9].abs().sum() == 0 and out[0, :, 9].abs().sum() == 0
    assert torch.equal(paste_centred(small, big), torch.from_numpy(ref_paste(small.numpy(), big.numpy())))


def test_slerp_special_cases():
    low = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(3))
    # parallel noises: the linear branch, with the weights the other way round (val weights `low`)
    assert torch.equal(slerp(0.3, low, low * 2), low * 0.3 + (low * 2) * (1 - 0.3))
    high = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(slerp(0.0, low, high), low, rtol=0, atol=1e-5)
    torch.testing.assert_close(slerp(1.0, low, high), high, rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", ["cpu", "gpu", "nv"])
def test_sampler_draws_and_ensd(source):
    shape, seed = (4, 6, 5), 1234
    plain = ImageNoise(shape, [seed], source)
    own = make_generator(seed, source)
    assert torch.equal(plain()[0], own.randn(shape))
    assert torch.equal(plain()[0], own.randn(shape))  # the seed's generator continues
    assert torch.equal(plain()[0], own.randn(shape))
    delta = 31337
    with_ensd = ImageNoise(shape, [seed], source, ensd=delta)
    assert torch.equal(with_ensd()[0], randn(seed, shape, source))
    fresh = make_generator(seed + delta, source)
    assert torch.equal(with_ensd()[0], fresh.randn(shape))  # seed + ENSD from the first sampler draw on
    assert torch.equal(with_ensd()[0], fresh.randn(shape))


@pytest.mark.parametrize("source", ["cpu", "gpu", "nv"])
@pytest.mark.parametrize("strength,resize,ensd", [(0.0, (0, 0), 0), (0.4, (0, 0), 0), (0.25, (72, 56), 31337)])
def test_batch_invariance(source, strength, resize, ensd):
    """Image k of a batch = a batch of one with image k's seeds, bit for bit, for the initial noise and later
    draws, as the infotext of image k records them."""
    seeds, subseeds = batch_seeds(1000, 3, subseed=77, subseed_strength=strength)
    shape = (4, 8, 7)
    batch = ImageNoise(shape, seeds, source, subseeds=subseeds, subseed_strength=strength, seed_resize_from=resize,
                       ensd=ensd)
    singles = [ImageNoise(shape, [s], source, subseeds=[v], subseed_strength=strength, seed_resize_from=resize,
                          ensd=ensd) for s, v in zip(seeds, subseeds)]
    for _ in range(3):
        drawn = batch()
        assert drawn.shape == (3, *shape)
        for k, single in enumerate(singles):
            assert torch.equal(drawn[k], single()[0])


def test_batch_seeds_rule():
    assert batch_seeds(10, 3) == ([10, 11, 12], [0, 1, 2])
    assert batch_seeds(10, 3, subseed=50, subseed_strength=0.5) == ([10, 10, 10], [50, 51, 52])


def test_noise_dtype_device_and_missing_subseed():
    noise = ImageNoise((4, 3, 3), [1, 2], "nv", subseeds=[9], subseed_strength=0.5, dtype=torch.float16)
    first = noise()
    assert first.dtype == torch.float16 and first.device.type == "cpu"
    # A1111 uses variation seed 0 for images past the end of the subseed list
    alone = ImageNoise((4, 3, 3), [2], "nv", subseeds=[0], subseed_strength=0.5, dtype=torch.float16)()
    assert torch.equal(first[1], alone[0])


def test_a1111_params_table_is_consistent():
    from sdcli.sampling.samplers import SAMPLERS

    for row in a1111_params.A1111_SAMPLERS:
        assert row.noise in {"none", "rng", "churn", "brownian"}
        assert row.sdcli is None or row.sdcli in SAMPLERS
        assert row.sdcli is None or SAMPLERS[row.sdcli].a1111 == row.label
        assert row.eta is None or row.eta in a1111_params.INFOTEXT_FIELDS
