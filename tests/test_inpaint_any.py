"""Inpainting with any model (issue 28 part 7): A1111's img2img inpainting, `sdcli img2img --mask / --pad`.

1. The latent method against diffusers' StableDiffusionInpaintPipeline with the tiny random 4-channel UNet, where
   the two are the same method: Euler, a 0/1 mask on the 8-pixel grid (A1111's bicubic-and-rounded latent mask
   and diffusers' nearest one agree there), no blur, strength < 1 (A1111 starts from init + noise * sigma at any
   strength, diffusers from pure noise at strength 1). A1111 pins the denoised x0 to the clean init latent where
   it keeps; diffusers sets the kept latent to add_noise(init, noise, t_next) after each step. With Euler both
   keep x_i = init + sigma_i * noise there (sampling/inpaint.py), so the trajectories agree to float rounding.
   Conventions as test_inpaint.py / test_pipeline_oracle.py (sigmas handed to diffusers, posterior mean, the
   generators' first draw is the noise).
2. A1111's pixel steps against independent code written here from A1111's definitions (modules/processing.py,
   masking.py, images.py): the mask blur against cv2.GaussianBlur itself (what A1111 calls), the crop region
   against diffusers' own port of A1111's get_crop_region + expand_crop_region, the overlay compositing against
   PIL's integer formulas written out in numpy, fill's properties and a literal transcription, the latent fills
   against fresh generators.
3. The command: kept pixels exactly the input's, the infotext fields A1111 writes, replay and verify.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter, ImageOps
from transformers import CLIPTextModel, CLIPTokenizer
from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread, sd1_models  # noqa: F401
from test_pipeline_oracle import (  # noqa: F401  (posterior_mean is a fixture)
    CFG, NEGATIVE, PROMPT, SD, SIZE, Case, FinalLatents, assert_latents_close, init_image, our_plan, pixels,
    posterior_mean,
)
from sdcli import pipeline as P
from sdcli.app import inpaint
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.formats import masking
from sdcli.formats.images import pil_to_tensor
from sdcli.sampling.inpaint import MaskedDenoiser, masked_start, seed_noise

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_mask() -> Image.Image:
    """A 0/255 mask on the 8-pixel grid: two blocks, one touching the border."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:40, 8:32] = 255
    m[48:64, 40:56] = 255
    return Image.fromarray(m, "L")


