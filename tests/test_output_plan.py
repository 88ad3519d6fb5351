"""Every output of a run planned and checked together before the model loads (issue 12 item 4): images, latent
files, the live preview, stdout. Each case goes through the real command with a model path that does not exist:
a plan that passed would end in the model's error (exit 4), so the exit code alone shows the plan was refused
first; the load is also spied on, stderr holds no "loading" line, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from _fixtures_reliability import *  # noqa: F403
from sdcli.app.planning import OutputPlan
from sdcli.runtime.errors import OutputError, UsageError

MISSING_MODEL = "no-such-model.safetensors"


def generate(*extra: str) -> list[str]:
    return ["generate", "a cat", "--model", MISSING_MODEL, "--steps", "1", "-W", "64", "-H", "64", "--seed", "1",
            "--dtype", "fp32", "--device", "cpu", *extra]


@pytest.fixture(autouse=True)
def loads(monkeypatch) -> list:
    """Calls of the model loader (none may happen in these tests)."""
    calls: list = []
    import sdcli.loading.checkpoint

    real = sdcli.loading.checkpoint.load_models

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdcli.loading.checkpoint, "load_models", spy)
    return calls


def refused(args: list[str], code: int, *needles: str, keep: dict[str, bytes] | None = None, loads=None) -> str:
    """Run; exit `code` with one error line holding `needles`; no load, no 'loading' line, nothing written
    (the folder holds exactly `keep`, unchanged)."""
    keep = keep or {}
    for name, data in keep.items():
        Path(name).write_bytes(data)
    result = cli(*args)  # noqa: F405
    line = assert_clean_error(result, code, *needles)  # noqa: F405
    assert "loading" not in result.stderr and (loads is None or loads == [])
    assert {p.name: p.read_bytes() for p in Path(".").iterdir() if p.is_file()} == keep
    assert [p for p in Path(".").iterdir() if p.is_dir() and p.name != "xdg"] == []
    assert result.stdout_bytes == b""
    return line


def test_a_plan_that_passes_reaches_the_model_error(loads):
    # the control: with nothing wrong in the plan, the missing model is what stops the run
    result = cli(*generate("-o", "a.png", "--preview", "p.png", "--latent-out", "a.safetensors"))  # noqa: F405
    assert result.exit_code == 4, result.output
    assert not Path("a.png").exists() and not Path("p.png").exists()


# --- preview ------------------------------------------------------------------------------------------------

def test_existing_preview_without_overwrite_is_exit_7(loads):
    refused(generate("-o", "a.png", "--preview", "p.png"), 7, "p.png", "--overwrite", keep={"p.png": b"mine"},
            loads=loads)


def test_preview_folder_is_exit_7(loads):
    Path("taken.png").mkdir()
    result = cli(*generate("-o", "a.png", "--preview", "taken.png"))  # noqa: F405
    assert_clean_error(result, 7, "taken", "folder")  # noqa: F405
    assert loads == [] and not Path("a.png").exists()


@pytest.mark.parametrize("preview", ["a.png", "./a.png", "sub/../a.png"])
def test_preview_named_like_an_image_is_exit_2(preview, loads):
    refused(generate("-o", "a.png", "--preview", preview), 2, "preview", "image", loads=loads)


def test_preview_named_like_an_image_is_exit_2_even_with_overwrite(loads):
    refused(generate("-o", "a.png", "--preview", "a.png", "--overwrite"), 2, "a.png", keep={"a.png": b"old"},
            loads=loads)


# --- latent files -------------------------------------------------------------------------------------------

def test_existing_latent_out_is_exit_7_before_any_image(loads):
    refused(generate("-o", "a.png", "--latent-out", "a.safetensors"), 7, "a.safetensors", "--overwrite",
            keep={"a.safetensors": b"mine"}, loads=loads)


def test_one_existing_latent_name_of_a_template_is_exit_7(loads):
    refused(generate("-n", "3", "-o", "{index}.png", "--latent-out", "lat{index}.safetensors"), 7,
            "lat2.safetensors", keep={"lat2.safetensors": b"mine"}, loads=loads)


def test_one_latent_name_for_several_images_is_exit_2(loads):
    refused(generate("-n", "2", "-o", "{index}.png", "--latent-out", "lat.safetensors"), 2, "lat.safetensors",
            "{index}", loads=loads)


def test_latent_named_like_an_image_is_exit_2(loads):
    refused(generate("-o", "x.out", "--latent-out", "x.out"), 2, "x.out", "latent", "image", loads=loads)


def test_prompts_file_images_colliding_is_exit_2(loads):
    Path("jobs.txt").write_text("a cat\na dog\n")
    refused(["generate", "--prompts-file", "jobs.txt", *generate("-o", "same.png")[2:]], 2, "same.png",
            keep={"jobs.txt": b"a cat\na dog\n"}, loads=loads)


# --- stdout -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,needles", [
    (("-o", "-", "--json"), ("stdout", "--json")),
    (("-o", "a.png", "--latent-out", "-", "--json"), ("latent", "--json")),
    (("-o", "-", "--latent-out", "-"), ("stdout", "image", "latent")),
    (("-o", "-", "-n", "2"), ("-o -", "2 images")),
    (("-o", "a.png", "--preview", "-"), ("--preview", "stdout")),
])
def test_stdout_carries_one_stream(extra, needles, loads):
    refused(generate(*extra), 2, *needles, loads=loads)


def test_img2img_preview_like_its_output_is_exit_2(loads):
    Image.new("RGB", (64, 64), (90, 120, 150)).save("in.png")
    refused(["img2img", "a cat", "-i", "in.png", "--model", MISSING_MODEL, "-o", "b.png", "--preview", "b.png"],
            2, "preview", keep={"in.png": Path("in.png").read_bytes()}, loads=loads)


def test_encode_and_decode_to_stdout_with_json_are_exit_2(loads):
    from sdcli.output.latents import save_latent

    Image.new("RGB", (64, 64), (90, 120, 150)).save("in.png")
    save_latent("z.safetensors", torch.zeros(1, 4, 8, 8), scaled=True, scale_factor=0.18215, family="sd1",
                source_size=(64, 64), model_hash=None)
    keep = {name: Path(name).read_bytes() for name in ("in.png", "z.safetensors")}
    refused(["encode", "in.png", "--model", MISSING_MODEL, "-o", "-", "--json"], 2, "--json", keep=keep,
            loads=loads)
    refused(["decode", "z.safetensors", "--model", MISSING_MODEL, "-o", "-", "--json"], 2, "--json", keep=keep,
            loads=loads)


# --- the planner itself: what other outputs (a grid, a report) register -------------------------------------

def test_extra_outputs_are_checked_with_the_images(tmp_path):
    plan = OutputPlan()
    plan.add("image", tmp_path / "0.png")
    plan.add("grid", tmp_path / "0.png")
    with pytest.raises(UsageError, match="grid and the image"):
        plan.check()
    (tmp_path / "report.json").write_text("{}")
    plan = OutputPlan()
    plan.add("image", tmp_path / "0.png")
    plan.add("report", tmp_path / "report.json")
    with pytest.raises(OutputError, match="report.json exists"):
        plan.check()
    OutputPlan(overwrite=True, outputs=plan.outputs).check()  # a regular file may be replaced when asked
