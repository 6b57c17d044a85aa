"""Sampling-noise bounds for comparing an empirical law with an exact one."""

from __future__ import annotations

import math

import torch


def tv_bound(p: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """A bound the TV distance between ``p`` and the histogram of ``n`` draws from it exceeds with
    probability at most ``delta``.

    ``E[TV] <= 0.5 * sum_x sqrt(p_x (1 - p_x) / n)`` (Jensen on each cell's binomial count), and one
    draw moves the TV by at most ``1/n``, so McDiarmid adds ``sqrt(ln(1/delta) / (2 n))``.
    """
    p = p.double().reshape(-1)
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / delta) / (2 * n))
