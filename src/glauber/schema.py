"""Typed config fields: choices as Enums (a bad value fails at load, naming key and choices) and fields with help text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """The allowed values of a config option. Members compare, hash, print and serialise as their string values, so
    ``cfg.process.loss == "weighted"`` holds and a config saved as YAML (or an old checkpoint's strings) reads back the same."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__


def choice(name: str, values: Iterable[str], module: str) -> type[Choice]:
    """A ``Choice`` Enum of ``values`` (members named by their values, e.g. ``clean-fid``); ``module`` is where it is
    defined, so pickled members find their class."""
    return Choice(name, [(v, v) for v in values], module=module)  # type: ignore[return-value]


def option(default: Any, help: str) -> Any:
    """A config dataclass field with its help text (a list default is copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
