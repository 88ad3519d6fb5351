"""Grids, sweeps and the verify report through the real commands (tiny SD1 model, fp32, 64x64, 2 steps):
the grid sheet's rows/columns and recorded seeds, --grid-only; sweep cells equal the same settings rendered
alone by `generate`; the report's numbers equal verify's JSON for the same images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _browser import find_browser, load_page
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from test_lora import lora_file, oracle  # noqa: F401 - a kohya LoRA for the tiny model
from sdcli.output import grid
from _cli import invoker, pixels

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a watercolor fox"
BROWSER = find_browser()  # report.py's tests say why when there is none


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """run(command, *args): rendering commands get the tiny model and fast settings first (a test's flags win)."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    model = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32"]
    fast = ["--steps", "2", "-W", "64", "-H", "64", "--sampler", "euler", "--cfg", "5"]

    return invoker({"generate": model + fast, "img2img": model + fast[:2] + fast[6:], "sweep": model + fast,
                    "verify": ["-m", str(tiny_sd1), "--device", "cpu"]})


def sdcli_meta(path) -> dict:
    return json.loads(Image.open(path).info["sdcli"])


# --- generate --grid -----------------------------------------------------------------------------

def test_grid_sheet_rows_cols_and_seeds(cli, tmp_path):
    cli("generate", PROMPT, "--seed", "10", "-n", "3", "--batch-size", "2", "-o", "img-{index}.png", "--grid", "sheet.png")
    singles = [pixels(tmp_path / f"img-{k}.png") for k in range(3)]
    sheet = pixels(tmp_path / "sheet.png")
    rows, cols = grid.grid_shape(3)  # automatic rows: round(sqrt(3)) = 2, so 2 x 2 with one empty spot
    assert (rows, cols) == (2, 2) and sheet.shape == (rows * 64, cols * 64, 3)
    for k, img in enumerate(singles):
        r, c = divmod(k, cols)
        assert np.array_equal(sheet[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64], img)
    assert (sheet[64:, 64:] == 0).all()  # the empty spot stays black
    meta = sdcli_meta(tmp_path / "sheet.png")
    assert meta["grid_seeds"] == [10, 11, 12] and meta["seed"] == 10
    assert meta["grid_shape"] == {"rows": 2, "cols": 2}
    assert Image.open(tmp_path / "sheet.png").info["parameters"] == Image.open(tmp_path / "img-0.png").info["parameters"]


def test_grid_rows_per_batch_and_grid_only(cli, tmp_path):
    cli("generate", PROMPT, "--seed", "3", "-n", "2", "--batch-size", "2", "-o", "x-{index}.png", "--grid", "g.png",
        "--grid-rows", "0", "--grid-only")
    assert not list(tmp_path.glob("x-*.png"))  # the single images are not written
    assert pixels(tmp_path / "g.png").shape == (2 * 64, 64, 3)  # --grid-rows 0: one row per batch (2 rows)
    assert sdcli_meta(tmp_path / "g.png")["grid_seeds"] == [3, 4]


def test_grid_refused_before_the_model_loads(cli, tmp_path):
    r = cli("generate", PROMPT, "-m", "missing.safetensors", "-n", "2", "-o", "a-{index}.png", "--grid", "a-1.png",
            expect=2)
    assert "grid and the image would both be written to a-1.png" in r.stderr
    r = cli("generate", PROMPT, "-m", "missing.safetensors", "--grid-only", expect=2)
    assert "--grid-only needs --grid" in r.stderr
    (tmp_path / "taken.png").write_bytes(b"x")
    r = cli("generate", PROMPT, "-m", "missing.safetensors", "--grid", "taken.png", expect=7)
    assert "exists" in r.stderr and (tmp_path / "taken.png").read_bytes() == b"x"


# --- sweep ---------------------------------------------------------------------------------------

def _run_command(cli, command: str, model: Path, out: str):
    """A cell's recorded `generate` command, run as it is (the model as the sweep was given it) with an output added."""
    import shlex

    words = shlex.split(command)
    assert words[:2] == ["sdcli", "generate"] and words[3:5] == ["-m", str(model)]
    return cli(words[1], *words[2:], "-o", out)


def test_sweep_cells_equal_generate_alone(cli, tmp_path, tiny_sd1, monkeypatch):  # noqa: F811
    from sdcli import pipeline

    calls = []
    real = pipeline.encode_text
    monkeypatch.setattr(pipeline, "encode_text", lambda *a, **k: calls.append(a[1:3]) or real(*a, **k))
    cli("sweep", "a fox in snow", "--seed", "77", "--negative", "blurry", "--x", "cfg=3,7",
        "--y", "prompt_sr=fox,cat", "-o", "plot.png", "--keep-cells", "cells")
    # cfg changes nothing the text encoder sees: one encoding per prompt
    assert sorted(calls) == [("a cat in snow", "blurry"), ("a fox in snow", "blurry")]
    doc = json.loads((tmp_path / "plot.json").read_text())
    assert doc["plots"] == ["plot.png"] and len(doc["cells"]) == 4
    assert [c["index"] for c in doc["cells"]] == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]
    assert [(c["config"]["cfg"], c["prompt"], c["seed"]) for c in doc["cells"]] == [
        (3.0, "a fox in snow", 77), (7.0, "a fox in snow", 77), (3.0, "a cat in snow", 77), (7.0, "a cat in snow", 77)]
    plot = pixels(tmp_path / "plot.png")
    assert sdcli_meta(tmp_path / "plot.png")["cells"] == doc["cells"]
    for c in doc["cells"]:
        kept = tmp_path / c["path"]
        left, top, right, bottom = c["box"]
        assert np.array_equal(plot[top:bottom, left:right], pixels(kept))  # the plot shows the kept cell
        assert sdcli_meta(kept)["config"] == c["config"]
    for c in (doc["cells"][0], doc["cells"][3]):  # the corners, rendered alone by the recorded command
        alone = f"alone-{c['index'][0]}{c['index'][1]}.png"
        _run_command(cli, c["command"], tiny_sd1, alone)
        # bytes: the cell is rendered by generate's own code path, and its metadata records the same config
        assert (tmp_path / alone).read_bytes() == (tmp_path / c["path"]).read_bytes()


