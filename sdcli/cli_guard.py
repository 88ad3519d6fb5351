"""What every command run gets around it: the one error handler (each error class is one line on stderr and its
documented exit code; anything unexpected is exit 1), usage errors that Typer finds (a bad option, a missing
argument) on one line too, SIGTERM/SIGHUP unwound like Ctrl-C, a closed stdout, and a UTF-8 re-run in an ASCII
locale."""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from typing import Optional

import typer
from typer.core import TyperGroup

from sdcli.runtime.errors import INTERRUPTED_EXIT_CODE, BadInputError, OutOfMemoryError, SdcliError, Terminated, quote

NAME_MAX = 255  # bytes of one file name: ext4, XFS, btrfs, APFS, NTFS (output/targets.NAME_MAX_BYTES)


def prepare_process() -> None:
    """Before the app runs: UTF-8 arguments, a stand-in for a closed stdout, the termination signals."""
    _utf8_everywhere()
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    for sig in _TERMINATING:
        if signal.getsignal(sig) is signal.SIG_DFL:  # `nohup` sets SIGHUP to ignored: keep it so
            signal.signal(sig, _on_signal)


def handled(fn):
    """Run a command body; map errors to one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sdcli.runtime import console

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SdcliError as e:
            if isinstance(e.__cause__, BrokenPipeError):
                _silence_stdout()
            console.error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted; finished images were kept")
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
        except Terminated as e:
            try:  # after a hang-up the terminal may be gone
                console.error(f"terminated by {e}; finished images were kept")
            except OSError:
                pass
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(7) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if os.environ.get("SDCLI_DEBUG"):
                raise
            if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
                # Path.exists()/is_file() raise it (rather than say False) for an input path; outputs are refused
                # before (output/targets.py, exit 7)
                console.error(f"{quote(e.filename, 120)}: no such file: a name in the path is over {NAME_MAX} "
                              "bytes, more than file systems allow")
                raise typer.Exit(BadInputError.exit_code) from None
            if _is_out_of_memory(e):
                console.error(f"{_OOM_ADVICE} ({_first_line(e)})")
                raise typer.Exit(OutOfMemoryError.exit_code) from None
            console.error(f"unexpected {type(e).__name__}: {e} (run with SDCLI_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


class OneLineGroup(TyperGroup):
    """The app's command group: a usage error Typer (Click) finds while parsing, in the group or in a command (an
    unknown option, a value of the wrong type, a missing argument), is one `error: ...` line on stderr and exit 2,
    like every error sdcli finds itself, instead of Click's usage box. `sdcli` alone still prints the help."""

    def make_context(self, *args, **kwargs):
        with one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


class one_line_usage_errors:  # noqa: N801 - used as a context manager
    def __enter__(self):
        return self

    def __exit__(self, kind, e, _tb):
        from typer._click.exceptions import ClickException, NoArgsIsHelpError

        if not isinstance(e, ClickException) or isinstance(e, NoArgsIsHelpError):
            return False
        from sdcli.runtime import console

        console.error(usage_line(e))
        raise typer.Exit(e.exit_code) from None


def usage_line(e) -> str:
    """Click's message as one line, in sdcli's style, with where the options are listed."""
    text = " ".join(e.format_message().split()).rstrip(".")
    text = text[:1].lower() + text[1:]
    ctx = getattr(e, "ctx", None)
    if ctx is None:
        return text
    return f"{text} (see '{ctx.command_path} --help')"


_OOM_ADVICE = ("out of memory: try a smaller -W/-H, a smaller --batch-size, --dtype fp16 or bf16, "
               "or --device cpu")


def _is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, XPU), or the RuntimeError the CPU and MPS allocators raise instead."""
    torch = sys.modules.get("torch")  # never import torch here: an OOM can only come from code that did
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so Python's exit flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class _ClosedStdout:
    """Stands in for sys.stdout when the process was started with stdout closed (`>&-`): Python then sets it to
    None, and a write would be an AttributeError (exit 1) or, through click, silently nothing (exit 0)."""

    closed = False

    def write(self, _data) -> int:
        from sdcli.runtime.errors import OutputError

        raise OutputError("stdout is closed: nowhere to write the output (redirect it, or drop -o - / --json)")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def buffer(self):
        return self


def stdout_needed(output: Optional[str], json_out: bool) -> None:
    """Data for stdout with stdout closed: refused before any work."""
    if isinstance(sys.stdout, _ClosedStdout) and (output == "-" or json_out):
        sys.stdout.write("")


def _on_signal(signum, _frame) -> None:
    """SIGTERM / SIGHUP: raise Terminated where the program is, so it unwinds like Ctrl-C. A second signal
    while it unwinds is ignored: the run is already ending, and its cleanup must not be cut short."""
    for sig in _TERMINATING:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))  # no SIGHUP on Windows


def _utf8_everywhere() -> None:
    """In an ASCII locale with Python's UTF-8 mode turned off (LC_ALL=C PYTHONUTF8=0), arguments arrive as
    surrogate escapes: a prompt 'ü' would reach the tokenizer as two lone surrogates and could not be written to
    a PNG. Run again in UTF-8 mode, with the same argument bytes, so prompts and file names mean what they say."""
    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower() not in ("ascii", "ansi_x3.4-1968"):
        return
    if os.environ.get("PYTHONUTF8") == "1":  # already tried: never loop
        return
    os.environ["PYTHONUTF8"] = "1"
    os.execv(sys.executable, [sys.executable, "-X", "utf8", "-m", "sdcli", *sys.argv[1:]])
