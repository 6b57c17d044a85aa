"""The ``glauber`` command line: train, sample (and infill), demo, bench, config-help."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import fields, is_dataclass

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
    p.add_argument("--num", type=int, default=4, help="number of samples (default 4)")
    p.add_argument("--batch-size", type=int, default=16, help="samples drawn at once (default 16)")
    p.add_argument(
        "--m",
        type=int,
        default=None,
        help="positions redrawn per network call (default: the config's); network calls = (sweeps + corrector sweeps) * L / m",
    )
    add_sweep_options(p)
    p.add_argument("--prefix", default=None, help="text clamped at the start (infilling)")
    p.add_argument("--suffix", default=None, help="text clamped at the end (infilling)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of each draw (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    import torch

    torch.set_flush_denormal(True)  # tiny weights (e.g. a tied head) must not hit the slow denormal path on CPU
    try:
        if args.command == "train":
            from glauber.config import load_config
            from glauber.train import train

            run_dir = train(load_config(args.config, args.overrides))
            print(f"run directory: {run_dir}")
        elif args.command == "demo":
            from glauber.demo import run_demo

            run_demo(args.config, args.out, args.overrides)
        elif args.command == "config-help":
            print(config_help(args.modality))
        else:
            module, function = COMMANDS[args.command]
            getattr(importlib.import_module(module), function)(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"glauber {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
