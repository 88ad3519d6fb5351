"""Contact sheets (A1111's row rules) and labelled plot grids (labels wrapped, scaled, never clipped)."""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdcli.output import grid


def _a1111_rows(n: int, n_rows: int, batch_size: int, prevent_empty_spots: bool) -> tuple[int, int]:
    """A1111 modules/images.py image_grid's row rule, transcribed as the oracle: opts.n_rows > 0 is taken as
    given, 0 means the batch size, -1 means round(sqrt(n)) (or, with grid_prevent_empty_spots, the largest
    count up to floor(sqrt(n)) that divides n); never more rows than images; columns = ceil(n / rows)."""
    if n_rows > 0:
        rows = n_rows
    elif n_rows == 0:
        rows = batch_size
    elif prevent_empty_spots:
        rows = math.floor(math.sqrt(n))
        while n % rows != 0:
            rows -= 1
    else:
        rows = round(math.sqrt(n))
    rows = min(rows, n)
    return rows, math.ceil(n / rows)


@pytest.mark.parametrize("n", range(1, 41))
@pytest.mark.parametrize("n_rows", [-1, 0, 1, 2, 3, 7])
@pytest.mark.parametrize("prevent", [False, True])
def test_grid_shape_follows_a1111(n, n_rows, prevent):
    batch = 1 + n % 4
    assert grid.grid_shape(n, n_rows, batch, prevent) == _a1111_rows(n, n_rows, batch, prevent)


@pytest.mark.parametrize("n, rows, cols", [(1, 1, 1), (2, 1, 2), (3, 2, 2), (4, 2, 2), (5, 2, 3), (6, 2, 3),
                                           (7, 3, 3), (9, 3, 3), (10, 3, 4), (12, 3, 4), (13, 4, 4), (16, 4, 4)])
def test_auto_rows_known_shapes(n, rows, cols):
    assert grid.grid_shape(n) == (rows, cols)


def test_prevent_empty_spots_fills_the_last_row():
    assert grid.grid_shape(6, prevent_empty_spots=True) == (2, 3)
    assert grid.grid_shape(7, prevent_empty_spots=True) == (1, 7)  # prime: one row
    assert grid.grid_shape(12, prevent_empty_spots=True) == (3, 4)


def test_image_grid_places_images_row_major_on_black():
    imgs = [Image.new("RGB", (8, 6), (10 * i, 0, 0)) for i in range(5)]
    sheet = grid.image_grid(imgs)  # 5 -> 2 rows x 3 cols
    assert sheet.size == (24, 12)
    px = np.asarray(sheet)
    for i in range(5):
        r, c = divmod(i, 3)
        assert (px[r * 6:(r + 1) * 6, c * 8:(c + 1) * 8] == (10 * i, 0, 0)).all()
    assert (px[6:, 16:] == 0).all()  # the empty spot


def test_image_grid_rows_given():
    imgs = [Image.new("RGB", (4, 4)) for _ in range(6)]
    assert grid.image_grid(imgs, rows=3).size == (8, 12)
    assert grid.image_grid(imgs, rows=0, batch_size=2).size == (12, 8)
    assert grid.image_grid(imgs, rows=10).size == (4, 24)  # capped at the image count


def test_image_grid_refuses_mixed_sizes():
    with pytest.raises(ValueError, match="differ in size"):
        grid.image_grid([Image.new("RGB", (4, 4)), Image.new("RGB", (8, 4))])


# --- labelled plots ------------------------------------------------------------------------------

SHORT = ["cfg: 3", "cfg: 7.5"]
LONG = ["a rather long prompt replacement that keeps on going well past the width of any cell",
        "Supercalifragilisticexpialidocious_without_any_spaces_at_all_in_it"]
NON_ASCII = ["Prompt S/R: 日本語の猫と犬", "Привет, мир — ünïcödé ß ✓ <script>"]
SETS = {"short": SHORT, "long": LONG, "non_ascii": NON_ASCII}


