"""Reading an input file whole: one place for the checks every input gets (images, latent and embedding files).

'-' reads stdin; a missing path, a directory or an unreadable file is a BadInputError naming the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sdcli.runtime.errors import BadInputError


def read_input(path: str | Path, what: str) -> tuple[str, bytes]:
    """(name for messages, the file's bytes). `what` names the expected kind: 'an image', 'a latent file'."""
    if str(path) == "-":
        return "<stdin>", sys.stdin.buffer.read()
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file")
    if p.is_dir():
        raise BadInputError(f"{p}: is a directory, not {what}")
    try:
        return str(p), p.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{p}: cannot read ({exc.strerror or exc})") from exc
