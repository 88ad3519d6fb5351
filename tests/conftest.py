"""Shared pytest set-up: make scripts/ importable (checkpoint makers live there)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
