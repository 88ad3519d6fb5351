"""The size a render plans for its hires-fix images is the size the second pass renders.

Before the first image, `generate --grid` checks the contact sheet's size and `sweep` each plot's size from the
images' final size (render._final_size). The hires pass rounds its size to the family's grid: 16 px for SD3 and
FLUX (a token is a 2x2 patch of 8-pixel latent cells), 8 for the UNet families. At 64x64 x1.4 the two roundings
differ (64/16*1.4 = 5.6 -> 6 cells = 96 px; 64/8*1.4 = 11.2 -> 11 cells = 88 px), so a plan rounded to 8 px
would check a sheet of 88 px cells while the images are 96 px. Tiny random DiT files (tests/_fixtures_dit.py),
through the real commands, CPU.
"""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from _fixtures_dit import dit_components, dit_dir, tiny_flux, tiny_sd3  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli.app import hires_fix, save
from sdcli.cli import app
from sdcli.families import by_name
from sdcli.output import grid

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, SCALE = 64, 1.4


def test_the_scale_lands_on_different_sizes_on_the_8_and_16_pixel_grids():
    """The premise of the tests below, from the rounding rule itself (pipeline.hires_size)."""
    from sdcli.pipeline import hires_size

    assert hires_size(SIZE, SIZE, SCALE, 16) != hires_size(SIZE, SIZE, SCALE, 8)
    assert hires_fix.output_size(by_name("flux"), (SIZE, SIZE), SCALE) == hires_size(SIZE, SIZE, SCALE, 16)
    assert hires_fix.output_size(by_name("sd1"), (SIZE, SIZE), SCALE) == hires_size(SIZE, SIZE, SCALE, 8)


def test_a_grid_is_checked_at_the_size_the_flux_hires_pass_renders(tiny_flux, dit_components, tmp_path,
                                                                    monkeypatch):  # noqa: F811
    planned = []
    real = save.check_grid
    monkeypatch.setattr(save, "check_grid", lambda req, count, size, batch: planned.append(size)
                        or real(req, count, size, batch))
    out = tmp_path / "h.png"
    result = CliRunner().invoke(app, [
        "generate", "a cat", "-m", str(tiny_flux), "--vae", str(dit_components["vae"]),
        "--clip-l", str(dit_components["clip_l"]), "--t5", str(dit_components["t5"]), "--steps", "1",
        "-W", str(SIZE), "-H", str(SIZE), "--hires-scale", str(SCALE), "--hires-steps", "1", "-o", str(out),
        "--grid", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    with Image.open(out) as img:
        made = img.size
    assert made == hires_fix.output_size(by_name("flux"), (SIZE, SIZE), SCALE)[::-1]
    assert planned == [made]


def test_a_sweep_plot_is_checked_at_the_size_its_sd3_hires_cells_render(tiny_sd3, tmp_path,
                                                                        monkeypatch):  # noqa: F811
    checked = []
    real = grid.check_sheet_size
    monkeypatch.setattr(grid, "check_sheet_size", lambda w, h, what: checked.append((w, h, what))
                        or real(w, h, what))
    result = CliRunner().invoke(app, [
        "sweep", "a cat", "-m", str(tiny_sd3), "--x", "seed=1,2", "--steps", "1", "-W", str(SIZE), "-H", str(SIZE),
        "--hires-scale", str(SCALE), "--hires-steps", "1", "-o", str(tmp_path / "plot.png"),
        "--keep-cells", str(tmp_path / "cells")])
    assert result.exit_code == 0, result.output
    cells = sorted((tmp_path / "cells").glob("*.png"))
    assert len(cells) == 2
    with Image.open(cells[0]) as img:
        w, h = img.size
    assert (w, h) == hires_fix.output_size(by_name("sd3"), (SIZE, SIZE), SCALE)[::-1]
    assert checked[0][:2] == (2 * w, h)  # before any cell: the cells alone, two columns of one row
