"""The ``glauber`` command line: train, sample (and infill), demo, bench, config-help."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
from dataclasses import fields, is_dataclass
from pathlib import Path

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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train from a YAML config (experiments/*.yaml) with key=value overrides, e.g. "
        "train.max_steps=1000 model.size=small. Resumes from <train.run_dir>/checkpoints/last.ckpt when "
        "train.resume=auto (the default). See `glauber config-help` for every key.",
    )
    p.add_argument("config", help="path to an experiment YAML file")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value pairs")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples (or infill) from a checkpoint",
        description="Sample text from a checkpoint with reverse Glauber dynamics (EMA weights). With --prefix "
        "and/or --suffix the given text is clamped and the positions between are infilled.",
    )
    p.add_argument("checkpoint", help="a .ckpt written by glauber train")
    p.add_argument("--num", type=_int_at_least(1), default=4, help="number of samples (default 4)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="samples drawn at once (default 16)")
    p.add_argument(
        "--m",
        type=_int_at_least(1),
        default=None,
        help="positions redrawn per network call (default: the config's); network calls = (sweeps + corrector sweeps) * L / m",
    )
    add_sweep_options(p)
    p.add_argument("--prefix", default=None, help="text clamped at the start (infilling)")
    p.add_argument("--suffix", default=None, help="text clamped at the end (infilling)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of each draw, > 0 (default 1)")
    p.add_argument("--top-p", type=probability_mass, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--float32", action="store_true", help="final categorical draw in float32 instead of float64")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--out", default=None, help="write the samples to this file (default: print)")


def add_sweep_options(p: argparse.ArgumentParser) -> None:
    """GGM's network-call knobs beyond ``--m``, shared by ``sample`` and ``eval-ppl``."""
    p.add_argument(
        "--sweeps",
        type=_int_at_least(1),
        default=None,
        help="GGM: sweeps K of the sampling schedule (default: the trained K); network calls = K * L / m. Another K "
        "needs a network trained with model.condition_on_alpha=true (it reads each position's signal level)",
    )
    p.add_argument(
        "--corrector-sweeps",
        type=_int_at_least(0),
        default=0,
        help="GGM: refinement sweeps after the last step (default 0), L / m more network calls each: every free "
        "position is re-noised as in the first forward sweep and redrawn by the last L / m reverse steps "
        "(leaves the learned data law invariant for m = 1)",
    )


def _int_at_least(minimum: int):
    """An argparse type: an integer ``>= minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {text!r})") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {value})")
        return value

    return parse


def _number_in(low: float, high: float, what: str):
    """An argparse type: a finite number in ``(low, high]`` (argparse names the option in its error)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})") from None
        if not (math.isfinite(value) and low < value <= high):
            raise argparse.ArgumentTypeError(f"must be {what} (got {text})")
        return value

    return parse


positive_float = _number_in(0.0, math.inf, "a finite number > 0")  # --temperature: 0 would divide the logits by zero
probability_mass = _number_in(0.0, 1.0, "a number in (0, 1], 1 = off")  # --top-p: 1 = no nucleus truncation


def check_positions_per_step(m: int | None, module: object, option: str = "--m") -> None:
    """``m`` (positions redrawn per GGM network call) must divide the checkpoint's length ``L``; other
    methods ignore it. Checked right after the checkpoint is loaded, before any sampling."""
    if m is None or getattr(getattr(module, "cfg", None), "method", None) not in ("ggm",):
        return
    L = module.cfg.data.seq_len  # type: ignore[attr-defined]
    if L % m:
        divisors = [d for d in range(1, L + 1) if L % d == 0]
        raise ValueError(f"{option} {m} does not divide the checkpoint's sequence length L={L}: use one of {divisors}")