# --- 1. the latent method against diffusers --------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_inpaint_4ch(tiny_sd1_diffusers, clip_tokenizer_dir):  # noqa: F811
    folder = tiny_sd1_diffusers
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    assert unet.config.in_channels == 4  # diffusers' "legacy" inpainting: the latent blend
    pipe = StableDiffusionInpaintPipeline(
        unet=unet, vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=CLIPTokenizer.from_pretrained(clip_tokenizer_dir, pad_token="<|endoftext|>", model_max_length=77),
        scheduler=EulerDiscreteScheduler(**SD, prediction_type="epsilon", timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_4ch(models, plan, seeds, strength):
    settings = inpaint.settings(RunConfig(mask_blur=0, overlay=False), inpainting_model=False)
    work = inpaint.prepare(init_image(), grid_mask(), settings)
    cond, uncond = P.encode_text(models, PROMPT, NEGATIVE)
    latent = P.encode_image(models, pil_to_tensor(work.image))
    keep = work.keep(latent.shape)
    return P.img2img(models, plan, latent, cond, uncond, seeds, strength, keep=keep), keep


@pytest.mark.parametrize("strength,seeds", [(0.75, [3]), (0.5, [5, 6])], ids=["s0.75", "s0.5-batch2"])
def test_latent_blend_matches_diffusers_4channel_inpaint(strength, seeds, sd1_models, diffusers_inpaint_4ch,  # noqa: F811
                                                         posterior_mean):
    plan = our_plan(Case("sd1", "euler", "normal", 6))
    latents, keep = ours_4ch(sd1_models, plan, seeds, strength)
    # the latent mask A1111 makes (bicubic, rounded) is diffusers' nearest one on this grid mask
    nearest = torch.from_numpy(np.asarray(grid_mask())[::8, ::8] / 255.0).float()
    assert torch.equal(keep[0, 0], 1 - nearest)
    final = FinalLatents()
    out = diffusers_inpaint_4ch([PROMPT] * len(seeds), image=init_image(), mask_image=grid_mask(),
                                strength=strength, negative_prompt=[NEGATIVE] * len(seeds), height=SIZE, width=SIZE,
                                guidance_scale=CFG, sigmas=plan.sigmas.tolist(), output_type="pil",
                                generator=[torch.Generator().manual_seed(s) for s in seeds],
                                callback_on_step_end=final)
    # fp32 on both sides: the same math in another order; 2e-5 of the latents' size (stricter than 1e-4 relative)
    assert_latents_close(latents, final.latents)
    ours_px, ref_px = pixels(sd1_models, latents), [np.asarray(im) for im in out.images]
    for a, b in zip(ours_px, ref_px):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert (diff <= 2).mean() >= 0.99 and diff.max() <= 2, diff.max()
        assert len(np.unique(b)) > 16
    # the kept area of the result is the init latent itself (the final blend), the rest moved
    init = P.encode_image(sd1_models, pil_to_tensor(init_image()))
    kept = keep.expand_as(latents).bool()
    assert torch.equal(latents[kept], init.expand_as(latents)[kept])
    assert not torch.allclose(latents[~kept], init.expand_as(latents)[~kept])


def test_masked_denoiser_pins_x0_and_only_x0():
    """The wrapper replaces x0 where it keeps, in A1111's order, and leaves the model's x0 where it repaints."""
    x = torch.randn(2, 4, 8, 8)
    original = torch.randn(1, 4, 8, 8)
    keep = (torch.rand(1, 1, 8, 8) > 0.5).float()
    model = lambda x_, s: x_ * 0.5 + s.reshape(-1, 1, 1, 1)  # noqa: E731
    sigma = torch.tensor([1.5, 1.5])
    got = MaskedDenoiser(model, original, keep)(x, sigma)
    want = torch.where(keep.bool(), original.expand_as(x), model(x, sigma))
    assert torch.equal(got, want)


# --- 2. A1111's pixel steps ------------------------------------------------------------------------

@pytest.mark.parametrize("radius", [1, 2, 4, 7, 12])
def test_mask_blur_is_cv2_gaussian_bit_for_bit(radius):
    """processing.py: cv2.GaussianBlur(mask, (k, 1), r) then (1, k), k = 2 * int(2.5 r + 0.5) + 1, on uint8."""
    rng = np.random.default_rng(radius)
    mask = np.zeros((53, 77), np.uint8)
    mask[10:30, 5:40] = 255
    mask[35:53, 60:77] = 128
    mask[rng.random(mask.shape) < 0.02] = 255  # isolated dots: every tap matters
    k = 2 * int(2.5 * radius + 0.5) + 1
    expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (k, 1), radius), (1, k), radius)
    got = np.asarray(masking.blur_mask(Image.fromarray(mask), radius))
    assert np.array_equal(got, expected)
    assert masking.gaussian_taps(radius, k).sum() == 256


