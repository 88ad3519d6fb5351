"""--progress json: one JSON event per sampling step on stderr, stdout untouched; no bar off a terminal."""

import json

from typer.testing import CliRunner

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from sdcli.cli import app


def test_json_progress_events(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    args = ["generate", "x", "-m", str(tiny_sd1), "-W", "64", "-H", "64", "--steps", "4", "--sampler", "euler",
            "-n", "2", "--batch-size", "2", "--seed", "3", "-o", "{index}.png", "--progress", "json", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert all(e["event"] == "step" and e["total"] == 4 and e["seeds"] == [3, 4] for e in events)
    assert all(b["elapsed_s"] >= a["elapsed_s"] for a, b in zip(events, events[1:]))
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in results] == [3, 4]  # stdout holds results only


def test_no_bar_when_not_a_terminal(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    args = ["generate", "x", "-m", str(tiny_sd1), "-W", "64", "-H", "64", "--steps", "2", "-o", "a.png"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert all(line.strip() for line in lines) and not any("it/s" in line for line in lines)
