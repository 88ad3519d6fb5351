"""Shared pytest set-up: make scripts/ importable (checkpoint makers live there)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core box oversubscribed threads made
    convolutions ~30x slower. One thread keeps the suite fast and its timings steady."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    """sdcli keeps checkpoint hashes in $XDG_CACHE_HOME/sdcli: tests must not read or write the user's."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


# tests/slow/ (full-size models, minutes and ~20 GB of RAM each) runs only when asked: SDCLI_SLOW=1 pytest tests/slow
collect_ignore = [] if __import__("os").environ.get("SDCLI_SLOW") == "1" else ["slow"]
