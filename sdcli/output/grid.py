"""Pictures made of pictures: contact sheets of a run's images and labelled plot grids for sweeps.

`image_grid` follows A1111's layout rules (modules/images.py image_grid): -1 picks round(sqrt(n)) rows, 0 one
row per batch, a positive number is taken as given (capped at the image count), and the columns are whatever it
takes. `plot_grid` draws the shape of A1111's draw_grid_annotations: column labels above, row labels on the left,
text wrapped to its cell. Unlike A1111 a label is never clipped: the font shrinks (not below a legible minimum)
until every label fits, and at the minimum the label bands grow instead. The font is pillow's scalable default,
so the layout does not depend on the fonts a machine has. No torch here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from sdcli.runtime.errors import UsageError

AUTO_ROWS = -1  # A1111's n_rows default: round(sqrt(n)) rows
BATCH_ROWS = 0  # A1111: one row per batch
MIN_FONT = 12  # pixels; smaller than this is not read, whatever the cell size
TEXT_COLOUR = (0, 0, 0)
BACKGROUND = (255, 255, 255)
# PIL refuses to open a bigger image (DecompressionBombError at twice Image.MAX_IMAGE_PIXELS): a sheet past it
# could be read by no PIL-based tool, and would hold 0.5 GB of RGB in memory before it is written.
MAX_SHEET_PIXELS = 2 * 89_478_485


def check_sheet_size(width: int, height: int, what: str) -> None:
    """A contact sheet or plot of this size can be made (before any image of it is rendered, and again before
    the canvas is allocated): UsageError naming the size otherwise."""
    if width * height > MAX_SHEET_PIXELS:
        raise UsageError(f"{what} would be {width}x{height} pixels, over the {MAX_SHEET_PIXELS:,} a PNG reader "
                         "accepts: use fewer images, smaller images or fewer values per axis")


def sheet_size(count: int, cell: tuple[int, int], rows: int = -1, batch_size: int = 1) -> tuple[int, int]:
    """(width, height) of image_grid's sheet of `count` images of size `cell`."""
    n_rows, n_cols = grid_shape(count, rows, batch_size)
    return n_cols * cell[0], n_rows * cell[1]


# --- contact sheets ------------------------------------------------------------------------------

def grid_shape(count: int, rows: int = AUTO_ROWS, batch_size: int = 1,
               prevent_empty_spots: bool = False) -> tuple[int, int]:
    """(rows, cols) of A1111's image grid for `count` images. `prevent_empty_spots` is A1111's option of the same
    name: the largest row count up to sqrt(n) that divides n, so the last row is full."""
    if count < 1:
        raise ValueError("a grid needs at least one image")
    if rows > 0:
        pass
    elif rows == BATCH_ROWS:
        rows = batch_size
    elif prevent_empty_spots:
        rows = math.floor(math.sqrt(count))
        while count % rows:
            rows -= 1
    else:
        rows = round(math.sqrt(count))
    rows = min(rows, count)
    return rows, math.ceil(count / rows)


