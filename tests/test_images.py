"""Image conversions (bit-equal to diffusers' VaeImageProcessor) and the forgiving image loader."""

import io
import sys
import types

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdcli.runtime.errors import BadInputError, NumericalError
from sdcli.formats.images import load_image, pil_to_tensor, tensor_to_pil


def test_tensor_to_pil_matches_diffusers_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 24, 40, generator=g) * 0.8
    # 0.0 -> 127.5 exactly, which exercises the rounding rule (half to even); +-1.5 exercise the clamp.
    x[0, 0, 0, :4] = torch.tensor([0.0, -1.5, 1.5, 1.0])
    ours = np.asarray(tensor_to_pil(x))
    ref = np.asarray(VaeImageProcessor().postprocess(x, output_type="pil")[0])
    assert ours.dtype == np.uint8 and ours.shape == (24, 40, 3)
    assert list(ours[0, :4, 0]) == [128, 0, 255, 255]
    assert np.array_equal(ours, ref)
    assert np.array_equal(np.asarray(tensor_to_pil(x[0])), ours)


def test_pil_to_tensor_matches_diffusers_exactly():
    arr = np.random.default_rng(0).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    ours = pil_to_tensor(img)
    ref = VaeImageProcessor().preprocess(img, height=16, width=24)
    assert ours.shape == (1, 3, 16, 24) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert np.array_equal(np.asarray(tensor_to_pil(ours)), arr)  # the two conversions invert each other


def test_tensor_to_pil_rejects_nan_and_keeps_input():
    x = torch.zeros(3, 8, 8)
    x[0, 0, 0] = float("nan")
    with pytest.raises(NumericalError):
        tensor_to_pil(x)
    y = torch.full((3, 8, 8), 2.0)
    tensor_to_pil(y)
    assert torch.all(y == 2.0)  # caller's tensor untouched


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_rgb_multiple_of_8_unchanged(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    img, notes = load_image(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert notes == [] and img.mode == "RGB" and np.array_equal(np.asarray(img), arr)


def test_palette(tmp_path):
    src = Image.new("RGB", (16, 16), (12, 200, 34)).convert("P", palette=Image.Palette.ADAPTIVE)
    img, _ = load_image(_save(src, tmp_path / "p.png"))
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (12, 200, 34)


def test_palette_with_transparency(tmp_path):
    src = Image.new("P", (8, 8), 0)
    src.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    src.putpixel((0, 0), 1)
    src.info["transparency"] = 1
    img, notes = load_image(_save(src, tmp_path / "pt.png", transparency=1))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((5, 5)) == (255, 0, 0)
    assert any("white" in n for n in notes)


def test_rgba_composited_on_white(tmp_path):
    src = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    src.putpixel((1, 1), (100, 50, 0, 255))
    src.putpixel((2, 2), (0, 0, 0, 128))
    img, notes = load_image(_save(src, tmp_path / "r.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 1)) == (100, 50, 0)
    assert all(abs(c - 127) <= 1 for c in img.getpixel((2, 2)))
    assert any("white" in n for n in notes)


def test_la(tmp_path):
    src = Image.new("LA", (8, 8), (40, 255))
    src.putpixel((0, 0), (0, 0))
    img, _ = load_image(_save(src, tmp_path / "la.png"))
    assert img.getpixel((1, 1)) == (40, 40, 40) and img.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit(tmp_path):
    arr = np.array([[0, 257 * 128, 65535, 1000] * 2] * 8, dtype=np.uint16)
    src = Image.fromarray(arr)
    path = _save(src, tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")  # really stored and read back as 16-bit
    img, notes = load_image(path)
    assert img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((1, 0)) == (128,) * 3
    assert img.getpixel((2, 0)) == (255,) * 3 and img.getpixel((3, 0)) == (4,) * 3  # round(1000/257) = 4
    assert any("16-bit" in n for n in notes)


def test_cmyk(tmp_path):
    src = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    img, notes = load_image(_save(src, tmp_path / "c.jpg", quality=100))
    r, g, b = img.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15
    assert any("CMYK" in n for n in notes)


def test_grayscale(tmp_path):
    img, _ = load_image(_save(Image.new("L", (8, 8), 77), tmp_path / "l.png"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((16, 32, 3), dtype=np.uint8)  # 32 wide, 16 high; a red top-left corner
    arr[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(arr), tmp_path / "e.png", exif=exif)
    img, notes = load_image(path)
    expected = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270))
    assert img.size == (16, 32) and np.array_equal(np.asarray(img), expected)
    assert any("orientation 6" in n for n in notes)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    img, notes = load_image(path)
    assert img.getpixel((4, 4)) == (255, 0, 0)
    assert any("3 frames" in n for n in notes)


def test_crop_to_multiple_of_8(tmp_path):
    arr = np.zeros((21, 30, 3), dtype=np.uint8)
    arr[2:18, 3:27] = 200  # the centre 16x24 region
    img, notes = load_image(_save(Image.fromarray(arr), tmp_path / "odd.png"))
    assert img.size == (24, 16)
    assert np.all(np.asarray(img) == 200)
    assert notes == ["size 30x21 is not a multiple of 8: centre-cropped to 24x16"]


def test_too_small(tmp_path):
    with pytest.raises(BadInputError, match="tiny.png"):
        load_image(_save(Image.new("RGB", (5, 40)), tmp_path / "tiny.png"))


def test_truncated(tmp_path):
    good = _save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "g.png")
    bad = tmp_path / "t.png"
    bad.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(BadInputError, match="t.png"):
        load_image(bad)


@pytest.mark.parametrize("content", [b"this is not an image", b"<html>404</html>", b""])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "junk.png"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="junk.png"):
        load_image(path)


def test_missing_and_directory(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(BadInputError, match="directory"):
        load_image(tmp_path)


def test_decompression_bomb(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (64, 64)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadInputError, match="bomb.png.*limit"):
        load_image(path)
    with pytest.raises(BadInputError, match="limit"):
        load_image(path, max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    img, _ = load_image(path)
    assert img.size == (64, 64)


def test_huge_metadata(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    plain, packed = PngInfo(), PngInfo()
    plain.add_text("comment", "x" * 3_000_000)  # large but stored as is: the image still loads
    packed.add_text("comment", "x" * 3_000_000, zip=True)  # a zTXt that inflates past PIL's 1 MB cap
    img, _ = load_image(_save(Image.new("RGB", (8, 8), (9, 9, 9)), tmp_path / "big.png", pnginfo=plain))
    assert img.getpixel((0, 0)) == (9, 9, 9)
    with pytest.raises(BadInputError, match="zbig.png.*too large"):
        load_image(_save(Image.new("RGB", (8, 8)), tmp_path / "zbig.png", pnginfo=packed))


def test_stdin(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), (1, 2, 3)).save(buf, format="PNG")
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(buf.getvalue())))
    img, _ = load_image("-")
    assert img.size == (8, 16) and img.getpixel((0, 0)) == (1, 2, 3)
