"""Draw the README's pictures of a sweep plot and a verify report from synthetic test data (no model).

    python scripts/make_docs_images.py            # docs/images/sweep-layout.png (+ verify-report.png with a browser)

The cells are procedural pictures (soft colour blobs whose contrast follows "cfg" and whose detail follows
"steps"), not model output: the pictures show the layout sdcli draws - labels, wrapping, the z title, the
report's heat map - and stay small and reproducible. The report screenshot needs chromium (tests/_browser.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdcli.output import grid

from sdcli.output import report

from sdcli.app import sweep_axes  # noqa: E402

CELL = 96


def cell_picture(cfg: float, steps: int, seed: int, size: int = CELL) -> Image.Image:
    """Soft blobs: more steps -> more rings of detail, higher cfg -> more contrast and saturation."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(4):
        cx, cy, hue = rng.random(3)
        r = np.hypot(xx - cx, yy - cy)
        blob = np.exp(-(r * 3) ** 2) * (0.6 + 0.4 * np.cos(r * steps * 1.5))
        colour = 0.5 + 0.5 * np.cos(2 * math.pi * (hue + np.array([0, 1 / 3, 2 / 3])))
        img += blob[..., None] * colour
    img = 0.5 + (img / img.max() - 0.5) * (cfg / 10)
    return Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))


def sweep_picture() -> Image.Image:
    prompt = "a watercolour of a lighthouse at dusk"
    x = sweep_axes.parse_axis("cfg=3,7,11")
    y = sweep_axes.parse_axis('prompt_sr=watercolour,"oil painting, thick brush strokes"', "--y")
    z = sweep_axes.parse_axis("steps=8", "--z")
    cells = sweep_axes.expand(prompt, "", x, y, z)
    images = [cell_picture(c.settings["cfg"], c.settings["steps"], seed=c.index[1]) for c in cells]
    return grid.plot_grid(images, x.labels(), y.labels(), title=z.labels()[0])


def report_screenshot(out: Path) -> bool:
    sys.path.insert(0, str(ROOT / "tests"))
    from _browser import find_browser, load_page

    browser = find_browser()
    if browser is None:
        print("no chromium on PATH: skipped the report screenshot", file=sys.stderr)
        return False
    stored = cell_picture(7, 12, seed=3, size=128)
    drifted = np.asarray(stored).copy()
    drifted[40:80, 50:100] = np.clip(drifted[40:80, 50:100].astype(int) + 12, 0, 255)
    again = Image.fromarray(drifted.astype(np.uint8))
    psnr, max_diff = _compare(stored, again)
    result = {"psnr": psnr, "max_diff": max_diff, "identical": False, "path": "ci/smoke-042.png",
              "min_psnr": 40.0, "passed": psnr >= 40.0, "same_model": True}
    settings = {"prompt": "a watercolour of a lighthouse at dusk", "sampler": "dpm++_2m", "steps": 12,
                "cfg": 7.0, "seed": 42, "dtype": "fp32"}
    entries = [report.ReportEntry(result, stored, again, settings)]
    with tempfile.TemporaryDirectory() as tmp:
        page = report.write_report(entries, Path(tmp) / "report.html")
        shot = Path(tmp) / "shot.png"
        load_page(browser, page, screenshot=shot)
        Image.open(shot).crop((0, 0, 1100, 640)).convert("RGB").save(out, optimize=True)
    return True


def _compare(a: Image.Image, b: Image.Image) -> tuple[float, int]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return (math.inf if mse == 0 else 10 * math.log10(255**2 / mse)), int(np.abs(x - y).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sweep = args.out / "sweep-layout.png"
    sweep_picture().save(sweep, optimize=True)
    print(f"wrote {sweep}")
    if report_screenshot(args.out / "verify-report.png"):
        print(f"wrote {args.out / 'verify-report.png'}")


if __name__ == "__main__":
    main()
