"""Where messages go: stderr through rich (colour only on a TTY and without NO_COLOR); data on stdout only when asked.

User text (prompts, file names) is always printed as plain `Text`, never parsed as rich markup, so a prompt like
`[blurry]` survives and `[/]` cannot crash the printer.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def stderr():
    from rich.console import Console

    no_color = bool(os.environ.get("NO_COLOR"))
    return Console(stderr=True, highlight=False, no_color=no_color, soft_wrap=True)


_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


_verbose = False


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


@contextmanager
def stage(name: str):
    """With -v/--verbose, "time: NAME 1.234 s" on stderr when the stage ends (stdout stays for results); without
    it, nothing. A stage that fails prints nothing: the error line says what happened."""
    if not _verbose:
        yield
        return
    from rich.text import Text

    started = time.perf_counter()
    yield
    stderr().print(Text(f"time: {name} {time.perf_counter() - started:.3f} s", style="dim"))


def info(*parts: str, style: str | None = None) -> None:
    """Print one line on stderr; every part is plain text (no markup). Silent with --quiet."""
    if _quiet:
        return
    from rich.text import Text

    stderr().print(Text("".join(parts), style=style or ""))


def error(message: str) -> None:
    """One-line error on stderr, printed even with --quiet."""
    from rich.text import Text

    line = Text("error: ", style="bold red")
    line.append(message.replace("\n", " "))
    stderr().print(line)


def emit_event(obj: Any) -> None:
    """One JSON progress event per line on stderr (stdout stays for results)."""
    sys.stderr.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stderr.flush()


def emit_json(obj: Any) -> None:
    """One JSON object per line on stdout, flushed so a reading pipe sees it at once."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