def _inside(box, area):
    return area[0] <= box[0] and area[1] <= box[1] and box[2] <= area[2] and box[3] <= area[3]


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("cell", [(64, 64), (96, 64), (512, 512), (1024, 768)])
@pytest.mark.parametrize("kind", list(SETS))
def test_every_label_lies_inside_its_area(cell, kind):
    w, h = cell
    texts = SETS[kind]
    layout = grid.plot_layout(w, h, texts, list(reversed(texts)), title=texts[0])
    fnt = grid.font(layout.font_size)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    full = (0, 0, *layout.size)
    for label in layout.labels:
        assert _inside(label.area, full)
        assert label.lines, f"{label.text!r} lost all its lines"
        for line in label.lines:
            # pillow's own measure of the drawn line, not the layout's copy of it
            drawn = draw.textbbox(line.xy, line.text, font=fnt, anchor="la")
            assert drawn == line.box
            assert _inside(drawn, label.area), (label.text, line.text, drawn, label.area)
        # no text lost in wrapping: the lines hold every non-space character, in order
        assert "".join(x.text for x in label.lines).replace(" ", "") == label.text.replace(" ", "")
    cells = [(x, y, x + w, y + h) for x, y in layout.cells]
    for i, a in enumerate(layout.labels):
        for b in layout.labels[i + 1:]:
            assert not _overlap(a.area, b.area), (a.text, b.text)
        for c in cells:
            assert not _overlap(a.area, c)
            assert _inside(c, full)


@pytest.mark.parametrize("cell", [(64, 64), (512, 512)])
def test_font_scales_with_the_cell_and_stays_legible(cell):
    layout = grid.plot_layout(*cell, SHORT, SHORT)
    assert layout.font_size == max(grid.MIN_FONT, sum(cell) // 25)  # A1111's size when everything fits


def test_long_labels_shrink_the_font_but_not_below_the_minimum():
    twice = [LONG[0] + " " + LONG[0]]
    big = grid.plot_layout(512, 512, LONG, twice)
    assert grid.MIN_FONT < big.font_size < 1024 // 25
    assert max(len(label.lines) for label in big.labels) * big.font_size <= 512  # it fits at the smaller font
    tiny = grid.plot_layout(64, 64, LONG * 2, LONG * 2)
    assert tiny.font_size == grid.MIN_FONT
    # even at the smallest font the row labels did not fit a 64 px row: the rows spread out rather than clip
    rows = sorted({y for _, y in tiny.cells})
    assert rows[1] - rows[0] > 64


def test_plot_grid_ink_only_inside_label_areas():
    """Draw on flat grey cells: every dark pixel outside the cells is text, and lies in some label's area."""
    cells = [Image.new("RGB", (64, 64), (128, 128, 128)) for _ in range(4)]
    x, y = LONG, NON_ASCII
    plot = grid.plot_grid(cells, x, y, title="z: " + SHORT[0])
    layout = grid.plot_layout(64, 64, x, y, title="z: " + SHORT[0])
    assert plot.size == layout.size
    ink = np.asarray(plot.convert("L")) < 100
    allowed = np.zeros_like(ink)
    for label in layout.labels:
        l, t, r, b = label.area
        allowed[t:b, l:r] = True
        assert ink[t:b, l:r].any(), f"{label.text!r} drew nothing"
    assert not (ink & ~allowed).any()
    for cx, cy in layout.cells:
        assert (np.asarray(plot)[cy:cy + 64, cx:cx + 64] == 128).all()


def test_plot_without_row_labels_has_no_left_band():
    layout = grid.plot_layout(64, 64, SHORT, [""])
    assert layout.cells[0][0] == 0


def test_plot_grid_needs_one_image_per_cell():
    with pytest.raises(ValueError, match="needs 4 images"):
        grid.plot_grid([Image.new("RGB", (8, 8))] * 3, SHORT, SHORT)
