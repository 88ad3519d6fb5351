"""Device check for sdcli/sampling/rng.py (issue 29): how close the `gpu` emulation is to torch's own CUDA randn.

Run on a machine with an NVIDIA GPU: `python scripts/check_rng_cuda.py`. For each seed and latent size it draws
three successive tensors from torch.Generator("cuda") and from PhiloxGenerator with this GPU's thread capacity,
and prints the largest absolute difference and the share of bit-identical values. Expected (rng.py docstring):
max |diff| around 1e-6 (CUDA's float32 __sincosf / logf Box-Muller against our float64 one), a large share
bit-identical, and no jump past the capacity (a wrong element layout would give differences of order 1).
"""

from __future__ import annotations

import torch

from sdcli.sampling.rng import PhiloxGenerator, cuda_thread_capacity

SEEDS = (0, 1, 12345, 4294967295, 3141592653)
# The last ones pass a big GPU's capacity (an H100's 270336 threads: 4x640x640 takes 2 loops per thread).
SHAPES = ((4, 64, 64), (4, 128, 128), (4, 160, 160), (16, 128, 128), (4, 640, 640))


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    capacity = cuda_thread_capacity(props.multi_processor_count, props.max_threads_per_multi_processor)
    print(f"{props.name}: {props.multi_processor_count} SMs, capacity {capacity} threads, torch {torch.__version__}")
    worst = 0.0
    for shape in SHAPES:
        for seed in SEEDS:
            native = torch.Generator("cuda").manual_seed(seed)
            emulated = PhiloxGenerator(seed, cuda_threads=capacity)
            for call in range(3):
                cuda = torch.randn(shape, generator=native, device="cuda").cpu()
                ours = emulated.randn(shape)
                diff = (cuda - ours).abs()
                exact = (cuda == ours).float().mean().item()
                worst = max(worst, diff.max().item())
                print(f"shape {shape} seed {seed} call {call}: max |diff| {diff.max().item():.3g}, "
                      f"bit-identical {exact:.4%}")
    print(f"worst max |diff| {worst:.3g}")


if __name__ == "__main__":
    main()