def image_grid(images: list[Image.Image], rows: int = AUTO_ROWS, batch_size: int = 1,
               prevent_empty_spots: bool = False) -> Image.Image:
    """A contact sheet: the images left to right, top to bottom, on black (A1111's look)."""
    n_rows, n_cols = grid_shape(len(images), rows, batch_size, prevent_empty_spots)
    w, h = _same_size(images)
    check_sheet_size(n_cols * w, n_rows * h, "the contact sheet")
    sheet = Image.new("RGB", (n_cols * w, n_rows * h), "black")
    for i, img in enumerate(images):
        sheet.paste(img.convert("RGB"), (i % n_cols * w, i // n_cols * h))
    return sheet


def _same_size(images: list[Image.Image]) -> tuple[int, int]:
    sizes = {img.size for img in images}
    if len(sizes) != 1:
        raise ValueError(f"grid images differ in size: {sorted(sizes)}")
    return sizes.pop()


# --- labelled plots ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    text: str
    xy: tuple[int, int]  # where to draw it with anchor "la" (left, ascender)
    box: tuple[int, int, int, int]  # the pixels its glyphs cover: left, top, right, bottom (exclusive)


@dataclass(frozen=True)
class Label:
    text: str
    area: tuple[int, int, int, int]  # the band it owns: left, top, right, bottom (exclusive)
    lines: tuple[Line, ...]


@dataclass(frozen=True)
class PlotLayout:
    size: tuple[int, int]
    font_size: int
    cells: tuple[tuple[int, int], ...]  # top-left corner of each cell image, row-major (y outer, x inner)
    labels: tuple[Label, ...]  # title (if any), then the x labels, then the y labels


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def plot_layout(cell_w: int, cell_h: int, x_labels: list[str], y_labels: list[str], title: str = "",
                margin: int = 0) -> PlotLayout:
    """Where every cell and every line of label text goes, for a plot of len(y_labels) rows of len(x_labels)
    cells. The largest font up to A1111's (cell_w + cell_h) // 25 with which every label fits its band."""
    x_labels, y_labels = list(x_labels) or [""], list(y_labels) or [""]
    size = max(MIN_FONT, (cell_w + cell_h) // 25)
    while True:
        if size == MIN_FONT or _fits(_wrap_all(size, cell_w, x_labels, y_labels, title), size, cell_h):
            break
        size = max(MIN_FONT, size - max(1, size // 10))
    return _place(size, cell_w, cell_h, x_labels, y_labels, title, margin)


def plot_grid(images: list[Image.Image], x_labels: list[str], y_labels: list[str], title: str = "",
              margin: int = 0) -> Image.Image:
    """One labelled plot: `images` row-major (row = y value, column = x value), labels drawn with pillow."""
    cols, rows = max(1, len(x_labels)), max(1, len(y_labels))
    if len(images) != cols * rows:
        raise ValueError(f"a {cols}x{rows} plot needs {cols * rows} images, got {len(images)}")
    w, h = _same_size(images)
    layout = plot_layout(w, h, x_labels, y_labels, title, margin)
    check_sheet_size(*layout.size, "the plot")
    plot = Image.new("RGB", layout.size, BACKGROUND)
    for img, corner in zip(images, layout.cells):
        plot.paste(img.convert("RGB"), corner)
    draw = ImageDraw.Draw(plot)
    fnt = font(layout.font_size)
    for label in layout.labels:
        for line in label.lines:
            draw.text(line.xy, line.text, font=fnt, fill=TEXT_COLOUR, anchor="la")
    return plot


def _gap(size: int) -> int:
    """Padding inside a label band and between lines."""
    return max(2, size // 4)


def _left_band(size: int, cell_w: int, y_labels: list[str]) -> int:
    if not any(t.strip() for t in y_labels):
        return 0
    return max(cell_w * 3 // 4, 6 * size)  # A1111's 3/4 of a cell; enough for a few words on small cells


def _wrap_all(size, cell_w, x_labels, y_labels, title):
    """Every label wrapped at this font size: (left band width, column stacks, row stacks, title stack)."""
    gap, fnt = _gap(size), font(size)
    left = _left_band(size, cell_w, y_labels)
    tops = [_stack(fnt, t, cell_w - 2 * gap, gap) for t in x_labels]
    sides = [_stack(fnt, t, left - 2 * gap, gap) for t in y_labels]
    head = _stack(fnt, title, left + cell_w * len(x_labels) - 2 * gap, gap)
    return left, tops, sides, head


def _fits(wrapped, size, cell_h) -> bool:
    """Row labels within a row; column labels and the title within half a row."""
    _, tops, sides, head = wrapped
    return (max(s[1] for s in sides) + 2 * _gap(size) <= cell_h
            and max(t[1] for t in tops) + head[1] <= cell_h // 2)


def _place(size, cell_w, cell_h, x_labels, y_labels, title, margin) -> PlotLayout:
    gap = _gap(size)
    left, tops, sides, head = _wrap_all(size, cell_w, x_labels, y_labels, title)
    head_h = head[1] + 2 * gap if head[0] else 0
    label_h = max(t[1] for t in tops)
    top = head_h + (label_h + 2 * gap if label_h else 0)
    # A row is a cell high, unless a row label is taller even at the smallest font: then the rows spread out.
    row_h = max(cell_h, max(s[1] for s in sides) + 2 * gap)
    width = left + cell_w * len(x_labels) + margin * (len(x_labels) - 1)
    height = top + row_h * len(y_labels) + margin * (len(y_labels) - 1)
    labels, cells = [], []
    if head[0]:
        labels.append(_label(title, head, (0, 0, width, head_h), gap))
    for ix, stack in enumerate(tops):
        x0 = left + ix * (cell_w + margin)
        labels.append(_label(x_labels[ix], stack, (x0, head_h, x0 + cell_w, top), gap))
    for iy, stack in enumerate(sides):
        y0 = top + iy * (row_h + margin)
        labels.append(_label(y_labels[iy], stack, (0, y0, left, y0 + row_h), gap))
        cells += [(left + ix * (cell_w + margin), y0 + (row_h - cell_h) // 2) for ix in range(len(x_labels))]
    return PlotLayout((width, height), size, tuple(cells), tuple(labels))


def _label(text: str, stack, area: tuple[int, int, int, int], gap: int) -> Label:
    """Centre a wrapped stack of lines in its area."""
    lines, stack_h = stack
    cx = (area[0] + area[2]) / 2
    y = (area[1] + area[3] - stack_h) // 2
    placed = []
    for line_text, (l, t, r, b) in lines:
        x = round(cx - (l + r) / 2)
        top = y - min(0, t)  # a glyph above the ascender (an accent) moves its line down
        placed.append(Line(line_text, (x, top), (x + l, top + t, x + r, top + b)))
        y += max(b, 0) - min(0, t) + gap
    return Label(text, area, tuple(placed))


def _stack(fnt, text: str, max_width: int, gap: int):
    """The lines `text` wraps to within `max_width` with their glyph boxes, and the stack's height."""
    lines = [(line, fnt.getbbox(line, anchor="la")) for line in wrap(fnt, text, max(1, max_width))]
    height = sum(max(b, 0) - min(0, t) for _, (_, t, _, b) in lines) + gap * max(0, len(lines) - 1)
    return lines, height


def wrap(fnt, text: str, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width; a word wider than the line is broken between characters."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and _width(fnt, joined) <= max_width:
            lines[-1] = joined
        else:
            lines += _break_word(fnt, word, max_width)
    return lines


def _break_word(fnt, word: str, max_width: int) -> list[str]:
    pieces = [""]
    for ch in word:
        if pieces[-1] and _width(fnt, pieces[-1] + ch) > max_width:
            pieces.append(ch)
        else:
            pieces[-1] += ch
    return pieces


def _width(fnt, text: str) -> int:
    left, _, right, _ = fnt.getbbox(text, anchor="la")
    return right - left
