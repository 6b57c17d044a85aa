"""Checkpoints that are never half-written, and the check that a checkpoint fits the config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file in the same directory, fsync, then ``os.replace``: a killed run
    leaves either the old checkpoint or the new one, never a truncated file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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


def check_compatible(ckpt_path: str | Path, current: dict) -> None:
    """Refuse to resume from a checkpoint made with another model/data/schedule configuration."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    saved = (state.get("glauber") or {}).get("config")
    if saved is None:
        raise ValueError(f"{ckpt_path} is not a glauber checkpoint")
    from glauber.config import with_defaults

    diffs = config_differences(with_defaults(saved), current)
    if diffs:
        raise ValueError(
            f"checkpoint {ckpt_path} was made with another configuration ({'; '.join(diffs)}); "
            "use a new train.run_dir, or set the same values"
        )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a restarted run continues from: the newest of ``last.ckpt`` and SLURM's
    ``hpc_ckpt_*.ckpt`` in the run directory."""
    run_dir = Path(run_dir)
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None
