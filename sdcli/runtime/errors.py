"""Error classes that the CLI turns into a one-line message and a documented exit code.

Raise these from library code; only `cli.py` prints them and picks the exit status.
The table of codes is in the README; keep the two in step.
"""


class SdcliError(Exception):
    """A failure we expected and can explain in one line."""

    exit_code = 1


class UsageError(SdcliError):
    """A flag, config value or combination of options that makes no sense."""

    exit_code = 2


class BadInputError(SdcliError):
    """An input file (weights, image, latent, config, prompts file) is missing, unreadable or malformed."""

    exit_code = 3


class ModelNotFoundError(SdcliError):
    """A model id or path could not be resolved to files on disk (e.g. offline with a cold cache)."""

    exit_code = 4


class NumericalError(SdcliError):
    """NaN or Inf appeared in the weights, the UNet output or the decoded image."""

    exit_code = 5


class OutOfMemoryError(SdcliError):
    """The device ran out of memory even after the fallbacks we try."""

    exit_code = 6


class OutputError(SdcliError):
    """An output could not be written: exists without --overwrite, read-only folder, full disk, closed pipe."""

    exit_code = 7


class UnsupportedModelError(SdcliError):
    """A valid checkpoint of a family sdcli does not run yet (e.g. SDXL)."""

    exit_code = 8


class VerificationError(SdcliError):
    """`sdcli verify`: the re-render drifted from the image beyond the allowed difference."""

    exit_code = 9


INTERRUPTED_EXIT_CODE = 130

# --- user text inside a message ------------------------------------------------------------------------------
# An error quotes what it refuses (a prompt, a key, a value, a name from an image's metadata), and all of these can
# be as long as a file allows: a 62 KB prompts-file line must not become a 62 KB error line. Every message that
# quotes input goes through `quote` (or `quote_list` for names), and console.error caps a whole line at
# LINE_LIMIT as the last guard.

QUOTE_LIMIT = 200  # characters of one quoted text
LIST_LIMIT = 6  # names of a listing
LINE_LIMIT = 2000  # characters of one error line, whatever it holds


def quote(text: object, limit: int = QUOTE_LIMIT) -> str:
    """`text` as an error message shows it: whole when short, else its first `limit` characters, an ellipsis
    and its full length ("abc... (62,000 characters)")."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def quote_list(items, limit: int = LIST_LIMIT, each: int = 60) -> str:
    """Names for a message: at most `limit` of them, each quoted to `each` characters, and how many in all."""
    items = [quote(item, each) for item in items]
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def cap_line(message: str, limit: int = LINE_LIMIT) -> str:
    """A whole message at most `limit` characters: its start and its end (which often says what to do) kept."""
    if len(message) <= limit:
        return message
    head, tail = message[: limit * 3 // 4], message[-(limit // 4) :]
    return f"{head} ... [{len(message) - len(head) - len(tail):,} characters left out] ... {tail}"


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (temp files removed by their `finally`, finished images kept)
    and exit 128 + the signal number. A BaseException, so no `except Exception` on the way can swallow it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
