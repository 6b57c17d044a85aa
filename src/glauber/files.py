"""Files that are never half-written and output paths checked before the work that fills them."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# ``atomic_write``'s temporary files: ``.<name>.<8 random characters from mkstemp>.tmp`` beside the target
PARTIAL_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` into a temporary file beside ``path``, fsync, then ``os.replace``: a killed process leaves the old
    file or the new one, never a truncated one (at worst a temporary file, which ``remove_partial_files`` deletes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through ``atomic_write``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def remove_partial_files(*dirs: Path) -> list[Path]:
    """Delete the temporary files ``atomic_write`` left in ``dirs`` when killed mid-write. Only while holding the run's
    lock: a running training's temporary files look the same."""
    removed = [p for d in dirs if d.is_dir() for p in d.iterdir() if p.is_file() and PARTIAL_FILE.fullmatch(p.name)]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def check_output_file(path: str | Path | None, option: str = "--out") -> None:
    """Fail now, naming ``option``, if a file cannot be written at ``path`` (a file in the way, a folder at the path,
    no permission, a read-only file system), not after minutes of work. Creates the missing parent folders."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p} is a folder: give a file path, e.g. {p / 'out.txt'}")
    check_output_dir(p.parent, option, f"{option} {p}")
    try:
        if p.exists():
            p.open("a").close()
        else:
            p.open("x").close()
            p.unlink()
    except OSError as e:
        raise ValueError(f"{option} {p} cannot be written ({e.strerror or e}): choose another path") from None


def check_output_dir(path: str | Path, option: str, what: str | None = None) -> None:
    """Fail now, naming ``option`` (``what`` in the message), if ``path`` cannot be made a writable folder (creates it)."""
    what = what or f"{option}={path}"
    d = Path(path) if str(path) else Path(".")
    blocker = next((a for a in (d, *d.parents) if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{what}: {blocker} is a file, not a folder (a file in the way): move it or choose another {option}")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {d} ({e.strerror or e}): choose another {option}") from None
