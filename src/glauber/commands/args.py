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
    sweeps_help = "GGM: sweeps K (default: the trained K; another needs model.condition_on_alpha=true); network calls = K * L / m"
    p.add_argument("--sweeps", type=int_at_least(1), default=None, help=sweeps_help)
    corrector_help = (
        "GGM: sweeps re-noising and redrawing free positions after the last step (default 0), L / m more network calls each"
    )
    p.add_argument("--corrector-sweeps", type=int_at_least(0), default=0, help=corrector_help)
    p.add_argument("--steps", type=int_at_least(1), default=None, help="MDLM: denoising steps (default: mdlm.steps or L)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="softmax temperature of each draw, > 0 (default 1)")
    p.add_argument("--top-p", type=probability_mass, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def draw_options(args: argparse.Namespace) -> dict:
    """The ``module.sample`` keywords of ``add_draw_options``' options (the unset ones left to the config)."""
    given = {k: getattr(args, k) for k in ("positions_per_step", "steps", "sweeps")}
    always = {k: getattr(args, k) for k in ("corrector_sweeps", "temperature", "top_p")}
    return {k: v for k, v in given.items() if v is not None} | always


def device_of(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


class _Renamed(argparse.Action):
    """An old option spelling, refused with the new one's name."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, f"was renamed: use {self.help}")


def add_positions_per_step(p: argparse.ArgumentParser, help: str) -> None:
    """``--positions-per-step`` (``m``, positions redrawn per GGM network call); the old ``--m`` is refused naming it."""
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
    """``m`` (positions redrawn per GGM network call) must divide the checkpoint's length ``L``; other methods ignore it."""
    if m is None or getattr(getattr(module, "cfg", None), "method", None) not in ("ggm",):
        return
    L = module.cfg.data.seq_len  # type: ignore[attr-defined]
    if L % m:
        divisors = [d for d in range(1, L + 1) if L % d == 0]
        raise ValueError(f"{option} {m} does not divide the checkpoint's sequence length L={L}: use one of {divisors}")
