"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023) as A1111 applies it: before each self-attention
of the UNet's full-resolution transformer blocks, the most similar tokens are merged (averaged) into a grid of
destination tokens, the attention runs on fewer tokens, and its output is copied back to every merged token.

A1111 (modules/sd_models.py ``apply_token_merging``) patches the model with the tomesd package: ``use_rand=False``
(the destination of each 2x2 cell is its top-left token), ``max_downsample=1`` (only blocks at the latent's own
resolution), ``sx = sy = 2``, merging for self-attention only. This is our own implementation of tomesd's
``bipartite_soft_matching_random2d`` for those settings; tests/test_tome.py compares it with tomesd's patch.

A ratio r merges int(N * r) of a block's N tokens (at most the source tokens, 3/4 of them).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class TokenMerging:
    """The setting one UNet shares with its transformer blocks; `size` is the latent (H, W) of the current call,
    set by the UNet's forward (tomesd's forward pre-hook), so a block knows how far it is downsampled."""

    ratio: float = 0.0
    max_downsample: int = 1
    stride: tuple[int, int] = (2, 2)  # (sy, sx)
    size: tuple[int, int] | None = None

    def plan(self, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None:
        """(merge, unmerge) for this block's tokens x (B, N, C), or None where nothing is merged."""
        if self.ratio <= 0 or self.size is None:
            return None
        h0, w0 = self.size
        down = math.ceil(math.sqrt((h0 * w0) // x.shape[1]))  # tomesd compute_merge's rule
        if down > self.max_downsample:
            return None
        h, w = math.ceil(h0 / down), math.ceil(w0 / down)
        return merge_plan(x, h, w, *self.stride, int(x.shape[1] * self.ratio))


def _roles(h: int, w: int, sy: int, sx: int, device) -> tuple[Tensor, Tensor]:
    """Token indices of the destinations (the top-left token of each whole sy x sx cell) and of the sources (every
    other token), each in raster order: the order tomesd's argsort of its -1/0 buffer gives."""
    hs, ws = h // sy, w // sx
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=device)
    is_dst[: hs * sy : sy, : ws * sx : sx] = True
    flat = is_dst.flatten()
    order = torch.arange(h * w, device=device)
    return order[flat], order[~flat]


def merge_plan(metric: Tensor, h: int, w: int, sy: int, sx: int, r: int):
    """Bipartite soft matching: each source token's most similar destination (cosine), the r sources with the
    highest similarity merged into their destinations. Returns (merge, unmerge) for tensors shaped like metric's
    rows (B, N, C')."""
    b, n, _ = metric.shape
    dst_idx, src_idx = _roles(h, w, sy, sx, metric.device)
    r = min(r, src_idx.numel())
    if r <= 0:
        return None
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(-1, -2)  # (B, S, D)
    best, best_dst = scores.max(dim=-1)  # (B, S)
    ranked = best.argsort(dim=-1, descending=True)  # sources, most similar first
    merged, kept = ranked[:, :r], ranked[:, r:]  # (B, r), (B, S - r): positions among the sources
    target = best_dst.gather(1, merged)  # (B, r): which destination each merged source joins

    def merge(x: Tensor) -> Tensor:  # (B, N, C) -> (B, N - r, C)
        c = x.shape[-1]
        src, dst = x[:, src_idx], x[:, dst_idx]
        moved = src.gather(1, merged[..., None].expand(b, r, c))
        dst = dst.scatter_reduce(1, target[..., None].expand(b, r, c), moved, reduce="mean")
        return torch.cat([src.gather(1, kept[..., None].expand(b, kept.shape[1], c)), dst], dim=1)

    def unmerge(y: Tensor) -> Tensor:  # (B, N - r, C) -> (B, N, C)
        c = y.shape[-1]
        keep_n = kept.shape[1]
        out_kept, out_dst = y[:, :keep_n], y[:, keep_n:]
        out = y.new_zeros(b, n, c)
        out[:, dst_idx] = out_dst
        src_pos = src_idx[kept], src_idx[merged]  # token indices of the kept and of the merged sources
        out.scatter_(1, src_pos[0][..., None].expand(b, keep_n, c), out_kept)
        out.scatter_(1, src_pos[1][..., None].expand(b, r, c), out_dst.gather(1, target[..., None].expand(b, r, c)))
        return out

    return merge, unmerge


def set_token_merging(unet, ratio: float) -> None:
    """Merge tokens at `ratio` in `unet`'s transformer blocks from its next call on (0: off, the exact path of a
    UNet never patched). The UNet's input size reaches the blocks through a forward pre-hook, as tomesd's."""
    hook = getattr(unet, "_token_merging_hook", None)
    if hook is not None:
        hook.remove()
        unet._token_merging_hook = None
    setting = TokenMerging(ratio) if ratio > 0 else None
    for module in unet.modules():
        if hasattr(type(module), "token_merging"):
            module.token_merging = setting
    if setting is not None:
        def remember_size(module, args):
            setting.size = tuple(args[0].shape[-2:])

        unet._token_merging_hook = unet.register_forward_pre_hook(remember_size)


@contextmanager
def token_merging(unet, ratio: float):
    """Token merging at `ratio` for the duration of a sampling pass (A1111 patches the model for each pass: the
    hires pass may use its own ratio); nothing at all is touched when `ratio` is 0."""
    if ratio <= 0:
        yield
        return
    set_token_merging(unet, ratio)
    try:
        yield
    finally:
        set_token_merging(unet, 0.0)
