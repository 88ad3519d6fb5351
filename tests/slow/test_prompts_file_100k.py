"""The literal case of tests/test_prompts_file_scale.py: `generate --prompts-file F --dry-run` on a file of
100,000 lines (plain and JSON jobs, seeds drawn) through the command, every job's plan printed, within a generous
bound of memory (tracemalloc's peak; the old way held every plan and peaked over 1 GB). Not a timed test: it runs
in tens of seconds, so it lives here (SDCLI_SLOW=1 pytest tests/slow/test_prompts_file_100k.py)."""

from __future__ import annotations

import tracemalloc

from test_prompts_file_scale import dry_run, write_prompts

LINES = 100_000


def test_a_100k_line_dry_run_stays_in_the_memory_of_its_jobs(tmp_path):
    path = write_prompts(tmp_path / "big.txt", LINES)
    dry_run(write_prompts(tmp_path / "warm.txt", 50), tmp_path)  # imports and the tokenizer, not measured
    peak = {}

    class traced:
        def __enter__(self):
            tracemalloc.start()

        def __exit__(self, *exc):
            peak["bytes"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    sink = dry_run(path, tmp_path, traced)
    assert sink.lines >= 8 * LINES  # every job's plan was printed
    assert peak["bytes"] < 400e6, peak  # ~2 KB a job held for the run (measured ~200 MB), never its plan
