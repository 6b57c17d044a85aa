"""One LightningModule subclass per method, sharing ``GenerativeModule``: GGM and its baselines in the
same framework (same backbone, data, optimiser, EMA and checkpoints)."""

from glauber.methods.ar import ARModule
from glauber.methods.base import GenerativeModule
from glauber.methods.ggm import GGMModule
from glauber.methods.mdlm import MDLMModule

METHODS: dict[str, type[GenerativeModule]] = {"ggm": GGMModule, "ar": ARModule, "mdlm": MDLMModule}


def method_class(name: str) -> type[GenerativeModule]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)} (got {name!r})")
    return METHODS[name]


__all__ = ["METHODS", "ARModule", "GenerativeModule", "GGMModule", "MDLMModule", "method_class"]
