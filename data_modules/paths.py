"""Where a data path given in a config is looked up: as given when absolute, else in the working
directory, then in the project root."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def candidates(source: str) -> list[Path]:
    """The paths ``source`` may name, in lookup order."""
    p = Path(source).expanduser()
    return [p] if p.is_absolute() else list(dict.fromkeys([Path.cwd() / p, PROJECT_ROOT / p]))


def find_path(source: str) -> Path | None:
    """The first of ``candidates(source)`` that exists (None when none does)."""
    return next((p for p in candidates(source) if p.exists()), None)
