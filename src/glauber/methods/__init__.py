"""One LightningModule subclass per method, sharing ``DiffusionModule``."""

from glauber.methods.base import DiffusionModule
from glauber.methods.ggm import GGMModule

METHODS: dict[str, type[DiffusionModule]] = {"ggm": GGMModule}


def method_class(name: str) -> type[DiffusionModule]:
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)} (got {name!r})")
    return METHODS[name]


__all__ = ["METHODS", "DiffusionModule", "GGMModule", "method_class"]
