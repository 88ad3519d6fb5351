"""Prompts files: plain lines and JSONL jobs, every line checked before any work, errors name FILE:LINE."""

import pytest

from sdcli.config import RunConfig
from sdcli.runtime.errors import BadInputError
from sdcli.jobs import read_prompts_file, single_job

BASE = RunConfig(seed=100)


def _file(tmp_path, text):
    path = tmp_path / "jobs.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_plain_and_json_lines(tmp_path):
    path = _file(tmp_path, '# comment\na cat\n\n{"prompt": "a dog", "seed": 7, "steps": 5}\n  [blurry] owl  \n')
    jobs = read_prompts_file(path, BASE)
    assert [j.prompt for j in jobs] == ["a cat", "a dog", "[blurry] owl"]
    assert [j.cfg.seed for j in jobs] == [100, 7, 100]
    assert jobs[1].cfg.steps == 5 and jobs[0].cfg.steps == BASE.steps
    assert jobs[1].source.endswith(":4")


def test_random_seed_is_drawn_per_job_and_recorded(tmp_path):
    jobs = read_prompts_file(_file(tmp_path, "a\nb\n"), RunConfig(seed=-1))
    assert all(0 <= j.cfg.seed < 2**32 for j in jobs)


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"prompt": "x", "steps": "many"}', "'steps'"),
        ('{"prompt": "x", "stepz": 3}', "'stepz'"),
        ('{"prompt": 5}', "'prompt'"),
        ('{"seed": 1}', "'prompt'"),
        ('{"prompt": "x", "seed": -2}', "'seed'"),
        ('{"prompt": "x", "seed": 4294967296}', "'seed'"),
        ('{"prompt": "x", "cfg": true}', "'cfg'"),
        ('{"prompt": "x", "model": "other.safetensors"}', "'model'"),
        ('{"prompt": "x", "width": 100}', "'width'"),
        ('{"prompt": "x",', "not valid JSON"),
        ("[1, 2]", None),  # a plain line that happens to look like a list is a prompt
    ],
)
def test_bad_json_lines_name_the_line(tmp_path, line, needle):
    path = _file(tmp_path, "fine prompt\n" + line + "\n")
    if needle is None:
        assert read_prompts_file(path, BASE)[1].prompt == line
        return
    with pytest.raises(BadInputError) as e:
        read_prompts_file(path, BASE)
    assert f"{path}:2" in str(e.value) and needle in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(BadInputError, match="no prompts"):
        read_prompts_file(_file(tmp_path, "\n# only a comment\n"), BASE)
    with pytest.raises(BadInputError, match="not found"):
        read_prompts_file(str(tmp_path / "nope.txt"), BASE)
    with pytest.raises(BadInputError, match="directory"):
        read_prompts_file(str(tmp_path), BASE)


def test_not_utf8(tmp_path):
    path = tmp_path / "bin.txt"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInputError, match="UTF-8"):
        read_prompts_file(str(path), BASE)


def test_stdin(monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    assert [j.prompt for j in read_prompts_file("-", BASE)] == ["one", "two"]


def test_single_job_keeps_given_seed():
    assert single_job("x", BASE).cfg.seed == 100
