"""The ``glauber`` command line: parses the options and runs one command module."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from glauber.commands import bench, compare, config_help, demo, eval_fid, eval_ppl, image_demo, sample, slurm, train, train_vq

EPILOG = """examples:
  glauber train experiments/shakespeare.yaml train.max_steps=500 train.run_dir=runs/try
  glauber sample runs/try/checkpoints/last.ckpt --num 4 --out samples.txt
  glauber sample CKPT --prefix "ROMEO:" --suffix "the end." --num 2      (infilling)
  glauber demo                     (train on tiny Shakespeare on CPU, write runs/demo/report.md)
  glauber image-demo               (VQ + GGM on bundled emoji on CPU: samples, infilling, FID)
  glauber compare                  (GGM vs its CE ablation, MDLM and AR on one budget)
  glauber slurm --nodes 4 --gpus-per-node 8 experiments/owt.yaml   (render the sbatch script and submit; --dry-run prints)
  glauber config-help              (every config key, its type and default)
"""


# command -> its module (with ``add_parser(sub)`` and ``run(args)``), in the order ``glauber --help`` lists them
MODULES = (train, sample, demo, config_help, bench, eval_ppl, compare, train_vq, eval_fid, image_demo, slurm)
COMMANDS = {m.__name__.rsplit(".", 1)[1].replace("_", "-"): m for m in MODULES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glauber",
        description="Glauber Generative Model: discrete diffusion learned by binary classification.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``glauber`` command; returns the exit status. A user mistake (bad options, ``ValueError``, ``OSError``) is
    one line on stderr and status 2 (``GLAUBER_DEBUG=1``: its traceback); other exceptions (bugs) and ``SystemExit`` pass."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its usage message (or --help)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    torch.set_flush_denormal(True)  # tiny weights (e.g. a tied head) must not hit the slow denormal path on CPU
    try:
        COMMANDS[args.command].run(args)
    except (ValueError, OSError) as e:
        if os.environ.get("GLAUBER_DEBUG", "") not in ("", "0"):
            raise
        print(f"glauber {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    return 0


def _message(e: BaseException) -> str:
    """One line for the user: the exception's text (an ``OSError`` also names its file)."""
    if isinstance(e, OSError) and e.strerror and not (e.args and len(e.args) == 1):
        if e.filename is None:
            return e.strerror
        return f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
