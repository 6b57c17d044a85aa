"""The optimiser every trainer here uses: AdamW with a linear warm-up, then a constant or cosine
learning rate (down to ``min_lr_ratio`` of the peak), stepped once per optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch


def lr_factor(step: int, warmup_steps: int, lr_schedule: str, total_steps: int, min_lr_ratio: float) -> float:
    """The multiple of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if lr_schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def adamw_with_schedule(groups: Any, o: Any, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` answer for parameter ``groups`` and ``optim`` options ``o``."""
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, o.warmup_steps, o.lr_schedule, max(total_steps, 1), o.min_lr_ratio)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
