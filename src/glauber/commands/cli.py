"""The ``glauber`` command line: parses the options and runs one command module."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from glauber.commands import (
    bench,
    compare,
    config_help,
    demo,
    eval_fid,
    eval_ppl,
    image_demo,
    sample,
    slurm,
    train,
    train_vq,
)

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


# One module per command, in the order ``glauber --help`` lists them: each has ``add_parser(sub)`` and ``run(args)``.
COMMANDS = {
    "train": train,
    "sample": sample,
    "demo": demo,
    "config-help": config_help,
    "bench": bench,
    "eval-ppl": eval_ppl,
    "compare": compare,
    "train-vq": train_vq,
    "eval-fid": eval_fid,
    "image-demo": image_demo,
    "slurm": slurm,
}


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
    """Run one ``glauber`` command; returns the exit status (0 ok, 2 a user mistake).

    A user mistake gives one line on stderr, ``glauber COMMAND: error: MESSAGE``, and status 2, never a
    traceback: bad options (argparse's usage message; its ``SystemExit`` is turned into the return
    value), and the exceptions a bad input or environment raises: ``ValueError`` (the project's own
    refusals name the option or key and the fix), ``OSError`` with its subclasses (``FileNotFoundError``,
    ``PermissionError``, ``IsADirectoryError``, a full disk ``ENOSPC`` ...). Any other exception is taken
    for a bug and propagates with its traceback. ``GLAUBER_DEBUG=1`` in the environment lets the user
    mistakes propagate too (their full traceback, for debugging). ``SystemExit`` from a command (a
    training stopped by a signal: 128 + its number) passes through unchanged."""
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
