"""Progress of one batch on stderr: a rich bar on a terminal, or JSON step events for programs that drive sdcli.
Within a run of several images (`run(images)` around the render, app/render.render_all), each batch also shows
its place in the run (image 2/5) and an estimate of the time the whole run has left."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from sdcli.runtime import console


@dataclass
class Run:
    """The images of one run: how many, how many are finished, since when (the clock starts after the load)."""

    images: int
    done: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def left_s(self, batch_done: float) -> float | None:
        """Seconds the run has left, from its pace so far (`batch_done`: images of the current batch finished,
        fractional); None before any step has been timed."""
        finished = self.done + batch_done
        if finished <= 0:
            return None
        return (time.perf_counter() - self.t0) / finished * (self.images - finished)


_RUN: Run | None = None


@contextmanager
def run(images: int):
    """Batches rendered inside are numbered in a run of `images` images, with a whole-run estimate."""
    global _RUN
    outer, _RUN = _RUN, Run(images)
    try:
        yield _RUN
    finally:
        _RUN = outer


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"run {seconds // 60}:{seconds % 60:02d} left" if seconds < 3600 else \
        f"run {seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d} left"


class Progress:
    """A rich bar (on a terminal), or with mode "json" one JSON line per step ({"event": "step", "seeds", "step",
    "total", "elapsed_s"}) for programs that drive sdcli. The callback it yields advances it by one step."""

    def __init__(self, seeds: list[int], total: int | None, mode: str = "auto"):
        self.seeds = seeds
        self.label = f"seed {seeds[0]}" + (f"..{seeds[-1]}" if len(seeds) > 1 else "")
        self.run = _RUN if _RUN is not None and _RUN.images > 1 else None
        if self.run is not None:  # its place in the run: "image 2/5", "images 3-4/5"
            first, last = self.run.done + 1, self.run.done + len(seeds)
            where = f"image {first}" if first == last else f"images {first}-{last}"
            self.label = f"{where}/{self.run.images} {self.label}"
        self.total, self.mode = total, mode
        self.bar = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if self.mode == "json":
            return self.event
        if self.mode == "none" or console.is_quiet() or not console.stderr().is_terminal:  # bars need a terminal
            return None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[run]}"), console=console.stderr(), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="", run="")
        self.t0 = time.perf_counter()
        return self.step

    def event(self, i, total, _x, _denoised) -> None:
        event = {"event": "step", "seeds": self.seeds, "step": i + 1, "total": total,
                 "elapsed_s": round(time.perf_counter() - self.t0, 3)}
        if self.run is not None:
            left = self._run_left(i, total)
            event.update(image=self.run.done + 1, images=self.run.images,
                         run_left_s=None if left is None else round(left, 3))
        console.emit_event(event)

    def step(self, i, total, _x, _denoised) -> None:
        rate = (i + 1) / max(time.perf_counter() - self.t0, 1e-9)
        run = _duration(self._run_left(i, total)) if self.run is not None else ""
        self.bar.update(self.task, completed=i + 1, total=total, rate=f"{rate:.2f} it/s", run=run)

    def _run_left(self, i: int, total: int) -> float | None:
        return self.run.left_s(len(self.seeds) * (i + 1) / total) if total else None

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.run is not None:
            self.run.done += len(self.seeds)
