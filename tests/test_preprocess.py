"""The no-network ControlNet preprocessors (sdcli/preprocess.py): properties, and canny against OpenCV."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdcli.control.preprocess import canny, inpaint_condition, inpaint_mask, invert, shuffle, threshold, tile


def _square(size: int = 64, lo: int = 30, hi: int = 220) -> Image.Image:
    img = Image.new("RGB", (size, size), (lo, lo, lo))
    ImageDraw.Draw(img).rectangle([16, 20, 47, 43], fill=(hi, hi, hi))  # x 16..47, y 20..43
    return img


def _photo_like(seed: int = 0, size: int = 96) -> Image.Image:
    """Shapes on smooth noise: edges of every orientation, gradients and ties."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((12, 12, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    d = ImageDraw.Draw(base)
    d.ellipse([10, 12, 60, 50], fill=(240, 30, 30))
    d.polygon([(70, 10), (90, 60), (40, 80)], fill=(20, 200, 90))
    d.line([(0, 90), (95, 40)], fill=(255, 255, 255), width=3)
    return base


def test_canny_finds_the_square_and_nothing_else():
    edges = np.asarray(canny(_square()).convert("L")) > 0
    ys, xs = np.nonzero(edges)
    assert edges.any()
    # every edge pixel lies within one pixel of the square's outline, and every side is found
    assert ((np.abs(xs - 16) <= 1) | (np.abs(xs - 47) <= 1) | (np.abs(ys - 20) <= 1) | (np.abs(ys - 43) <= 1)).all()
    assert xs.min() >= 15 and xs.max() <= 48 and ys.min() >= 19 and ys.max() <= 44
    for side in (edges[20:44, 15:18], edges[20:44, 46:49], edges[19:22, 16:48], edges[42:45, 16:48]):
        assert side.any(axis=0 if side.shape[0] < 4 else 1).all(), "a side of the square has a gap"
    assert np.asarray(canny(_square())).shape == (64, 64, 3)


def test_canny_flat_and_faint_images_have_no_edges():
    assert not np.asarray(canny(Image.new("RGB", (40, 30), (120, 50, 200)))).any()
    faint = _square(lo=100, hi=110)  # a step of 10 gray levels: L1 Sobel 40, below low=100
    assert not np.asarray(canny(faint)).any()
    assert np.asarray(canny(faint, low=10, high=30)).any()


def test_canny_thresholds_and_blur():
    img = _photo_like()
    counts = [int((np.asarray(canny(img, lo, hi).convert("L")) > 0).sum()) for lo, hi in ((50, 100), (100, 200), (200, 400))]
    assert counts[0] > counts[1] > counts[2] > 0
    assert (np.asarray(canny(img, 100, 200, blur=2.0).convert("L")) > 0).sum() < counts[1]  # blur smooths fine detail away
    with pytest.raises(ValueError):
        canny(img, 200, 100)


def test_canny_equals_opencv():
    """cv2.Canny(gray, 100, 200) is what diffusers' docs and sd-webui-controlnet run: same pixels here."""
    cv2 = pytest.importorskip("cv2")  # opencv-python-headless, in the dev extra
    for seed, (lo, hi) in enumerate([(100, 200), (50, 150), (20, 60)]):
        img = _photo_like(seed)
        ours = np.asarray(canny(img, lo, hi).convert("L"))
        ref = cv2.Canny(np.asarray(img.convert("L")), lo, hi)
        assert (ref > 0).sum() > 100
        assert np.array_equal(ours, ref), f"{(ours != ref).sum()} of {(ref > 0).sum()} edge pixels differ"


def test_invert_and_threshold():
    img = _square()
    assert np.array_equal(np.asarray(invert(invert(img))), np.asarray(img))
    assert np.asarray(invert(img))[0, 0].tolist() == [225, 225, 225]
    bw = np.asarray(threshold(img, 128))
    assert set(np.unique(bw).tolist()) == {0, 255} and bw[30, 30, 0] == 255 and bw[0, 0, 0] == 0
    assert np.array_equal(np.asarray(threshold(img, 128, invert_first=True)), 255 - bw)


def test_tile_keeps_size_and_colours_but_not_detail():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (96, 96, 3), dtype=np.uint8))  # all detail
    out = tile(img, factor=8)
    assert out.size == img.size and out.mode == "RGB"
    a, b = np.asarray(img, dtype=np.float32), np.asarray(out, dtype=np.float32)
    assert abs(a.mean() - b.mean()) < 3  # the same colours overall
    detail = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert detail(b) < 0.2 * detail(a)
    assert detail(np.asarray(tile(img, 8, blur=2), dtype=np.float32)) < detail(b)
    assert np.array_equal(np.asarray(tile(img, factor=1)), np.asarray(img))


def test_shuffle_is_a_seeded_warp_of_the_input_pixels():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # every pixel ~unique
    a, b, c = (np.asarray(shuffle(img, seed=s, cell=16)) for s in (7, 7, 8))
    assert a.shape == (48, 80, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    source = {tuple(p) for p in np.asarray(img).reshape(-1, 3)}
    assert all(tuple(p) in source for p in a.reshape(-1, 3))  # only copies of input pixels
    assert not np.array_equal(a, np.asarray(img))
    assert len({tuple(p) for p in a.reshape(-1, 3)}) > 50  # a warp, not one pixel repeated


def test_inpaint_mask_and_condition():
    img = _square()
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).rectangle([0, 0, 9, 9], fill=255)
    rgba = inpaint_mask(img, mask)
    cond = inpaint_condition(rgba)
    assert cond.shape == (64, 64, 3) and cond.dtype == np.float32
    assert (cond[:10, :10] == -1).all() and (cond[10:, :] >= 0).all() and (cond[:, 10:] >= 0).all()
    assert np.allclose(cond[30, 30], 220 / 255) and np.allclose(cond[60, 60], 30 / 255)
    with pytest.raises(ValueError, match="mask"):
        inpaint_mask(img, mask.resize((32, 32)))
