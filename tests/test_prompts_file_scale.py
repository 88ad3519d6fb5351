"""A large prompts file through `sdcli generate --prompts-file F --dry-run`: the work per job and the memory per
job do not grow with the file (a 100,000-line file took 7 minutes and 1.3 GB: a search of every image for each
job's, and every job's plan held until the end), and the shortcuts taken for it give what the long ways give.

How "work" is counted without timing anything: the Python lines executed in sdcli's planning modules (a trace
function counting 'line' events, which a loop fires once per pass), per job, at two file sizes; memory: the
tracemalloc peak per job, at two file sizes, with stdout going to a sink that keeps nothing. Both are
deterministic for a given file. tests/slow/test_prompts_file_100k.py runs the literal 100,000 lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import tracemalloc
from pathlib import Path

import pytest

import sdcli
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.jobs import with_values
from sdcli.text import clip_tokenizer, editing, prompts

PACKAGE = Path(sdcli.__file__).parent
WORDS = "fox cat night dog castle painting red river (oil:1.2) [blue] watercolor, sunny".split()
PLANNING = tuple(str(PACKAGE / p) for p in ("app/dry_run.py", "app/render.py", "app/resume.py", "app/planning.py",
                                            "app/generate.py", "jobs.py"))


def write_prompts(path: Path, lines: int, seed: int = 0) -> Path:
    """Plain lines and JSON jobs (a seed, steps, a negative of their own), as a shell batch writes them."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        text = " ".join(rng.choice(WORDS) for _ in range(8))
        if i % 5 == 4:
            out.append(f'{{"prompt": "{text}", "seed": {i}, "steps": {10 + i % 3}, "negative": "blurry"}}')
        else:
            out.append(text)
    path.write_text("\n".join(out) + "\n")
    return path


class _Sink:
    """stdout that keeps nothing: its size counted, so the memory measured is the run's, not the output's."""

    def __init__(self):
        self.chars, self.lines = 0, 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        self.lines += text.count("\n")
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def dry_run(prompts_file: Path, tmp_path: Path, measure=None) -> _Sink:
    """`sdcli generate --prompts-file F --dry-run` in this process (the command's own code path), stdout sunk;
    `measure`: a context manager around the command alone."""
    args = ["generate", "--prompts-file", str(prompts_file), "--dry-run", "-o", f"{tmp_path}/{{index}}.png"]
    sink = _Sink()
    with contextlib.redirect_stdout(sink), (measure or contextlib.nullcontext)():
        try:
            app(args, standalone_mode=False)
        except SystemExit as e:  # typer ends a command this way
            assert not e.code, e.code
    return sink


@contextlib.contextmanager
def _lines_counted(counter: list):
    """Count the 'line' events in the planning modules (their loops included: one event per pass)."""

    def local(frame, event, _arg):
        if event == "line":
            counter[0] += 1
        return local

    def global_(frame, event, _arg):
        return local if frame.f_code.co_filename in PLANNING else None

    sys.settrace(global_)
    try:
        yield
    finally:
        sys.settrace(None)


def test_the_work_per_job_does_not_grow_with_the_file(tmp_path):
    per_job = {}
    for n in (300, 1200):
        counter = [0]
        sink = dry_run(write_prompts(tmp_path / f"p{n}.txt", n), tmp_path, lambda: _lines_counted(counter))
        assert sink.chars > 0 and sink.lines >= 8 * n  # every job's plan was printed
        per_job[n] = counter[0] / n
    # a search of all images per job (the old way) gave 4x the lines per job at 4x the jobs
    assert per_job[1200] <= per_job[300] * 1.05, per_job
    assert per_job[1200] < 1000, per_job  # a job's plan is some 430 planning lines, whatever the file's length


