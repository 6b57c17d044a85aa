"""``glauber config-help``: every config key with its type, default and meaning."""

from __future__ import annotations

import argparse
from dataclasses import fields, is_dataclass

from glauber.config import ExperimentConfig, ImageExperimentConfig, field_docs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config-help",
        help="list every config key with its type and default",
        description="List every configuration key, its type and its default value.",
    )
    p.add_argument("--modality", choices=("text", "image"), default="text", help="text (default) or image configs")


def config_help(modality: str = "text") -> str:
    lines: list[str] = []

    def walk(obj: object, prefix: str) -> None:
        docs = field_docs(type(obj))
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                doc = (type(value).__doc__ or "").strip().splitlines()[0] if type(value).__doc__ else ""
                lines.append(f"\n[{prefix}{f.name}]  {doc}")
                walk(value, f"{prefix}{f.name}.")
            else:
                t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
                lines.append(f"  {prefix}{f.name}: {t} = {value!r}")
                lines.append(f"      {docs.get(f.name, '(undocumented)')}")

    walk(ImageExperimentConfig() if modality == "image" else ExperimentConfig(), "")
    return "\n".join(lines).lstrip("\n")


def run(args: argparse.Namespace) -> None:
    print(config_help(args.modality))
