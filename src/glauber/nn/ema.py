"""Exponential moving average of parameters, swappable into the live model for evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` per optimizer step; ``scope(model)`` swaps it in (re-entrant)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1) (got {decay})")
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in model.parameters()]
        self._backup: list[torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]
        if self.shadow[0].device != params[0].device:
            self.shadow = [s.to(params[0].device) for s in self.shadow]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @contextmanager
    def scope(self, model: nn.Module) -> Iterator[None]:
        if self._backup is not None:
            yield
            return
        params = list(model.parameters())
        self._backup = [p.detach().clone() for p in params]
        try:
            self.copy_to(model)
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, self._backup):
                    p.copy_(b)
            self._backup = None

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters (checkpoint from another model config?)")
        self.shadow = [s.to(self.shadow[0].device).float() for s in state["shadow"]]
        self.decay = state["decay"]

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` permanently (for export and sampling)."""
        with torch.no_grad():
            for p, s in zip(model.parameters(), self.shadow):
                p.copy_(s.to(p.device, p.dtype))
