"""A long prompts-file batch through the real `sdcli generate` runs with flat memory (RELIABILITY.md / issue 7,
"Resources"): after a warm-up, neither the process RSS nor the number of live tensors grows per job. A leak of
one decoded image per job (64x64 fp32 = 48 KiB) or of any tensor at all would fail this."""

from __future__ import annotations

import gc

import psutil
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403

import sdcli.app.save

JOBS = 200
WARMUP = 50


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no proxy __class__


def test_long_prompts_file_batch_has_flat_memory(tiny_sd1, tmp_path, monkeypatch):
    prompts = tmp_path / "jobs.txt"
    prompts.write_text("".join(f"a tiny picture number {i}\n" for i in range(JOBS)), encoding="utf-8")
    proc = psutil.Process()
    samples: dict[int, tuple[int, int]] = {}
    real = sdcli.app.save.save_rendered

    def save_and_measure(models, done, req):
        real(models, done, req)
        if done.target.index + 1 in (WARMUP, JOBS):
            samples[done.target.index + 1] = (proc.memory_info().rss, _live_tensors())

    monkeypatch.setattr(sdcli.app.save, "save_rendered", save_and_measure)
    args = render_args(tiny_sd1, "--prompts-file", prompts, "--cfg", "1", "-o", "out/{index:03d}.png", "--quiet")
    args.remove("a cat")  # the prompts come from the file
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == JOBS
    (rss0, tensors0), (rss1, tensors1) = samples[WARMUP], samples[JOBS]
    assert tensors1 <= tensors0, f"{tensors1 - tensors0} tensors leaked over {JOBS - WARMUP} jobs"
    growth_mib = (rss1 - rss0) / 2**20
    print(f"RSS growth {growth_mib:.2f} MiB, tensors {tensors0} -> {tensors1}")
    assert growth_mib < 4, f"RSS grew {growth_mib:.1f} MiB over {JOBS - WARMUP} jobs"
