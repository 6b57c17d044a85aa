"""``glauber config-help``: every config key with its type, default and meaning."""

from __future__ import annotations

import argparse
import enum
import textwrap
import typing
from dataclasses import fields, is_dataclass

from glauber.config import ExperimentConfig, ImageExperimentConfig

HEADER = (
    "Every key of an experiment config (experiments/*.yaml, or key=value on the command line), its type, default "
    "and meaning.\nA config file may start from others with a top-level `base: NAME` (or a list of names: YAML "
    "files in its folder),\nmerged first; the file then states only what differs (e.g. experiments/owt_small.yaml)."
)

PAD = " " * 6


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config-help",
        help="list every config key with its type and default",
        description="List every configuration key, its type, its default value and what it does.",
    )
    p.add_argument("--modality", choices=("text", "image"), default="text", help="text (default) or image configs")


def type_name(hint: object) -> tuple[str, list[str]]:
    """How a field's type reads in the listing, and the allowed values when it is a choice (an Enum)."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "str", [str(m.value) for m in hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args:
        inner, values = type_name(args[0])
        return f"list[{inner}]", values
    return (hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")), []


def config_help(modality: str = "text") -> str:
    lines: list[str] = [HEADER, ""]

    def walk(obj: object, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                doc = " ".join((type(value).__doc__ or "").strip().split("\n\n")[0].split())
                lines.append(f"\n[{prefix}{f.name}]  {doc}")
                walk(value, f"{prefix}{f.name}.")
                continue
            name, values = type_name(hints[f.name])
            each = "each " if name.startswith("list[") else ""
            choices = f"  ({each}one of: {', '.join(values)})" if values else ""
            lines.append(f"  {prefix}{f.name}: {name} = {value!r}{choices}")
            text = f.metadata.get("help") or "(undocumented)"
            lines.extend(textwrap.wrap(text, 120, initial_indent=PAD, subsequent_indent=PAD, break_on_hyphens=False))

    walk(ImageExperimentConfig() if modality == "image" else ExperimentConfig(), "")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    print(config_help(args.modality))
