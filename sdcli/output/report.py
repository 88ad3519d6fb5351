"""`verify --report`: one HTML page that shows what a re-render changed, for people reading a CI failure.

Per image: the stored image, the re-render, a heat map of their difference, PSNR, max difference, the settings
and pass/fail; failures first. `write_report` makes a single self-contained file (images inlined as data: URIs,
no scripts, no network: its Content-Security-Policy forbids any fetch); `write_report_dir` writes index.html
with the PNGs beside it. Every string from the user (paths, prompts, settings) is HTML-escaped; the numbers are
also embedded as JSON (the same form as `verify --json`) for tools. No torch here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from sdcli.runtime.errors import OutputError
from sdcli.output.targets import atomic_write_bytes, slugify

KINDS = ("stored", "rerender", "diff")
CAPTIONS = {"stored": "stored image", "rerender": "re-render", "diff": "difference (log scale)"}
# A perceptual dark-to-bright map (the shape of matplotlib's "inferno"): 0 is black, so identical is black.
_MAP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_MAP_RGB = np.array([(0, 0, 0), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)
LEGEND_LEVELS = (0, 1, 4, 16, 64, 255)


@dataclass(frozen=True)
class ReportEntry:
    """One verified image: `result` is the dict run_verify builds (compare_images' psnr/max_diff/identical
    [/note], plus path, min_psnr, passed, same_model); the two images are what compare_images compared."""

    result: dict[str, Any]
    stored: Image.Image
    rerender: Image.Image
    settings: dict[str, Any] = field(default_factory=dict)  # what was re-rendered: prompt, sampler, seed, ...


def verify_json(result: dict[str, Any]) -> dict[str, Any]:
    """A verify result as `verify --json` prints it: PSNR rounded to 3 decimals, null when identical (inf)."""
    psnr = result["psnr"]
    return {"kind": "verify", **result, "psnr": None if psnr == math.inf else round(psnr, 3)}


def heat_map(stored: Image.Image, rerender: Image.Image) -> Image.Image | None:
    """The largest per-channel difference of each pixel, on a log scale (1 level of 255 is already visible),
    colour-mapped; None when the sizes differ."""
    if stored.size != rerender.size:
        return None
    a = np.asarray(stored.convert("RGB"), dtype=np.int16)
    b = np.asarray(rerender.convert("RGB"), dtype=np.int16)
    levels = np.abs(a - b).max(axis=2)
    return Image.fromarray(_colour(levels), "RGB")


def _colour(levels: np.ndarray) -> np.ndarray:
    t = np.log1p(levels.astype(np.float64)) / math.log1p(255)
    rgb = [np.interp(t, _MAP_STOPS, _MAP_RGB[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def legend_strip(width: int = 256, height: int = 12) -> Image.Image:
    """The colour map from 0 to 255 levels of difference, left to right, on the same log scale."""
    levels = np.expm1(np.linspace(0, math.log1p(255), width))
    return Image.fromarray(np.repeat(_colour(levels)[None], height, axis=0), "RGB")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(img)).decode("ascii")


def ordered(entries: list[ReportEntry]) -> list[ReportEntry]:
    """Failures first, each group in the order given."""
    return sorted(entries, key=lambda e: bool(e.result.get("passed")))


def render_html(entries: list[ReportEntry], image_url: Callable[[int, str, Image.Image], str],
                title: str = "sdcli verify report") -> str:
    """The page; `image_url(position, kind, image)` gives each <img> its src (kind: stored, rerender, diff)."""
    entries = ordered(entries)
    failed = sum(not e.result.get("passed") for e in entries)
    sections = [_section(i, e, image_url) for i, e in enumerate(entries)]
    legend = image_url(-1, "legend", legend_strip())
    results = json.dumps([verify_json(e.result) for e in entries], ensure_ascii=False, default=str)
    return _PAGE.format(
        title=_esc(title), css=_CSS, count=len(entries), images="image" if len(entries) == 1 else "images",
        failed=failed, passed=len(entries) - failed,
        status="fail" if failed else "pass", legend=_esc(legend),
        legend_ticks="".join(f'<span style="left:{math.log1p(v) / math.log1p(255) * 100:.1f}%">{v}</span>'
                             for v in LEGEND_LEVELS),
        sections="\n".join(sections), results=_script_safe(results))


def write_report(entries: list[ReportEntry], path: str | Path, overwrite: bool = False) -> Path:
    """One self-contained HTML file, images inlined."""
    page = render_html(entries, lambda _i, _kind, img: data_uri(img))
    return atomic_write_bytes(path, page.encode("utf-8"), overwrite=overwrite)


def report_dir_files(folder: str | Path, paths: list) -> list[Path]:
    """Every file `write_report_dir` may write for images `paths` (in the order given), index.html last: known
    before any image is verified, so all of them are checked before a model loads (verify's plan)."""
    folder = Path(folder)
    files = [folder / _png_name(n, path, kind) for n, path in enumerate(paths) for kind in KINDS]
    return [*files, folder / "legend.png", folder / "index.html"]


def _png_name(n: int, path, kind: str) -> str:
    """NNN-NAME-KIND.png, NNN the image's place on the command line (not on the page, which sorts failures first):
    so the names do not depend on the outcome, and can be checked before the work."""
    return f"{n + 1:03d}-{slugify(Path(str(path)).stem)}-{kind}.png"


def write_report_dir(entries: list[ReportEntry], folder: str | Path, overwrite: bool = False) -> Path:
    """`folder`/index.html linking PNGs written beside it (report_dir_files names them). Nothing there is replaced
    without `overwrite`. The page is written last, so a report that stopped half-way has no page pointing at
    missing images."""
    folder = Path(folder)
    index = folder / "index.html"
    if index.exists() and not overwrite:
        raise OutputError(f"{index}: already exists (pass --overwrite to replace it)")
    place = {id(e): n for n, e in enumerate(entries)}
    names: dict[tuple[int, str], str] = {}
    entries = ordered(entries)

    def link(i: int, kind: str, img: Image.Image) -> str:
        if (i, kind) not in names:
            name = "legend.png" if i < 0 else _png_name(place[id(entries[i])], entries[i].result.get("path", ""), kind)
            atomic_write_bytes(folder / name, png(img), overwrite=overwrite)
            names[(i, kind)] = name
        return names[(i, kind)]

    page = render_html(entries, link)
    return atomic_write_bytes(index, page.encode("utf-8"), overwrite=overwrite)


# --- page pieces ---------------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _script_safe(text: str) -> str:
    """JSON inside <script type=application/json>: no '<' may end the element early."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def psnr_text(psnr: float) -> str:
    return "inf (identical)" if psnr == math.inf else f"{psnr:.2f}"


def _section(i: int, entry: ReportEntry, image_url) -> str:
    r = entry.result
    ok = bool(r.get("passed"))
    notes = []
    if r.get("note"):
        notes.append(str(r["note"]))
    if r.get("same_model") is False:
        notes.append("not the checkpoint the image was made with (sha256 differs)")
    diff = heat_map(entry.stored, entry.rerender)
    figures = [_figure(image_url(i, "stored", entry.stored), "stored"),
               _figure(image_url(i, "rerender", entry.rerender), "rerender")]
    if diff is not None:
        figures.append(_figure(image_url(i, "diff", diff), "diff"))
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_show(v))}</td></tr>" for k, v in entry.settings.items())
    return _SECTION.format(
        status="pass" if ok else "fail", verdict="PASS" if ok else "FAIL", path=_esc(r.get("path", "")),
        psnr=_esc(psnr_text(r["psnr"])), max_diff=_esc(r["max_diff"]), min_psnr=_esc(r.get("min_psnr", "")),
        identical="yes" if r.get("identical") else "no",
        notes="".join(f'<p class="note">{_esc(n)}</p>' for n in notes),
        figures="".join(figures), settings=rows or '<tr><td colspan="2">(none recorded)</td></tr>')


def _figure(src: str, kind: str) -> str:
    return (f'<figure class="{kind}"><img src="{_esc(src)}" alt="{_esc(CAPTIONS[kind])}">'
            f"<figcaption>{_esc(CAPTIONS[kind])}</figcaption></figure>")


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


_CSP = "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>{{css}}</style>
</head>
<body>
<header class="{{status}}">
<h1>{{title}}</h1>
<p class="summary"><span class="count">{{count}}</span> {{images}}: <span class="failed">{{failed}}</span> failed,
<span class="passed">{{passed}}</span> passed. Failures first.</p>
<div class="legend"><img src="{{legend}}" alt="difference colour scale"><div class="ticks">{{legend_ticks}}</div>
<p>difference in 8-bit levels, largest channel, log scale</p></div>
</header>
<main>
{{sections}}
</main>
<script type="application/json" id="verify-results">{{results}}</script>
</body>
</html>
""".format(csp=_CSP)

_SECTION = """<section class="result {status}">
<h2><span class="verdict">{verdict}</span> <span class="path">{path}</span></h2>
<dl class="numbers">
<dt>PSNR (dB)</dt><dd class="psnr">{psnr}</dd>
<dt>max difference (levels)</dt><dd class="max-diff">{max_diff}</dd>
<dt>min PSNR to pass</dt><dd class="min-psnr">{min_psnr}</dd>
<dt>identical</dt><dd class="identical">{identical}</dd>
</dl>
{notes}
<div class="images">{figures}</div>
<details><summary>settings</summary><table class="settings">{settings}</table></details>
</section>"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1em; color: #222; }
header { border-left: 8px solid #2a2; padding-left: 1em; }
header.fail { border-color: #c22; }
.result { border: 1px solid #ccc; border-left: 8px solid #2a2; margin: 1.5em 0; padding: 0.5em 1em; }
.result.fail { border-left-color: #c22; }
.verdict { font-weight: bold; }
.fail .verdict { color: #c22; }
.pass .verdict { color: #2a2; }
.path { font-family: monospace; word-break: break-all; }
dl.numbers { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.numbers dt { color: #666; }
dl.numbers dd { margin: 0; font-family: monospace; }
.note { color: #a60; }
.images { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figure img { max-width: 100%; width: 320px; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { color: #666; font-size: 0.9em; }
table.settings { border-collapse: collapse; font-size: 0.9em; }
table.settings th { text-align: left; padding-right: 1em; color: #666; vertical-align: top; }
table.settings td { font-family: monospace; white-space: pre-wrap; word-break: break-word; }
.legend { max-width: 256px; font-size: 0.8em; color: #666; }
.legend img { width: 256px; height: 12px; display: block; }
.legend .ticks { position: relative; height: 1.2em; }
.legend .ticks span { position: absolute; transform: translateX(-50%); }
"""
