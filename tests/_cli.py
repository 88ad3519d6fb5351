"""The in-process command runner the CLI test files share: `invoker(extra)` gives `run(command, *args)`, which puts
`extra[command]` (a model, a fast render) before the test's own flags (so those win), checks the exit code, and
returns the typer Result; `pixels` reads a PNG as an RGB array."""

from __future__ import annotations

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from sdcli.cli import app


def invoker(extra: dict[str, list[str]]):
    runner = CliRunner()

    def run(command: str, *args: str, input=None, expect: int | None = 0):
        result = runner.invoke(app, [command, *extra.get(command, []), *args], input=input)
        if expect is not None:
            assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))
