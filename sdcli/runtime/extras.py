"""Optional extras (pyproject's [project.optional-dependencies]): the one install hint every error that needs one
gives. sdcli is installed from its checkout (the distribution, sdcli-diffusion, is not on the package index; `sdcli`
there is an unrelated project), so the hint names the checkout's own commands."""

from __future__ import annotations

DISTRIBUTION = "sdcli-diffusion"


def install_hint(extra: str) -> str:
    """How to install the optional extra `extra` (ray, serve, gguf, ...) from the sdcli checkout."""
    return f"in the sdcli checkout run `make install-{extra}` (or `pip install -e '.[{extra}]'`)"
