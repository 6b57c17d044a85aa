"""Option types and checks shared by the commands: argparse names the option in every error."""

from __future__ import annotations

import argparse
import math

import torch


def add_draw_options(p: argparse.ArgumentParser) -> None:
    """How samples are drawn from a checkpoint (``sample``, ``eval-ppl``); each method reads its own knobs."""
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="samples drawn at once (default 16)")
    add_positions_per_step(
        p, "GGM: positions redrawn per network call (default: the config's); network calls = (K + corrector sweeps) * L / m"
    )
    p.add_argument(
        "--sweeps",
        type=int_at_least(1),
        default=None,
        help="GGM: sweeps K of the sampling schedule (default: the trained K); network calls = K * L / m. Another K "
        "needs a network trained with model.condition_on_alpha=true (it reads each position's signal level)",
    )
    p.add_argument(
        "--corrector-sweeps",
        type=int_at_least(0),
        default=0,
        help="GGM: refinement sweeps after the last step (default 0), L / m more network calls each: every free "
        "position is re-noised as in the first forward sweep and redrawn by the last L / m reverse steps "
        "(leaves the learned data law invariant for m = 1)",
    )
    p.add_argument("--steps", type=int_at_least(1), default=None, help="MDLM: denoising steps (default: mdlm.steps or L)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of each draw, > 0 (default 1)")
    p.add_argument("--top-p", type=probability_mass, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def draw_options(args: argparse.Namespace) -> dict:
    """The ``module.sample`` keywords of ``add_draw_options``' options (the unset ones left to the config)."""
    given = {"positions_per_step": args.positions_per_step, "steps": args.steps, "sweeps": args.sweeps}
    return {k: v for k, v in given.items() if v is not None} | {
        "corrector_sweeps": args.corrector_sweeps,
        "temperature": args.temperature,
        "top_p": args.top_p,
    }


def device_of(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


class _Renamed(argparse.Action):
    """An old option spelling, refused with the new one's name."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, f"was renamed: use {self.help}")


def add_positions_per_step(p: argparse.ArgumentParser, help: str) -> None:
    """``--positions-per-step`` (``m``, the positions redrawn per GGM network call; the config key
    ``sample.positions_per_step``); the old ``--m`` is refused naming it."""
    p.add_argument("--positions-per-step", type=int_at_least(1), default=None, metavar="M", help=help)
    p.add_argument("--m", action=_Renamed, help="--positions-per-step", dest="_renamed_m", default=argparse.SUPPRESS)


def int_at_least(minimum: int):
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


def number_in(low: float, high: float, what: str):
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


positive_float = number_in(0.0, math.inf, "a finite number > 0")  # --temperature: 0 would divide the logits by zero
probability_mass = number_in(0.0, 1.0, "a number in (0, 1], 1 = off")  # --top-p: 1 = no nucleus truncation


def check_positions_per_step(m: int | None, module: object, option: str = "--positions-per-step") -> None:
    """``m`` (positions redrawn per GGM network call) must divide the checkpoint's length ``L``; other
    methods ignore it. Checked right after the checkpoint is loaded, before any sampling."""
    if m is None or getattr(getattr(module, "cfg", None), "method", None) not in ("ggm",):
        return
    L = module.cfg.data.seq_len  # type: ignore[attr-defined]
    if L % m:
        divisors = [d for d in range(1, L + 1) if L % d == 0]
        raise ValueError(f"{option} {m} does not divide the checkpoint's sequence length L={L}: use one of {divisors}")
