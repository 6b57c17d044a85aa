"""``glauber train-vq``: train a VQ image tokenizer from a YAML config."""

from __future__ import annotations

import argparse

from glauber.training.train_vq import load_vq_train_config, train_vq


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-vq",
        help="train a small VQ image tokenizer from a YAML config",
        description="Train a VQ image tokenizer (VQGAN encoder/decoder, taming-compatible parameters) from a YAML "
        "config (e.g. experiments/vq_emoji.yaml) with key=value overrides such as max_steps=500 vq.n_embed=256. "
        "Writes <run_dir>/vq.ckpt, recon.png and metrics.csv. Keys: see glauber.training.train_vq.VQTrainConfig.",
    )
    p.add_argument("config", help="path to a VQ training YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value pairs")


def run(args: argparse.Namespace) -> None:
    run_dir = train_vq(load_vq_train_config(args.config, args.overrides))
    print(f"run directory: {run_dir}  (tokenizer: {run_dir / 'vq.ckpt'}, reconstructions: {run_dir / 'recon.png'})")
