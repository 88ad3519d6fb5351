"""A1111's numbering of the seeds of a batch: plain integers, no torch, so a process that only plans images (a
`generate --server` client: app/remote.py) never imports it. sampling/rng.py draws the noise from these seeds."""

from __future__ import annotations


def batch_seeds(seed: int, count: int, subseed: int = 0, subseed_strength: float = 0.0
                ) -> tuple[list[int], list[int]]:
    """(seeds, variation seeds) of a batch of `count` images, as A1111's process_images_inner numbers them: image k
    has seed + k, except with a variation (strength != 0), where every image keeps `seed` and image k's variation
    seed is subseed + k. The infotext of image k records its own pair, so a replay of one image is a batch of one."""
    seeds = [int(seed) + (k if subseed_strength == 0 else 0) for k in range(count)]
    return seeds, [int(subseed) + k for k in range(count)]
