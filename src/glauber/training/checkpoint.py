"""A run directory's safety: the checkpoint a restart resumes from, the run lock, old files moved aside (docs/RELIABILITY.md)."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glauber.config import with_defaults

# Config sections that define what a checkpoint *is*: resuming or sampling with other values is refused.
STRUCTURAL_KEYS = (
    "method",
    "data.seq_len",
    "data.tokenizer",
    "model",
    "schedule",
    "process",
    "mdlm.eps",
    "mdlm.time_conditioning",
)


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def config_differences(saved: dict, current: dict) -> list[str]:
    """Structural keys whose values differ between a checkpoint's config and the current one."""
    out = []
    for key in STRUCTURAL_KEYS:
        a, b = _get(saved, key), _get(current, key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def load_lazily(path: str | Path) -> dict:
    """A checkpoint's contents, tensors memory-mapped (cheap at any size), or a ``ValueError`` saying why it does not load."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing here: unusable
        first = re.split(r"(?<=\.)\s", str(e).strip(), maxsplit=1)[0]  # torch's advice on corruption follows
        raise ValueError(f"{path} does not load ({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"{path} does not load (not a Lightning checkpoint: no global_step)")
    return state


def check_compatible(ckpt_path: str | Path, current: dict) -> None:
    """Refuse to resume from a checkpoint made with another model/data/schedule configuration."""
    saved = (load_lazily(ckpt_path).get("glauber") or {}).get("config")
    if saved is None:
        raise ValueError(f"{ckpt_path} is not a glauber checkpoint")
    diffs = config_differences(with_defaults(saved), current)
    if diffs:
        raise ValueError(
            f"checkpoint {ckpt_path} was made with another configuration ({'; '.join(diffs)}); "
            "use a new train.run_dir, or set the same values"
        )


@dataclass
class CheckpointScan:
    """What a run directory holds to resume from: the global step of each checkpoint that loads
    (``last.ckpt``, ``step*.ckpt``, SLURM's ``hpc_ckpt_*.ckpt``) and why each other one does not."""

    run_dir: Path
    steps: dict[Path, int] = field(default_factory=dict)
    unreadable: dict[Path, str] = field(default_factory=dict)

    @property
    def last(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def newest(self) -> Path | None:
        """The loadable checkpoint of the highest global step (at a tie ``last.ckpt``, then ``hpc_ckpt``)."""
        key = lambda p: (self.steps[p], 2 if p == self.last else int(p.name.startswith("hpc_ckpt_")))
        return max(self.steps, key=key, default=None)

    def explain(self) -> str:
        """Which checkpoint a resumed run continues from, and why that one (for the log)."""
        chosen = self.newest
        lines = [f"resuming from {chosen} (global step {self.steps[chosen]}): the newest checkpoint that loads"]
        if self.last not in self.steps and self.last not in self.unreadable:
            lines.append("checkpoints/last.ckpt is missing")
        elif self.last in self.steps and self.last != chosen:
            lines.append(f"checkpoints/last.ckpt is older (global step {self.steps[self.last]})")
        lines += self.unreadable.values()
        return "; ".join(lines)


def scan_checkpoints(run_dir: str | Path) -> CheckpointScan:
    """The global step of every checkpoint a restarted run could continue from (a step checkpoint whose ``last.ckpt``
    was never written counts like any other)."""
    run_dir = Path(run_dir)
    scan = CheckpointScan(run_dir)
    for path in [scan.last, *sorted((run_dir / "checkpoints").glob("step*.ckpt")), *sorted(run_dir.glob("hpc_ckpt_*.ckpt"))]:
        if not path.is_file():
            continue
        try:
            scan.steps[path] = load_lazily(path)["global_step"]
        except ValueError as e:
            scan.unreadable[path] = str(e)
    return scan


class RunDirLocked(ValueError):
    """Another training holds the run directory (``glauber train`` prints this message and exits 2)."""


@contextmanager
def run_lock(run_dir: Path, owner: bool) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (``fcntl.flock``, which the kernel releases however the process ends) while the block runs;
    only the ``owner`` (global rank 0) takes it. Without ``flock`` support (some Lustre mounts) the run goes on unlocked."""
    if not owner:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunDirLocked(
                f"{run_dir} is in use by another training ({holder}); wait for it to finish or stop it, "
                "or use another train.run_dir"
            ) from None
        except OSError as e:
            print(f"[glauber.train] warning: cannot lock {f.name} ({e}); running unlocked", file=sys.stderr, flush=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield


# Left in place when a run's files are moved aside: the lock, earlier runs, and SLURM's job script and logs.
_STAY = re.compile(r"\.lock|previous|job\.sbatch|slurm-.*\.out")


def run_history(run_dir: Path) -> list[Path]:
    """The files and folders of the run directory that belong to an earlier run (all but ``_STAY``)."""
    return sorted(p for p in run_dir.iterdir() if not _STAY.fullmatch(p.name)) if run_dir.is_dir() else []


def move_aside(run_dir: Path, paths: list[Path]) -> Path:
    """Move ``paths`` (inside ``run_dir``) to ``<run_dir>/previous/<timestamp>/`` keeping their relative paths; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / "previous" / stamp, 1
    while dest.exists():
        dest, n = run_dir / "previous" / f"{stamp}-{n}", n + 1
    for p in paths:
        target = dest / p.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    return dest
