"""inspect reports the same parts for a single file and for the diffusers folder holding the same weights."""

import json

from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
from sdcli.cli import app


def _inspect(path) -> dict:
    result = CliRunner().invoke(app, ["inspect", str(path), "--json", "--no-hash"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_folder_and_single_file_report_the_same_parts(tiny_sd1, tiny_sd1_diffusers):  # noqa: F811
    single, folder = _inspect(tiny_sd1), _inspect(tiny_sd1_diffusers)
    assert (single["family"], single["prediction"]) == (folder["family"], folder["prediction"])
    assert folder["parameters"] == {k: v for k, v in single["parameters"].items() if k != "other"}
    assert sum(folder["parameters"].values()) > 0 and set(folder["dtypes"]) == set(single["dtypes"])