def test_crop_region_matches_diffusers_port_of_a1111():
    """get_crop_region_v2 + expand_crop_region against diffusers' VaeImageProcessor.get_crop_region (its own port
    of A1111's), over random masks, paddings and render shapes."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(16, 96, 2))
        m = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[y:y + int(rng.integers(1, h)), x:x + int(rng.integers(1, w))] = 200
        pad, (rw, rh) = int(rng.integers(0, 40)), (int(v) * 8 for v in rng.integers(4, 16, 2))
        mask = Image.fromarray(m, "L")
        ours = masking.expand_crop_region(masking.crop_region(mask, pad), rw, rh, w, h)
        assert ours == tuple(VaeImageProcessor.get_crop_region(mask, rw, rh, pad=pad)), (h, w, pad, rw, rh)
    assert masking.crop_region(Image.new("L", (8, 8))) is None  # all black: nothing to crop (v2's None)
    # A1111's docstring example: a 128x32 mask region rendered at 512x512 becomes 128x128
    m = Image.new("L", (512, 512))
    m.paste(255, (100, 200, 228, 232))
    assert masking.expand_crop_region(masking.crop_region(m), 512, 512, 512, 512) == (100, 152, 228, 280)


def _paste_blend(dst: np.ndarray, src: np.ndarray, m: np.ndarray) -> np.ndarray:
    """PIL paste through an L mask: round((dst * (255 - m) + src * m) / 255) per channel (Paste.c BLEND)."""
    v = dst.astype(np.int64) * (255 - m[..., None]) + src.astype(np.int64) * m[..., None] + 128
    return ((v >> 8) + v) >> 8


def _unpremultiply(rgba: np.ndarray) -> np.ndarray:
    """PIL RGBa -> RGBA (Convert.c rgba2rgbA): 255 * c // a, except at a = 0 or 255."""
    a = rgba[..., 3:].astype(np.int64)
    c = rgba[..., :3].astype(np.int64)
    out = np.where((a == 0) | (a == 255), c, np.clip(255 * c // np.maximum(a, 1), 0, 255))
    return np.concatenate([out, a], -1)


def _alpha_composite_opaque(dst_rgb: np.ndarray, src: np.ndarray) -> np.ndarray:
    """PIL alpha_composite of RGBA `src` over an opaque `dst` (AlphaComposite.c, 7 extra bits, rounded)."""
    sa = src[..., 3:].astype(np.int64)
    outa255 = sa * 255 + 255 * (255 - sa)
    coef1 = sa * 255 * 255 * 128 // outa255
    coef2 = 255 * 128 - coef1
    t = src[..., :3].astype(np.int64) * coef1 + dst_rgb.astype(np.int64) * coef2 + (0x80 << 7)
    return (((t >> 8) + t) >> 8) >> 7


@pytest.mark.parametrize("area", ["whole", "masked"])
def test_overlay_compositing_as_a1111_with_pils_integer_math(area):
    """The original put back: processing.py's overlay (the picture pasted, premultiplied, through the inverted
    mask: doubled for Whole picture) alpha-composited over the render (Only masked: scaled into its place)."""
    rng = np.random.default_rng(1)
    original = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = masking.blur_mask(grid_mask(), 4)
    m = np.asarray(mask).astype(np.int64)
    s = inpaint.settings(RunConfig(inpaint_area=area, inpaint_padding=8), inpainting_model=False)
    work = inpaint.prepare(original, grid_mask(), s)
    rendered = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    got = np.asarray(work.finish(rendered)).astype(np.int64)
    # expected, from the definitions: overlay alpha = 255 - (min(2m, 255) whole | m only masked)
    shown = np.clip(m * 2, 0, 255) if area == "whole" else m
    premul = _paste_blend(np.zeros((SIZE, SIZE, 4)), np.concatenate(
        [np.asarray(original), np.full((SIZE, SIZE, 1), 255)], -1), 255 - shown)
    overlay = _unpremultiply(premul)
    if area == "whole":
        under = np.asarray(rendered)
    else:  # the crop's render scaled back (crop and resize, Lanczos) into an empty canvas, so RGB 0 outside it
        x, y, w, h = work.paste_to
        under = np.zeros((SIZE, SIZE, 3), np.int64)
        under[y:y + h, x:x + w] = np.asarray(rendered.resize((w, h), Image.Resampling.LANCZOS))  # same aspect
        assert w * SIZE == h * SIZE  # the region was expanded to the render's (square) aspect
    expected = _alpha_composite_opaque(under, overlay)
    assert np.array_equal(got, expected)
    assert np.array_equal(got[shown == 0], np.asarray(original)[shown == 0])  # kept exactly where unmasked


def test_only_masked_crops_the_expanded_region_and_renders_it_full_size():
    original = init_image()
    s = inpaint.settings(RunConfig(inpaint_area="masked", inpaint_padding=4), inpainting_model=False)
    work = inpaint.prepare(original, grid_mask(), s)
    blurred = masking.blur_mask(grid_mask(), 4)
    x1, y1, x2, y2 = VaeImageProcessor.get_crop_region(blurred, SIZE, SIZE, pad=4)
    assert work.paste_to == (x1, y1, x2 - x1, y2 - y1)
    crop = original.crop((x1, y1, x2, y2))
    assert np.array_equal(np.asarray(work.image), np.asarray(crop.resize((SIZE, SIZE), Image.Resampling.LANCZOS)))
    assert np.array_equal(np.asarray(work.mask), np.asarray(blurred.crop((x1, y1, x2, y2)).resize(
        (SIZE, SIZE), Image.Resampling.LANCZOS)))
    assert work.fields() == {"Mask blur": 4, "Inpaint area": "Only masked", "Masked area padding": 4}


def _a1111_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """modules/masking.py fill, transcribed."""
    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def test_fill_paints_the_hole_from_its_surroundings():
    rng = np.random.default_rng(2)
    picture = np.zeros((SIZE, SIZE, 3), np.uint8)
    picture[:, :32] = (200, 30, 30)
    picture[:, 32:] = (30, 30, 200)
    picture = picture + rng.integers(0, 10, picture.shape, dtype=np.uint8)
    image, mask = Image.fromarray(picture), masking.blur_mask(grid_mask(), 4)
    got = np.asarray(masking.fill(image, mask)).astype(int)
    assert np.array_equal(got, np.asarray(_a1111_fill(image, mask)))
    m = np.asarray(mask)
    assert np.array_equal(got[m == 0], picture[m == 0])  # kept pixels untouched
    hole = got[np.asarray(grid_mask()) == 255]
    assert hole.min() > 20 and hole.max() < 215  # no black: colours of the surroundings (30..209)
    left_hole = got[16:40, 8:32]  # the left block lies in the red half: it comes out red
    assert left_hole[..., 0].mean() > left_hole[..., 2].mean() + 50


def test_latent_fills_use_each_seeds_first_draw():
    """latent noise: the masked latent is each image's seed noise (A1111's create_random_tensors: a fresh
    generator per seed, i.e. the first draw of that seed); latent nothing: zeros; the kept latent unchanged."""
    latent = torch.randn(1, 4, 8, 8)
    keep = torch.ones(1, 1, 8, 8)
    keep[..., 2:5, 1:4] = 0
    noise = seed_noise([7, 8], (4, 8, 8))
    for k, s in enumerate([7, 8]):
        assert torch.equal(noise[k:k + 1], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s)))
    out = masked_start(latent, keep, "latent-noise", noise)
    hole = ~keep.bool().expand_as(out)
    assert torch.equal(out[hole], noise[hole]) and torch.equal(out[~hole], latent.expand_as(out)[~hole])
    nothing = masked_start(latent, keep, "latent-nothing")
    assert torch.equal(nothing[hole[:1]], torch.zeros(int(hole[:1].sum())))
    assert masked_start(latent, keep, "original") is latent


