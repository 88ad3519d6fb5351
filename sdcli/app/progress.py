"""Progress of one batch on stderr: a rich bar on a terminal, or JSON step events for programs that drive sdcli."""

from __future__ import annotations

import time

from sdcli.runtime import console


class Progress:
    """A rich bar (on a terminal), or with mode "json" one JSON line per step ({"event": "step", "seeds", "step",
    "total", "elapsed_s"}) for programs that drive sdcli. The callback it yields advances it by one step."""

    def __init__(self, seeds: list[int], total: int | None, mode: str = "auto"):
        self.seeds = seeds
        self.label = f"seed {seeds[0]}" + (f"..{seeds[-1]}" if len(seeds) > 1 else "")
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
                            console=console.stderr(), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, rate="")
        self.t0 = time.perf_counter()
        return self.step

    def event(self, i, total, _x, _denoised) -> None:
        console.emit_event({"event": "step", "seeds": self.seeds, "step": i + 1, "total": total,
                            "elapsed_s": round(time.perf_counter() - self.t0, 3)})

    def step(self, i, total, _x, _denoised) -> None:
        rate = (i + 1) / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=i + 1, total=total, rate=f"{rate:.2f} it/s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