def test_sweep_seed_range_gives_one_plot_per_z_and_replays(cli, tmp_path):
    cli("sweep", "a fox", "--x", "seed=5-6", "--z", "steps=1,2", "-o", "s.png", "--json-out", "cells.json",
        "--keep-cells", "k")
    doc = json.loads((tmp_path / "cells.json").read_text())
    assert doc["plots"] == ["s-z0.png", "s-z1.png"] and not (tmp_path / "s.json").exists()
    assert [(c["seed"], c["config"]["steps"], c["plot"]) for c in doc["cells"]] == [
        (5, 1, "s-z0.png"), (6, 1, "s-z0.png"), (5, 2, "s-z1.png"), (6, 2, "s-z1.png")]
    assert sdcli_meta(tmp_path / "s-z1.png")["z"] == "steps: 2"
    cli("generate", "--from-image", doc["cells"][3]["path"], "-o", "again.png")  # a kept cell replays itself
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / doc["cells"][3]["path"]).read_bytes()


@pytest.mark.parametrize("axis, message", [
    (["--x", "colour=1,2"], "unknown key"),
    (["--x", "steps=a,b"], "is not an integer"),
    (["--x", "cfg=1,500"], "cfg"),
    (["--x", "sampler=euler,nonesuch"], "sweep cell sampler=nonesuch"),
    (["--x", "strength=0.2,0.5"], "cannot be swept"),
    (["--x", "cfg=3,4", "--y", "cfg=5,6"], "swept on two axes"),
    (["--x", "prompt_sr=wolf,cat"], "is not in the prompt"),
    (["--x", "cfg=3,4", "--json-out", "p.png"], "two outputs"),
    (["--x", "lora:fox=0,1"], "tag sets this LoRA's weight too"),
])
def test_sweep_errors_exit_2_before_the_model_loads(cli, tmp_path, axis, message):
    prompt = "a <lora:fox:0.5> fox" if "lora:fox" in axis[1] else "a fox"
    r = cli("sweep", prompt, "-m", "missing.safetensors", *axis, "-o", "p.png", expect=2)
    assert message in r.stderr and "loading" not in r.stderr
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.json"))


# --- verify IMAGES... --report -------------------------------------------------------------------

def _drifted_copy(src: Path, dst: Path) -> None:
    """The same metadata over pixels changed in a corner: verify must call it drifted."""
    from PIL import PngImagePlugin

    img = Image.open(src)
    info = PngImagePlugin.PngInfo()
    for key, value in img.text.items():
        info.add_itxt(key, value)
    changed = img.convert("RGB")
    changed.paste((255, 255, 255), (0, 0, 24, 24))
    changed.save(dst, pnginfo=info)


