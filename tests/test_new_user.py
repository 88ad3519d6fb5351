"""What a new user trips over (issue 30), each through the real command: resuming a random-seed run, binary
output into a terminal, peers' short flags, --from-image with another checkpoint, the preview file, cheap errors
before `import torch`, sweep's recorded commands, the output format from the extension, the run's progress."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
from _cli import pixels
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403


run_here = run_module  # noqa: F405 (this checkout first on the path; SIGINT not ignored)


def fast_args(model, *extra: str) -> list[str]:
    """render_args without a seed: the default, -1, draws one."""
    args = render_args(model, *extra)
    i = args.index("--seed")
    return args[:i] + args[i + 2:]


# --- 3: --skip-existing resumes a run whose seed was drawn -----------------------------------------------------

def test_skip_existing_resumes_an_interrupted_random_seed_run(tiny_sd1, tmp_path):
    n = 12
    proc = run_here(fast_args(tiny_sd1, "-n", str(n), "-o", "i/{index}.png"), tmp_path, stdout=-1, stderr=-1)
    out = tmp_path / "i"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (out / "0.png").exists():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1].decode()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    kept = files_in(out)
    assert 1 <= len(kept) < n
    seed = sdcli_meta(out / "0.png")["seed"]

    result = cli(*fast_args(tiny_sd1, "-n", str(n), "-o", "i/{index}.png", "--skip-existing"))
    assert result.exit_code == 0, result.output
    assert f"resuming with seed {seed}" in result.stderr
    assert files_in(out) == sorted(f"{i}.png" for i in range(n))
    assert [sdcli_meta(out / f"{i}.png")["seed"] for i in range(n)] == [seed + i for i in range(n)]
    # the resumed images are the ones the uninterrupted run would have made: the last one, made fresh
    fresh = cli(*render_args(tiny_sd1, "-o", "fresh.png"))
    args = render_args(tiny_sd1, "-o", "last.png")
    args[args.index("--seed") + 1] = str(seed + n - 1)
    assert cli(*args).exit_code == 0 and fresh.exit_code == 0
    assert (tmp_path / "last.png").read_bytes() == (out / f"{n - 1}.png").read_bytes()


def test_skip_existing_refuses_images_of_two_random_seed_runs(tiny_sd1, tmp_path):
    assert cli(*fast_args(tiny_sd1, "-o", "i/0.png")).exit_code == 0
    assert cli(*fast_args(tiny_sd1, "-o", "i/1.png")).exit_code == 0
    result = cli(*fast_args(tiny_sd1, "-n", "3", "-o", "i/{index}.png", "--skip-existing"))
    assert_clean_error(result, 7, "record different seeds", "--seed")


def test_explicit_seed_still_refuses_another_runs_image(tiny_sd1, tmp_path):
    assert cli(*fast_args(tiny_sd1, "-o", "i/0.png")).exit_code == 0
    result = cli(*render_args(tiny_sd1, "-n", "2", "-o", "i/{index}.png", "--skip-existing"))
    assert_clean_error(result, 7, "i/0.png exists but is not this job's image")


# --- 10: binary output is not written into a terminal ----------------------------------------------------------

def test_png_to_stdout_that_is_a_terminal_is_refused(tiny_sd1, tmp_path):
    import os
    import pty

    main, terminal = pty.openpty()
    try:
        proc = run_here(render_args(tiny_sd1, "-o", "-"), tmp_path, stdout=terminal, stderr=-1)
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(terminal)
    assert proc.returncode == 2, err.decode()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "stdout (-), which is a terminal" in lines[0] and "loading" not in err.decode()
    os.set_blocking(main, False)
    try:
        written = os.read(main, 1 << 16)
    except (BlockingIOError, OSError):
        written = b""
    os.close(main)
    assert b"PNG" not in written


def test_png_to_redirected_stdout_is_written(tiny_sd1, tmp_path):
    result = cli(*render_args(tiny_sd1, "-o", "-"))
    assert result.exit_code == 0 and result.stdout_bytes.startswith(b"\x89PNG")


# --- 4: peers' short flags and --preview NAME --------------------------------------------------------------------

@pytest.mark.parametrize("flag, needles", [("-s", ("--steps N", "--seed N")), ("-b", ("-n N", "--batch-size N"))])
def test_peer_short_flags_are_refused_with_what_to_write(tiny_sd1, tmp_path, flag, needles):
    proc = run_here(fast_args(tiny_sd1, flag, "4", "-o", "x.png"), tmp_path, stdout=-1, stderr=-1)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: sdcli has no {flag}"), lines
    assert all(needle in lines[0] for needle in needles) and not (tmp_path / "x.png").exists()
    result = cli(*fast_args(tiny_sd1, flag, "4", "-o", "x.png"))  # in-process (no main): still a usage error
    assert result.exit_code == 2 and not (tmp_path / "x.png").exists()


def test_peer_flag_scan_leaves_values_and_the_end_of_options_alone():
    from sdcli.cli_options import peer_flag

    assert peer_flag(["generate", "a cat", "--steps", "4", "-n", "2", "--sampler", "euler"]) is None
    assert peer_flag(["generate", "--", "-s"]) is None
    assert peer_flag(["generate", "x", "-s42"]).startswith("sdcli has no -s")


@pytest.mark.parametrize("name, needle", [("tae", "--preview-vae"), ("taesd", "--preview-vae"), ("p.jpg", "FILE.png")])
def test_preview_name_that_is_no_png_is_refused(tiny_sd1, tmp_path, name, needle):
    result = cli(*render_args(tiny_sd1, "-o", "x.png", "--preview", name))
    assert_clean_error(result, 2, needle)
    assert not (tmp_path / name).exists() and not (tmp_path / "x.png").exists()


# --- 6: --from-image with another checkpoint than the image's ------------------------------------------------------

def _other_checkpoint(model, path):
    """The tiny model with one weight changed: another file, another hash."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(model)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 0.001
    save_file(tensors, path)
    return path


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_from_image_with_another_checkpoint_warns_naming_both(tiny_sd1, tmp_path):
    assert cli(*render_args(tiny_sd1, "-o", "made.png")).exit_code == 0
    other = _other_checkpoint(tiny_sd1, tmp_path / "other.safetensors")
    result = cli("generate", "--from-image", "made.png", "-m", other, "-o", "again.png")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, result.stderr
    for needle in ("made.png", f"tiny_sd1 (sha256 {_sha(tiny_sd1)[:10]})", f"other.safetensors (sha256 {_sha(other)[:10]})"):
        assert needle in warning[0]
    same = cli("generate", "--from-image", "made.png", "-m", tiny_sd1, "-o", "same.png")
    assert same.exit_code == 0 and "warning:" not in same.stderr
    assert (tmp_path / "same.png").read_bytes() == (tmp_path / "made.png").read_bytes()