def test_latent_mask_is_a1111s_bicubic_rounded_one():
    """processing.py: latmask = mask.convert('RGB').resize((w/8, h/8)) (PIL's default: bicubic), / 255, rounded."""
    mask = masking.blur_mask(grid_mask(), 4)
    got = masking.latent_mask(mask, (8, 8))
    weights = np.asarray(mask.resize((8, 8), Image.Resampling.BICUBIC), np.float32) / 255  # L resizes as RGB
    assert np.array_equal(got, np.round(weights)) and set(np.unique(got)) <= {0.0, 1.0}


def test_outpainting_canvas_repeats_the_edges_and_masks_the_border():
    picture = np.asarray(init_image())
    canvas, mask = masking.pad_canvas(init_image(), None, (8, 0, 16, 24), overlap=8)
    c, m = np.asarray(canvas), np.asarray(mask)
    assert c.shape == (SIZE + 24, SIZE + 24, 3)
    assert np.array_equal(c[:SIZE, 8:8 + SIZE], picture)
    assert np.array_equal(c[:SIZE, :8], np.repeat(picture[:, :1], 8, 1))  # left edge column repeated
    assert np.array_equal(c[SIZE:, 8:8 + SIZE], np.repeat(picture[-1:], 24, 0))  # bottom row repeated
    inner = m[:SIZE - 8, 16:SIZE + 8 - 16]  # the picture less the 8-pixel overlap on its grown sides
    assert (inner == 0).all() and m[:, :16].min() == 255 and m[SIZE - 8:].min() == 255
    assert m[:, -24:].min() == 255 and (m[:SIZE - 8, 8 + SIZE - 8 - 1] == 0).all()


def test_settings_defaults_follow_the_model_kind():
    plain = inpaint.settings(RunConfig(), inpainting_model=False)
    assert (plain.blur, plain.overlay, plain.fill, plain.area, plain.padding) == (4, True, "original", "whole", 32)
    nine = inpaint.settings(RunConfig(), inpainting_model=True)
    assert (nine.blur, nine.overlay) == (0, False)  # its images stay as they were (tests/test_refactor_bytes.py)
    asked = inpaint.settings(RunConfig(mask_blur=8, overlay=True), inpainting_model=True)
    assert (asked.blur, asked.overlay) == (8, True)


# --- 3. the command --------------------------------------------------------------------------------

@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    init_image().save(tmp_path / "in.png")
    grid_mask().save(tmp_path / "mask.png")

    def run(model, *args, expect=0, command="img2img"):
        base = ["a red door", "-i", "in.png", "-m", str(model)] if command == "img2img" else []
        result = CliRunner().invoke(app, [command, *base, "--device", "cpu", *args] if command == "img2img"
                                    else [command, *args])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