def _page_numbers(html: str) -> list[dict]:
    """path, psnr text, max difference and verdict of each section, read back from the page."""
    import re

    sections = re.findall(r'<section class="result (\w+)">(.*?)</section>', html, re.S)
    out = []
    for status, body in sections:
        field = lambda cls: re.search(rf'class="{cls}">(.*?)<', body, re.S).group(1)  # noqa: E731
        out.append({"status": status, "path": field("path"), "psnr": field("psnr"), "max_diff": field("max-diff")})
    return out


@pytest.mark.parametrize("variant", ["--report", "--report-dir"])
def test_report_numbers_equal_verify_json(cli, tmp_path, variant):
    import html as htmlmod

    cli("generate", PROMPT, "--seed", "21", "-o", "good.png")
    _drifted_copy(tmp_path / "good.png", tmp_path / "bad.png")
    one_by_one = [json.loads(cli("verify", name, "--json", expect=code).stdout)
                  for name, code in (("good.png", 0), ("bad.png", 9))]
    target = "r.html" if variant == "--report" else "rep"
    r = cli("verify", "good.png", "bad.png", "--json", variant, target, expect=9)
    assert [json.loads(line) for line in r.stdout.splitlines()] == one_by_one  # one image at a time, or several
    assert "1 of 2 images drifted" in r.stderr and "bad.png" in r.stderr
    page = (tmp_path / target if variant == "--report" else tmp_path / target / "index.html").read_text()
    embedded = json.loads(re.search(r'id="verify-results">(.*?)</script>', page, re.S).group(1))
    assert embedded == [one_by_one[1], one_by_one[0]]  # failures first, each verify's JSON as printed
    shown = _page_numbers(page)
    assert [(s["status"], htmlmod.unescape(s["path"])) for s in shown] == [("fail", "bad.png"), ("pass", "good.png")]
    for s, j in zip(shown, [one_by_one[1], one_by_one[0]]):
        expected_psnr = "inf (identical)" if j["psnr"] is None else f"{j['psnr']:.2f}"
        assert s["psnr"] == expected_psnr and s["max_diff"] == str(j["max_diff"])
    assert one_by_one[0]["identical"] and one_by_one[1]["max_diff"] > 0


@pytest.mark.skipif(BROWSER is None, reason="no chromium/chrome on PATH (Debian: apt-get install chromium) - the "
                    "command's report was not checked in a browser")
def test_command_report_loads_in_a_browser(cli, tmp_path):
    cli("generate", PROMPT, "--seed", "8", "-o", "good.png")
    _drifted_copy(tmp_path / "good.png", tmp_path / "bad.png")
    cli("verify", "good.png", "bad.png", "--report-dir", "rep", expect=9)
    seen = load_page(BROWSER, tmp_path / "rep" / "index.html")
    assert seen["errors"] == [] and len(seen["images"]) == 1 + 3 * 2  # legend + stored/re-render/diff each
    assert all(img["complete"] and img["naturalWidth"] > 0 for img in seen["images"])
    assert "1 failed" in seen["text"]


def test_report_target_checked_before_any_model_loads(cli, tmp_path):
    cli("generate", PROMPT, "--seed", "2", "-o", "a.png")
    (tmp_path / "r.html").write_text("keep")
    r = cli("verify", "a.png", "--report", "r.html", expect=7)
    assert "exists" in r.stderr and "loading" not in r.stderr and (tmp_path / "r.html").read_text() == "keep"
    r = cli("verify", "a.png", "--report", "x.html", "--report-dir", "d", expect=2)
    assert "not both" in r.stderr


def test_sweep_lora_weight_axis_equals_generate_with_lora(cli, tmp_path, lora_file):  # noqa: F811
    path, _ = lora_file
    cli("sweep", "a fox", "--seed", "9", "--x", f"lora:{path}=0.8,0", "-o", "l.png", "--keep-cells", "k")
    doc = json.loads((tmp_path / "l.png").with_suffix(".json").read_text())
    assert [c["loras"][0]["weight"] for c in doc["cells"]] == [0.8, 0.0]
    assert doc["cells"][0]["command"].endswith(f"--lora {path}:0.8")
    for c, weight in zip(doc["cells"], ("0.8", "0")):  # rendered weight 0 first (grouped), then merged 0.8
        cli("generate", "a fox", "--seed", "9", "--lora", f"{path}:{weight}", "-o", f"alone-{weight}.png")
        assert (tmp_path / f"alone-{weight}.png").read_bytes() == (tmp_path / c["path"]).read_bytes()
    assert pixels(tmp_path / doc["cells"][0]["path"]).tobytes() != pixels(tmp_path / doc["cells"][1]["path"]).tobytes()
