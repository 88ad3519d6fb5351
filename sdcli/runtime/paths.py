"""Where sdcli keeps its own files on this machine (user config, hash cache): the XDG base directories."""

from __future__ import annotations

import os
from pathlib import Path


def xdg_path(var: str, under_home: str, *parts: str) -> Path | None:
    """$VAR/parts, else ~/under_home/parts; None when neither is known (no HOME and no passwd entry, as for some
    container users): callers then do without a user config or a cache rather than fail."""
    base = os.environ.get(var)
    if not base:
        try:
            base = str(Path.home() / under_home)
        except RuntimeError:
            return None
    return Path(base).joinpath(*parts)
