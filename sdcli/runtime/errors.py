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


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C (temp files removed by their `finally`, finished images kept)
    and exit 128 + the signal number. A BaseException, so no `except Exception` on the way can swallow it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum
