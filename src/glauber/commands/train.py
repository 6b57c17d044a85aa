"""``glauber train``: train a model from a YAML config with key=value overrides."""

from __future__ import annotations

import argparse

from glauber.config import load_config
from glauber.files import check_output_dir
from glauber.training.train import train


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config (experiments/*.yaml) with key=value overrides, e.g. "
        "train.max_steps=1000 model.size=small. Resumes from <train.run_dir>/checkpoints/last.ckpt when "
        "train.resume=auto (the default). See `glauber config-help` for every key.",
    )
    p.add_argument("config", help="path to an experiment YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value pairs")


def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    check_output_dir(cfg.train.run_dir, "train.run_dir")
    print(f"run directory: {train(cfg)}")