FAST = ["--steps", "3", "--dtype", "fp32", "--seed", "2", "--sampler", "euler"]


def _infotext(path: str) -> dict:
    from sdcli.output.metadata import read_image_metadata

    return read_image_metadata(path)["parameters"]


def test_cli_inpaint_keeps_the_unmasked_pixels_exactly(cli, tiny_sd1, tmp_path):  # noqa: F811
    cli(tiny_sd1, "--mask", "mask.png", *FAST, "-o", "out.png")
    out, picture = np.asarray(Image.open("out.png")).astype(int), np.asarray(init_image()).astype(int)
    blurred = np.asarray(masking.blur_mask(grid_mask(), 4))
    assert np.array_equal(out[blurred == 0], picture[blurred == 0])  # the 86 levels: now 0
    assert np.abs(out - picture)[np.asarray(grid_mask()) == 255].mean() > 10  # the masked area was repainted
    params = _infotext("out.png")
    assert params["denoising_strength"] == 0.75 and params["extra"]["Mask blur"] == "4"
    assert set(params["extra"]) == {"Mask blur"}  # original, whole picture: A1111 writes nothing else
    record = json.loads(Image.open("out.png").text["sdcli"])
    assert record["mode"] == "inpaint" and record["mask"] == "mask.png"
    # without the overlay the render is the decoded latent: compositing it as A1111 gives the default output
    cli(tiny_sd1, "--mask", "mask.png", *FAST, "--no-overlay", "-o", "raw.png")
    raw = np.asarray(Image.open("raw.png"))
    assert not np.array_equal(raw[blurred == 0], picture[blurred == 0].astype(np.uint8))  # the VAE's round trip
    shown = np.clip(blurred.astype(np.int64) * 2, 0, 255)
    overlay = _unpremultiply(_paste_blend(np.zeros((SIZE, SIZE, 4)), np.concatenate(
        [picture, np.full((SIZE, SIZE, 1), 255)], -1), 255 - shown))
    assert np.array_equal(out, _alpha_composite_opaque(raw, overlay))


@pytest.mark.parametrize("flags,fields", [
    (["--inpaint-fill", "fill"], {"Mask blur": "4", "Masked content": "fill"}),
    (["--inpaint-fill", "latent-noise", "--mask-blur", "0"], {"Masked content": "latent noise"}),
    (["--inpaint-fill", "latent-nothing", "--mask-invert"],
     {"Mask mode": "Inpaint not masked", "Mask blur": "4", "Masked content": "latent nothing"}),
    (["--inpaint-area", "masked", "--inpaint-padding", "8"],
     {"Mask blur": "4", "Inpaint area": "Only masked", "Masked area padding": "8"}),
], ids=["fill", "latent-noise", "invert-latent-nothing", "only-masked"])
def test_cli_writes_a1111s_fields_and_replays_them(flags, fields, cli, tiny_sd1, tmp_path):  # noqa: F811
    from sdcli.output.replay import from_image

    cli(tiny_sd1, "--mask", "mask.png", *FAST, *flags, "-o", "out.png")
    extra = _infotext("out.png").get("extra", {})
    assert {k: v for k, v in extra.items() if k != "Version"} == fields
    ours = from_image("out.png")  # sdcli's JSON: the config keys
    given = dict(zip(flags[::2], flags[1::2]))
    if "--inpaint-fill" in given:
        assert ours.values["inpaint_fill"] == given["--inpaint-fill"]
    # the same text read as an A1111 image (no sdcli chunk) gives the same settings
    plain = Image.open("out.png")
    plain.save("a1111.png", pnginfo=_text_only(plain.text["parameters"]))
    theirs = from_image("a1111.png")
    assert theirs.mode == "inpaint"
    for key in ("inpaint_fill", "inpaint_area", "inpaint_padding", "mask_invert", "mask_blur"):
        if key in theirs.values:  # sdcli records these only when set (config sparse keys): absent = the default
            mine = ours.values.get(key, getattr(RunConfig(), key))
            assert theirs.values[key] == (mine if mine is not None else 4), key