def test_the_memory_per_job_does_not_hold_the_plans(tmp_path):
    peaks = {}
    dry_run(write_prompts(tmp_path / "warm.txt", 50), tmp_path)  # imports, the tokenizer and its word cache
    for n in (400, 1600):
        path = write_prompts(tmp_path / f"p{n}.txt", n)

        @contextlib.contextmanager
        def traced():
            tracemalloc.start()
            try:
                yield
            finally:
                peaks[n] = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()

        dry_run(path, tmp_path, traced)
    per_job = (peaks[1600] - peaks[400]) / 1200
    # a job held for the run (its config, target, output name: ~2 KB) is kept; its printed plan (tokens,
    # sigmas, config dict) is not.
    assert per_job < 4000, (per_job, peaks)  # measured: 1.9 KB a job here; 9 KB the old way


# --- the shortcuts give what the long ways give -----------------------------------------------------------------

def test_with_values_builds_what_dataclasses_replace_builds():
    base = RunConfig(seed=4, output="x/{index}.png", negative="blurry", steps=12)
    for changes in ({"seed": 7}, {"seed": 0, "subseed": 9}, {"steps": 3, "cfg": 4.5, "sampler": "euler"}):
        # ("cfg" is a key: a prompts-file line {"cfg": 5} once met the function's own parameter name)
        made, expected = with_values(base, **changes), dataclasses.replace(base, **changes)
        assert made == expected and type(made) is RunConfig
        assert [getattr(made, f) for f in made.__dataclass_fields__] == \
            [getattr(expected, f) for f in expected.__dataclass_fields__]
    assert base.seed == 4  # not changed in place
    with pytest.raises(TypeError):
        with_values(base, no_such_key=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        with_values(base, seed=1).seed = 2


def test_to_dict_is_asdict():
    from sdcli.control.settings import ControlSpec

    for cfg in (RunConfig(), RunConfig(seed=3, negative="x", width=64, cfg=None),
                RunConfig(controlnets=(ControlSpec("a.safetensors", "b.png", 0.5),))):
        expected = dataclasses.asdict(cfg)
        expected["controlnets"] = [dict(u) for u in expected["controlnets"]]
        assert cfg.to_dict() == expected and list(cfg.to_dict()) == list(expected)


def _texts(rng: random.Random, alphabet: list[str], n: int, longest: int = 16):
    for _ in range(n):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


def test_ascii_word_split_is_the_scan():
    rng = random.Random(1)
    alphabet = [chr(i) for i in range(128)] + ["'s", "'ll", "'re", "<start_of_text>", "<end_of_text>", "ab", "12"]
    for text in _texts(rng, alphabet, 30000):
        assert clip_tokenizer._split_words(text) == clip_tokenizer._scan_words(text), repr(text)


def test_unfixed_text_is_what_the_fixes_give():
    rng = random.Random(2)
    alphabet = [chr(i) for i in range(128)] + ["&amp;", "&#39;", "\x1b[31m", "\u2019", "\x85", "é", "ﬁ", "\r\n"]
    checked = 0
    for text in _texts(rng, alphabet, 30000, 10):
        if clip_tokenizer._UNFIXED_RE.fullmatch(text):
            assert clip_tokenizer._fix_lines(text) == text, repr(text)
            checked += 1
    assert checked > 1000


def test_a_prompt_without_square_brackets_is_its_own_schedule():
    rng = random.Random(3)
    alphabet = list("ab (:)|\\]1.5") + [" BREAK ", "(x:1.2)"]
    for text in _texts(rng, alphabet, 20000):
        try:
            nodes = editing._Parser(text).top()
        except editing._NoParse:
            nodes = [text]
        for steps, hires in ((20, None), (7, 3)):
            assert editing.prompt_schedule(text, steps, hires) == [(hires or steps, "".join(nodes))], repr(text)


def test_only_round_brackets_can_make_a_bad_weight():
    """check_prompt parses the weights of a text with '(' only: without one every weight is 1 or 1/1.1^k."""
    rng = random.Random(4)
    alphabet = list("ab []:\\1.5e9-") + [" BREAK ", ":99999)", ":1e400)", ":1.2.3)"]
    for text in _texts(rng, alphabet, 20000):
        for piece in prompts.parse_attention(text):
            assert piece is prompts.BREAK or 0 < piece[1] <= 1, repr(text)
    with pytest.raises(Exception, match="out of range"):
        prompts.check_prompt("a (b:1000)")