def check_output_file(path: str | Path | None, option: str = "--out") -> None:
    """Fail now, naming ``option``, if a file cannot be written at ``path`` (a file in the way of its folder,
    a folder at the path itself, no permission, a read-only or pseudo file system), instead of after the
    minutes of loading and sampling that come before the write. Creates the missing parent folders (the
    write would) and, when the file does not exist yet, a probe file that is removed again."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {p} is a folder: give a file path, e.g. {p / 'out.txt'}")
    _check_creatable_dir(p.parent, option, f"{option} {p}")
    try:
        if p.exists():
            with open(p, "a"):
                pass
        else:
            with open(p, "x"):
                pass
            p.unlink()
    except OSError as e:
        raise ValueError(f"{option} {p} cannot be written ({e.strerror or e}): choose another path") from None


def check_output_dir(path: str | Path, option: str) -> None:
    """Fail now, naming ``option``, if ``path`` cannot be made a writable folder (creates it)."""
    _check_creatable_dir(Path(path), option, f"{option}={path}")


def _check_creatable_dir(d: Path, option: str, what: str) -> None:
    d = Path(d) if str(d) else Path(".")
    blocker = next((a for a in (d, *d.parents) if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"{what}: {blocker} is a file, not a folder (a file in the way): move it or choose another {option}")
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {d} ({e.strerror or e}): choose another {option}") from None


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train on bundled tiny Shakespeare (CPU, ~10 min) and write a report",
        description="Train GGM on the bundled tiny Shakespeare (character level) on the CPU, then write samples "
        "(unconditional and infilled), the loss curve and report.md to the output directory.",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: experiments/shakespeare.yaml)")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("overrides", nargs="*", help="config overrides as dotted key=value pairs")


def _add_config_help(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config-help",
        help="list every config key with its type and default",
        description="List every configuration key, its type and its default value.",
    )
    p.add_argument("--modality", choices=("text", "image"), default="text", help="text (default) or image configs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glauber",
        description="Glauber Generative Model: discrete diffusion learned by binary classification.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_sample(sub)
    _add_demo(sub)
    _add_config_help(sub)
    from glauber.bench import add_bench_parser
    from glauber.compare import add_compare_parser
    from glauber.evaluate import add_eval_ppl_parser
    from glauber.fid import add_eval_fid_parser
    from glauber.image_demo import add_image_demo_parser
    from glauber.slurm import add_slurm_parser
    from glauber.train_vq import add_train_vq_parser

    add_bench_parser(sub)
    add_eval_ppl_parser(sub)
    add_compare_parser(sub)
    add_train_vq_parser(sub)
    add_eval_fid_parser(sub)
    add_image_demo_parser(sub)
    add_slurm_parser(sub)
    return parser


def config_help(modality: str = "text") -> str:
    from glauber.config import ExperimentConfig, ImageExperimentConfig, field_docs

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


# Commands whose module defines ``<name>_command(args)`` (imported only when run: they pull in heavy libraries).
COMMANDS = {
    "sample": ("glauber.inference", "sample_command"),
    "eval-ppl": ("glauber.evaluate", "eval_ppl_command"),
    "train-vq": ("glauber.train_vq", "train_vq_command"),
    "eval-fid": ("glauber.fid", "eval_fid_command"),
    "image-demo": ("glauber.image_demo", "image_demo_command"),
    "slurm": ("glauber.slurm", "slurm_command"),
    "compare": ("glauber.compare", "compare_command"),
    "bench": ("glauber.bench", "bench_command"),
}


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
    import torch

    torch.set_flush_denormal(True)  # tiny weights (e.g. a tied head) must not hit the slow denormal path on CPU
    try:
        if args.command == "train":
            from glauber.config import load_config
            from glauber.train import train

            cfg = load_config(args.config, args.overrides)
            check_output_dir(cfg.train.run_dir, "train.run_dir")
            run_dir = train(cfg)
            print(f"run directory: {run_dir}")
        elif args.command == "demo":
            from glauber.demo import run_demo

            check_output_dir(args.out, "--out")
            run_demo(args.config, args.out, args.overrides)
        elif args.command == "config-help":
            print(config_help(args.modality))
        else:
            module, function = COMMANDS[args.command]
            getattr(importlib.import_module(module), function)(args)
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