def _text_only(text: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_cli_only_masked_leaves_everything_outside_the_region_alone(cli, tiny_sd1, tmp_path):  # noqa: F811
    cli(tiny_sd1, "--mask", "mask.png", *FAST, "--inpaint-area", "masked", "--inpaint-padding", "0",
        "--mask-blur", "0", "-o", "out.png")
    out, picture = np.asarray(Image.open("out.png")), np.asarray(init_image())
    assert out.shape == picture.shape
    m = np.asarray(grid_mask())
    assert np.array_equal(out[m == 0], picture[m == 0]) and not np.array_equal(out[m == 255], picture[m == 255])


def test_cli_outpaint_grows_the_canvas_and_keeps_the_picture(cli, tiny_sd1, tmp_path):  # noqa: F811
    cli(tiny_sd1, *FAST, "--pad", "0,8,16,0", "-o", "out.png")
    out = np.asarray(Image.open("out.png")).astype(int)
    assert out.shape == (SIZE + 8, SIZE + 16, 3)
    picture = np.asarray(init_image()).astype(int)
    # the blurred seam reaches 2 x blur = 8 pixels into the picture and blurs up to 10 more: beyond, it is exact
    assert np.array_equal(out[8 + 18:, :SIZE - 18], picture[18:, :SIZE - 18])
    assert np.abs(out[:8, :SIZE] - picture[:1, :]).mean() > 3  # the new border was painted, not left as edge copies
    assert _infotext("out.png")["extra"]["Outpaint pad"] == "0 8 16 0"
    cli(tiny_sd1, *FAST, "--pad", "0,0,3,0", "-o", "odd.png", expect=2)
    result = cli(tiny_sd1, *FAST, "--pad", "1,2", "-o", "bad.png", expect=2)
    assert "--pad" in result.stderr and not Path("bad.png").exists()


def test_cli_bad_inpaint_values_are_usage_errors(cli, tiny_sd1, tmp_path):  # noqa: F811
    result = cli(tiny_sd1, "--mask", "mask.png", *FAST, "--inpaint-fill", "blurry", "-o", "x.png", expect=2)
    assert "--inpaint-fill" in result.stderr and "latent-noise" in result.stderr
    result = cli(tiny_sd1, "--mask", "mask.png", *FAST, "--mask-blur", "-1", "-o", "x.png", expect=2)
    assert "--mask-blur" in result.stderr and not Path("x.png").exists()


def test_cli_batch_image_k_is_the_single_run_with_seed_k(cli, tiny_sd1, tmp_path):  # noqa: F811
    args = ["--mask", "mask.png", "--steps", "3", "--dtype", "fp32", "--sampler", "euler_a",
            "--inpaint-fill", "latent-noise"]
    cli(tiny_sd1, *args, "--seed", "4", "-n", "2", "--batch-size", "2", "-o", "b_{index}.png")
    cli(tiny_sd1, *args, "--seed", "5", "-o", "single.png")
    assert np.array_equal(np.asarray(Image.open("b_1.png")), np.asarray(Image.open("single.png")))


def test_verify_rerenders_an_inpainting_image(cli, tiny_sd1, tmp_path):  # noqa: F811
    cli(tiny_sd1, "--mask", "mask.png", *FAST, "--inpaint-area", "masked", "--inpaint-fill", "fill", "-o", "out.png")
    result = cli(None, "out.png", "-m", str(tiny_sd1), "--image", "in.png", "--json", command="verify")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["identical"]
    result = cli(None, "out.png", "-m", str(tiny_sd1), expect=2, command="verify")
    assert "--image" in result.stderr
    Image.fromarray(255 - np.asarray(init_image())).save("other.png")  # another picture: the pixels drift
    cli(None, "out.png", "-m", str(tiny_sd1), "--image", "other.png", expect=9, command="verify")


@pytest.mark.parametrize("size", [(64, 40), (40, 64), (64, 64), (72, 24)])
def test_resize_modes_match_diffusers_port_of_a1111(size):
    """images.resize_image 1 (crop and resize) and 2 (resize and fill) against diffusers' ports of them
    (VaeImageProcessor._resize_and_crop / _resize_and_fill, Lanczos), other aspect ratios included."""
    rng = np.random.default_rng(size[0])
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    port = VaeImageProcessor(resample="lanczos")
    for width, height in ((48, 48), (64, 32), (32, 56)):
        assert np.array_equal(np.asarray(masking.resize_image(1, picture, width, height)),
                              np.asarray(port._resize_and_crop(picture, width, height)))
        assert np.array_equal(np.asarray(masking.resize_image(2, picture, width, height)),
                              np.asarray(port._resize_and_fill(picture, width, height)))
