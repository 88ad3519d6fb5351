"""--preview: a PNG rewritten during sampling with the cheap latent-to-RGB estimate of image 0. It exists and has
the output's size after generate, img2img and a hires pass; writes are throttled but the last step is always
written; a preview that cannot be written during the render turns itself off and the render still succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from PIL import Image
from typer.testing import CliRunner

from sdcli.cli import app
from sdcli.output.preview import PreviewWriter, cheap_rgb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)

    def invoke(command: str, *args: str):
        base = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "3", "--seed", "4"]
        result = CliRunner().invoke(app, [command, *args, *base])
        assert result.exit_code == 0, (result.stderr, result.exception)
        return result

    return invoke


def test_generate_img2img_and_hires_leave_a_preview_of_the_output_size(run):
    run("generate", "a fox", "-W", "96", "-H", "64", "-o", "a.png", "--preview", "p1.png")
    run("img2img", "a fox", "-i", "a.png", "-o", "b.png", "--preview", "p2.png")
    run("generate", "a fox", "-W", "96", "-H", "64", "--hires-scale", "2", "-o", "c.png", "--preview", "p3.png")
    sizes = [Image.open(p).size for p in ("p1.png", "p2.png", "p3.png")]
    assert sizes == [(96, 64), (96, 64), (192, 128)]
    assert len(Image.open("p1.png").getcolors(maxcolors=1 << 16)) > 1  # a picture, not a flat fill


def test_writes_are_throttled_but_the_last_step_is_written(tmp_path, monkeypatch):
    written = []
    writer = PreviewWriter(tmp_path / "p.png", interval=1e9)
    monkeypatch.setattr(writer, "write", lambda latent: written.append(latent.clone()))
    latents = [torch.full((2, 4, 2, 2), float(i)) for i in range(5)]
    for i, z in enumerate(latents):
        writer(i, 5, z, z)
    assert [int(z[0, 0, 0, 0]) for z in written] == [0, 4]  # the first at once, then only the last
    assert written[0].shape[0] == 1  # image 0 of the batch


def test_the_preview_is_the_cheap_estimate_of_the_latent(tmp_path):
    from sdcli.formats.images import tensor_to_pil

    latent = torch.tensor([0.9, -0.4, 0.3, -0.2]).reshape(1, 4, 1, 1).expand(1, 4, 3, 5)  # one colour everywhere
    PreviewWriter(tmp_path / "p.png").write(latent)
    preview = Image.open(tmp_path / "p.png")
    colour = tensor_to_pil(cheap_rgb(latent[:, :, :1, :1])[0]).getpixel((0, 0))
    assert preview.size == (40, 24) and preview.getcolors() == [(40 * 24, colour)]
    assert colour != (127, 127, 127) and torch.equal(cheap_rgb(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 3, 2, 2))


def test_a_preview_that_fails_while_sampling_is_turned_off_and_the_render_succeeds(run, tmp_path, monkeypatch):
    # A target that is wrong from the start (a folder) is refused before the load (tests/test_output_plan.py);
    # one that fails during the render (the folder removed, the disk full) only turns the preview off.
    import sdcli.output.targets
    from sdcli.runtime.errors import OutputError

    real = sdcli.output.targets.atomic_write_bytes

    def failing(path, data, overwrite=False):
        if str(path).endswith("p.png"):
            raise OutputError(f"{path}: cannot write (No space left on device)")
        return real(path, data, overwrite)

    monkeypatch.setattr(sdcli.output.targets, "atomic_write_bytes", failing)
    result = run("generate", "a fox", "-W", "64", "-H", "64", "-o", "a.png", "--preview", "p.png")
    assert "preview off:" in result.stderr and Path("a.png").exists() and not Path("p.png").exists()
