"""Typed config fields: choices as Enums (a bad value fails when the config loads, naming the key and the
choices) and fields that carry their help text (``glauber config-help`` prints it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from enum import Enum
from typing import Any


class Choice(str, Enum):
    """The allowed values of a config option. An Enum-typed field of a structured config refuses any other
    value when the config loads, naming the key and the choices. Members are named by their values and
    compare, hash, print and serialise as those strings, so ``cfg.process.loss == "weighted"`` holds and
    a config saved as YAML (or an old checkpoint's plain strings) reads back the same."""

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    __format__ = str.__format__


def choice(name: str, values: Iterable[str], module: str) -> type[Choice]:
    """A ``Choice`` Enum of ``values`` (each member named by its value, which need not be an identifier:
    ``clean-fid``); ``module`` is where it is defined, so pickled members find their class."""
    return Choice(name, [(v, v) for v in values], module=module)  # type: ignore[return-value]


def option(default: Any, help: str) -> Any:
    """A config dataclass field with its help text (a list default is copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