def test_from_image_without_a_model_names_the_images(tiny_sd1, tmp_path):
    assert cli(*render_args(tiny_sd1, "-o", "made.png")).exit_code == 0
    result = cli("generate", "--from-image", "made.png", "-o", "again.png")
    assert_clean_error(result, 2, "no model given", f"tiny_sd1 (sha256 {_sha(tiny_sd1)[:10]})", "--model")


def test_from_image_of_a1111_with_another_checkpoint_warns(tiny_sd1, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64, "
                                "Model hash: 0123456789, Model: someone_elses, Version: v1.10.1")
    Image.new("RGB", (64, 64)).save("a1111.png", pnginfo=info)
    result = cli("generate", "--from-image", "a1111.png", "-m", tiny_sd1, "--dtype", "fp32", "-o", "x.png")
    assert result.exit_code == 0, result.output
    assert "someone_elses (sha256 0123456789)" in result.stderr and _sha(tiny_sd1)[:10] in result.stderr
    missing = cli("generate", "--from-image", "a1111.png", "-o", "y.png")
    assert_clean_error(missing, 2, "someone_elses (sha256 0123456789)")


# --- 14: the preview file is the run's own scratch file; --preview-interval ----------------------------------------

def test_preview_file_of_an_earlier_run_is_replaced_without_overwrite(tiny_sd1, tmp_path):
    from sdcli.output.metadata import is_preview_file

    assert cli(*render_args(tiny_sd1, "-o", "a.png", "--preview", "p.png")).exit_code == 0
    assert is_preview_file(tmp_path / "p.png") and not is_preview_file(tmp_path / "a.png")
    before = (tmp_path / "p.png").stat().st_mtime_ns
    time.sleep(0.01)
    result = cli(*render_args(tiny_sd1, "-o", "b.png", "--preview", "p.png"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_mtime_ns != before and is_preview_file(tmp_path / "p.png")


def test_preview_over_a_file_sdcli_did_not_write_as_a_preview_is_refused(tiny_sd1, tmp_path):
    assert cli(*render_args(tiny_sd1, "-o", "a.png")).exit_code == 0
    kept = (tmp_path / "a.png").read_bytes()
    result = cli(*render_args(tiny_sd1, "-o", "b.png", "--preview", "a.png"))
    assert_clean_error(result, 7, "a.png exists", "--overwrite")
    assert (tmp_path / "a.png").read_bytes() == kept and not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("interval, writes", [("0", 3), ("1000", 2)])
def test_preview_interval_sets_how_often_the_preview_is_written(tiny_sd1, tmp_path, monkeypatch, interval, writes):
    import sdcli.output.targets as targets

    real, written = targets.atomic_write_bytes, []

    def counting(path, data, *args, **kwargs):
        written.append(str(path))
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(targets, "atomic_write_bytes", counting)
    args = render_args(tiny_sd1, "-o", "a.png", "--preview", "p.png", "--preview-interval", interval, steps=3)
    assert cli(*args).exit_code == 0
    assert written.count("p.png") == writes  # every step with 0; the first and the last with a long interval


def test_negative_preview_interval_is_a_usage_error(tiny_sd1, tmp_path):
    result = cli(*render_args(tiny_sd1, "-o", "a.png", "--preview", "p.png", "--preview-interval", "-1"))
    assert_clean_error(result, 2, "--preview-interval")


# --- 5: cheap errors do not wait for `import torch` ----------------------------------------------------------------

_PROBE = """
import sys
from sdcli.cli import main
sys.argv = ["sdcli", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
sys.stderr.write(f"\\nPROBE exit={code} torch={'torch' in sys.modules}\\n")
sys.exit(code)
"""


def _probe(args: list[str], cwd) -> tuple[int, bool, str]:
    """(exit code, whether torch was imported, stderr) of the real command in a fresh process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XDG_CONFIG_HOME=str(cwd / "xdg"), NO_COLOR="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("PROBE"), proc.stderr
    return proc.returncode, last.endswith("torch=True"), proc.stderr


def test_cheap_errors_and_inspect_of_an_image_never_import_torch(tiny_sd1, tmp_path):
    assert cli(*render_args(tiny_sd1, "-o", "made.png")).exit_code == 0
    cases = [
        (["generate", "a cat"], 2, "no model given"),
        (["generate", "a cat", "-m", tiny_sd1, "-o", "made.png"], 7, "exists"),
        (["generate", "a cat", "-m", tiny_sd1, "--sampler", "eulr", "-o", "x.png"], 2, "unknown sampler"),
        (["generate", "a cat", "-m", tiny_sd1, "--schedule", "kars", "-o", "x.png"], 2, "unknown schedule"),
        (["img2img", "a cat", "-i", "made.png", "--sampler", "eulr", "-o", "x.png"], 2, "unknown sampler"),
        (["generate", "a cat", "--sampler", "help"], 0, ""),
        (["inspect", "made.png"], 0, ""),
    ]
    for args, code, needle in cases:
        exit_code, torch_imported, err = _probe(args, tmp_path)
        assert exit_code == code and needle in err, (args, err)
        assert not torch_imported, args
    assert _probe(["inspect", tiny_sd1], tmp_path)[1]  # the probe can see torch: a checkpoint's report loads it


def test_torch_free_name_tables_agree_with_the_samplers_and_schedules():
    from sdcli.sampling import names, samplers, schedule

    assert tuple(schedule.SCHEDULES) == names.SCHEDULE_NAMES
    assert list(samplers.SAMPLERS) == list(names.SAMPLER_NAMES)
    for name, spec in samplers.SAMPLERS.items():
        assert callable(spec.fn) and spec.aliases == names.SAMPLER_NAMES[name].aliases


# --- 7: sweep records commands that run from where it ran ----------------------------------------------------------

def test_sweep_recorded_command_reproduces_the_cell_from_the_run_folder(tiny_sd1, tmp_path):
    import json
    import shlex
    import shutil

    (tmp_path / "models").mkdir()
    shutil.copy(tiny_sd1, tmp_path / "models" / "mine.safetensors")
    fast = render_args("models/mine.safetensors")[2:]  # the flags after `generate PROMPT`
    assert cli("sweep", "a cat", *fast, "--x", "cfg=3,7", "-o", "plot.png", "--keep-cells", "cells").exit_code == 0
    cells = json.loads((tmp_path / "plot.json").read_text())["cells"]
    for cell in cells:
        words = shlex.split(cell["command"])
        assert words[:5] == ["sdcli", "generate", "a cat", "-m", "models/mine.safetensors"], words
        out = f"alone-{cell['index'][0]}.png"
        assert cli(*words[1:], "-o", out).exit_code == 0
        assert (tmp_path / out).read_bytes() == (tmp_path / cell["path"]).read_bytes()


# --- 2: the extension names the format -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt, extra", [("a.jpg", "JPEG", ()), ("a.jpeg", "JPEG", ("--quality", "70")),
                                              ("a.webp", "WEBP", ()), ("a.webp", "WEBP", ("--quality", "100"))])
def test_output_format_follows_the_extension_and_keeps_the_parameters(tiny_sd1, tmp_path, name, fmt, extra):
    import json

    from PIL import Image

    from sdcli.output.metadata import read_image_metadata

    assert cli(*render_args(tiny_sd1, "-o", "ref.png")).exit_code == 0
    assert cli(*render_args(tiny_sd1, "-o", name, *extra)).exit_code == 0
    with Image.open(name) as img:
        assert img.format == fmt
        comment = img.getexif().get_ifd(0x8769)[0x9286]  # A1111's place: EXIF UserComment, UNICODE + UTF-16-BE
    ref = read_image_metadata(tmp_path / "ref.png")
    assert comment == b"UNICODE\0" + ref["raw"]["parameters"].encode("utf-16-be")
    meta = read_image_metadata(tmp_path / name)
    quality = int(extra[1]) if extra else 90
    assert meta["source"] == "sdcli" and meta["parameters"] == ref["parameters"]
    assert meta["sdcli"] == {**ref["sdcli"], "file": {"format": fmt, "quality": quality}}
    inspected = cli("inspect", name, "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["source"] == "sdcli"
    replayed = cli("generate", "--from-image", name, "-m", tiny_sd1, "-o", "again.png")
    assert replayed.exit_code == 0 and (tmp_path / "again.png").read_bytes() == (tmp_path / "ref.png").read_bytes()
    if fmt == "WEBP" and quality == 100:  # lossless
        assert np.array_equal(pixels(tmp_path / name), pixels(tmp_path / "ref.png"))
    # verify encodes its re-render as the file records (format, quality) and compares: the same pixels
    verified = cli("verify", name, "-m", tiny_sd1, "--json")
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout.splitlines()[-1])["identical"] is True


@pytest.mark.parametrize("name, needle", [("a.gif", "'.gif' is not one of them"), ("myimage", "has none"),
                                          ("out/{index}", "has none")])
def test_unknown_or_missing_extension_is_a_usage_error(tiny_sd1, tmp_path, name, needle):
    result = cli(*render_args(tiny_sd1, "-o", name))
    assert_clean_error(result, 2, ".png, .jpg (.jpeg) or .webp", needle)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []


def test_skip_existing_recognises_its_jpeg(tiny_sd1, tmp_path):
    assert cli(*render_args(tiny_sd1, "-o", "i/{index}.jpg")).exit_code == 0
    result = cli(*render_args(tiny_sd1, "-n", "2", "-o", "i/{index}.jpg", "--skip-existing"))
    assert result.exit_code == 0 and "skipping 1 of 2" in result.stderr and files_in(tmp_path / "i") == ["0.jpg", "1.jpg"]


# --- 18: progress says the image's place in the run and the run's time left ------------------------------------

def test_progress_events_carry_the_run_position_and_estimate(tiny_sd1, tmp_path):
    import json

    result = cli(*render_args(tiny_sd1, "-n", "3", "--batch-size", "2", "-o", "p/{index}.png", "--progress", "json",
                              steps=2))
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    steps = [e for e in events if e.get("event") == "step"]
    assert [(e["seeds"], e["step"], e["image"], e["images"]) for e in steps] == [
        ([1, 2], 1, 1, 3), ([1, 2], 2, 1, 3), ([3], 1, 3, 3), ([3], 2, 3, 3)]
    assert all(e["run_left_s"] >= 0 for e in steps) and steps[-1]["run_left_s"] == 0
    assert steps[0]["run_left_s"] > steps[1]["run_left_s"] > 0  # a third image still to come after batch 1


def test_progress_bar_label_names_the_images_place_in_the_run():
    from sdcli.app.progress import Progress, run

    with run(5) as r:
        r.done = 1
        assert Progress([7], 20).label == "image 2/5 seed 7"
        r.done = 2
        assert Progress([8, 9], 20).label == "images 3-4/5 seed 8..9"
    assert Progress([7], 20).label == "seed 7"  # outside a run (one image): as before
