"""verify --report: the numbers shown equal the input, user text is escaped, and a real browser shows it all."""

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _browser import find_browser, load_page
from sdcli.output import report
from sdcli.runtime.errors import OutputError

EVIL = '<script>alert("x")</script> & "quotes" \'single\' </textarea> ]]> \u2028'


def _psnr_max(a: Image.Image, b: Image.Image) -> tuple[float, int]:
    """PSNR and max difference computed here with numpy, independently of sdcli."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = np.mean((x - y) ** 2)
    return (math.inf if mse == 0 else 10 * math.log10(255**2 / mse)), int(np.abs(x - y).max())


def _entry(name: str, seed: int, shift: int, min_psnr: float = 40.0, settings=None) -> report.ReportEntry:
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 250, (48, 64, 3), dtype=np.uint8)
    again = stored.copy()
    again[5:15, 20:40] += np.uint8(shift)
    a, b = Image.fromarray(stored), Image.fromarray(again)
    psnr, max_diff = _psnr_max(a, b)
    result = {"psnr": psnr, "max_diff": max_diff, "identical": shift == 0, "path": name, "min_psnr": min_psnr,
              "passed": psnr >= min_psnr, "same_model": True}
    return report.ReportEntry(result, a, b, settings if settings is not None else {"seed": seed, "prompt": "p"})


def _entries():
    return [_entry("same.png", 1, 0), _entry("slight.png", 2, 1), _entry("drift.png", 3, 60),
            _entry(EVIL, 4, 9, settings={"prompt": EVIL, "cfg": 7.5, "loras": [{"name": EVIL}]})]


class _Page(HTMLParser):
    """textContent of every element with a class (by_class[name] in document order), <img> srcs, <script>s."""

    VOID = {"img", "meta", "br", "link", "hr", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.open, self.by_class, self.imgs, self.scripts = [], {}, [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs["src"])
        if tag in self.VOID:
            return
        slots = []
        for name in (attrs.get("class") or "").split():
            self.by_class.setdefault(name, []).append("")
            slots.append((name, len(self.by_class[name]) - 1))
        if tag == "script":
            self.scripts.append([attrs, ""])
        self.open.append((tag, slots))

    def handle_endtag(self, tag):
        while self.open and self.open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for _, slots in self.open:
            for name, i in slots:
                self.by_class[name][i] += data
        if self.open and self.open[-1][0] == "script":
            self.scripts[-1][1] += data


def _parse(text: str) -> _Page:
    return _Page(text)


def test_numbers_on_the_page_equal_the_input_failures_first():
    entries = _entries()
    page = _parse(report.render_html(entries, lambda i, kind, img: report.data_uri(img)))
    shown = [e for e in entries if not e.result["passed"]] + [e for e in entries if e.result["passed"]]
    assert [e.result["path"] for e in report.ordered(entries)] == [e.result["path"] for e in shown]
    assert page.by_class["path"] == [e.result["path"] for e in shown]
    assert page.by_class["psnr"] == [("inf (identical)" if e.result["psnr"] == math.inf
                                      else f"{e.result['psnr']:.2f}") for e in shown]
    assert page.by_class["max-diff"] == [str(e.result["max_diff"]) for e in shown]
    assert page.by_class["verdict"] == ["PASS" if e.result["passed"] else "FAIL" for e in shown]
    failed = sum(not e.result["passed"] for e in entries)
    assert page.by_class["failed"] == [str(failed)] and page.by_class["passed"] == [str(len(entries) - failed)]
    assert failed == 2  # the data has both kinds


def test_embedded_json_is_verify_json_in_page_order():
    entries = _entries()
    page = _parse(report.render_html(entries, lambda i, kind, img: report.data_uri(img)))
    assert len(page.scripts) == 1 and page.scripts[0][0] == {"type": "application/json", "id": "verify-results"}
    data = json.loads(page.scripts[0][1])
    expected = [dict(e.result, kind="verify", psnr=None if e.result["psnr"] == math.inf else round(e.result["psnr"], 3))
                for e in report.ordered(entries)]
    assert data == expected
    assert data[2]["path"] == "same.png" and data[2]["psnr"] is None  # identical: first of the passes


def test_user_text_is_escaped():
    html = report.render_html(_entries(), lambda i, kind, img: report.data_uri(img))
    assert "<script>alert" not in html and "</textarea>" not in html
    assert html.count("<script") == 1  # only the inert JSON block
    page = _parse(html)
    assert EVIL in page.by_class["path"]
    assert EVIL in [d["path"] for d in json.loads(page.scripts[0][1])]
    # the settings table shows the prompt as text, escaped
    assert report._esc(EVIL) in html


def test_heat_map_is_black_where_equal_and_brighter_where_more_different():
    a = Image.fromarray(np.full((4, 6, 3), 100, np.uint8))
    arr = np.asarray(a).copy()
    for col, d in enumerate([0, 1, 4, 16, 64, 155]):
        arr[:, col, col % 3] += np.uint8(d)  # one channel each: the largest channel counts
    heat = np.asarray(report.heat_map(a, Image.fromarray(arr)), dtype=np.int64)
    assert (heat[:, 0] == 0).all()
    brightness = heat[0].sum(axis=1)
    assert all(brightness[i] < brightness[i + 1] for i in range(5))
    assert (heat == heat[0]).all()  # each column one colour
    assert report.heat_map(a, Image.new("RGB", (5, 4))) is None


def test_size_mismatch_shows_the_note_and_no_heat_map():
    a, b = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 48))
    result = {"psnr": 0.0, "max_diff": 255, "identical": False, "note": "sizes differ: (64, 64) vs (64, 48)",
              "path": "x.png", "min_psnr": 40.0, "passed": False, "same_model": False}
    html = report.render_html([report.ReportEntry(result, a, b)], lambda i, kind, img: f"{i}-{kind}.png")
    assert "sizes differ: (64, 64) vs (64, 48)" in html and "0-diff.png" not in html
    assert "0-stored.png" in html and "sha256 differs" in html


def test_single_file_report_inlines_everything(tmp_path):
    out = report.write_report(_entries(), tmp_path / "report.html")
    page = _parse(out.read_text(encoding="utf-8"))
    assert len(page.imgs) == 1 + 3 * 4 and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert "http:" not in out.read_text() and "https:" not in out.read_text()
    with pytest.raises(OutputError, match="exists"):
        report.write_report(_entries(), out)
    assert report.write_report(_entries()[:1], out, overwrite=True) == out


def test_report_dir_links_pngs_beside_the_page(tmp_path):
    index = report.write_report_dir(_entries(), tmp_path / "rep")
    assert index == tmp_path / "rep" / "index.html"
    page = _parse(index.read_text(encoding="utf-8"))
    assert len(page.imgs) == 13
    for src in page.imgs:
        assert "/" not in src and not src.startswith("data:")
        assert Image.open(tmp_path / "rep" / src).size[0] > 0
    first = [s for s in page.imgs if s.startswith("001-")]
    assert [s.rsplit("-", 1)[1] for s in first] == ["stored.png", "rerender.png", "diff.png"]
    with pytest.raises(OutputError, match="exists"):
        report.write_report_dir(_entries(), tmp_path / "rep")


# --- a real browser ------------------------------------------------------------------------------

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium/chrome on PATH (Debian: apt-get install "
                                   "chromium; `make install` tries it) - the report was not checked in a browser")


@needs_browser
@pytest.mark.parametrize("variant", ["single", "dir"])
def test_report_loads_in_a_browser_with_every_image_and_no_errors(tmp_path, variant):
    entries = _entries()
    page = (report.write_report(entries, tmp_path / "report.html") if variant == "single"
            else report.write_report_dir(entries, tmp_path / "rep"))
    seen = load_page(BROWSER, page)
    assert seen["errors"] == []
    assert len(seen["images"]) == 13
    for img in seen["images"]:
        assert img["complete"] and img["naturalWidth"] > 0, img
    assert seen["title"] == "sdcli verify report"
    assert "2 failed" in seen["text"] and EVIL in seen["text"]  # the escaped text shows as typed


@needs_browser
def test_the_browser_check_sees_broken_images_and_errors(tmp_path):
    """The harness itself can fail: a missing image, a console error and a blocked fetch are all reported."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                   "content=\"default-src 'none'; img-src 'self'; script-src 'unsafe-inline'\"></head><body>"
                   '<img src="missing.png"><img src="https://example.invalid/x.png">'
                   '<script>console.error("boom")</script></body></html>')
    seen = load_page(BROWSER, bad)
    assert [img["naturalWidth"] for img in seen["images"]] == [0, 0]
    assert any("boom" in e for e in seen["errors"])
    assert any("example.invalid" in e or "Content Security Policy" in e for e in seen["errors"])
