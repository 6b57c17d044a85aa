"""``glauber bench --suite gpu`` (``make bench-gpu``) and ``--suite sampling``: the GPU report.

For the DDiT small and medium sizes of ``experiments/owt.yaml`` (L = 1024, GPT-2 vocabulary, batch 32, bf16,
m = 1), eager and ``torch.compile``d: training tokens/s of the project's own step (``GGMModule.compute_loss``,
backward, gradient clipping, AdamW, EMA), milliseconds per network call as the sampler makes it (the module's
denoiser inside ``glauber_sample``'s step loop, the draw included), the time of the paper's T = 4096 calls
(extrapolated from ``--sample-calls`` measured calls), and the peak memory of training; each against the
speed-of-light figures of a plain compiled DDiT-shaped model on one H200. CUDA graphs
(``mode="reduce-overhead"``) are tried for the sampler's network call, whose shapes are static.

Without a GPU (or with ``--tiny``) the same code runs end to end at a tiny stand-in size so it cannot rot; the
report says so and its numbers mean nothing for the targets. Peak memory there is counted by
``PeakMemory`` (live tensor storages) instead of ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from glauber.commands.args import device_of
from glauber.config import load_config
from glauber.core.sampler import _reverse_steps
from glauber.eval.peak_memory import PeakMemory
from glauber.methods import method_class

# Speed of light: a plain compiled DDiT-shaped model, bf16, one H200, L = 1024, batch 32, m = 1.
SPEED_OF_LIGHT = {"small": {"train_tok_s": 631_000, "call_ms": 15.5}, "medium": {"train_tok_s": 206_000, "call_ms": 48.9}}
TARGET = 0.95
PAPER_CALLS = 4096  # K = 4 sweeps x L = 1024 / m = 1
TINY = {"size": "tiny", "seq_len": 64, "batch": 4, "vocab": 97, "steps": 3, "warmup": 1, "sample_calls": 8}


def say(message: str) -> None:
    print(f"[glauber bench] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_module(config: str, size: str, L: int, V: int, device: torch.device, overrides: list[str]) -> Any:
    """The configured method at model size ``size`` and length ``L``, eager, with random weights."""
    cfg = load_config(config, [*overrides, f"model.size={size}", f"data.seq_len={L}", "train.compile=false"])
    torch.manual_seed(0)
    module = method_class(cfg.method)(OmegaConf.to_container(cfg, resolve=True), vocab_size=V).to(device)
    module._batch_checked = True  # synthetic tokens, in range by construction
    return module


def try_compile(module: Any, mode: str, device: torch.device) -> str | None:
    """Compile the module's network in place with ``mode`` (off/default/reduce-overhead); the reason when it
    cannot be (then the row is reported as skipped)."""
    if mode == "off":
        return None
    if mode == "reduce-overhead" and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    try:
        module.model.compile(mode=None if mode == "default" else mode)
    except Exception as e:  # noqa: BLE001 - any failure becomes a skipped row, never a crash
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def train_rate(module: Any, B: int, L: int, V: int, steps: int, warmup: int, bf16: bool, device: torch.device) -> dict:
    """Tokens/s and ms per step of the module's training step; peak memory of one step."""
    module.train()
    opt = module.configure_optimizers()["optimizer"]
    params = [p for p in module.model.parameters() if p.requires_grad]
    batch = torch.randint(0, V, (B, L), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    clip = module.cfg.optim.grad_clip

    def step(i: int) -> None:
        with autocast:
            loss, _ = module.compute_loss(batch, torch.Generator(device=device).manual_seed(i))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if module.ema is not None:
            module.ema.update(module.model)

    for i in range(warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # count the storages of one more (untimed) step
        with PeakMemory() as tracker:
            tracker.track(list(module.parameters()), [t for s in opt.state.values() for t in s.values()])
            if module.ema is not None:
                tracker.track(module.ema.shadow)
            step(warmup + steps)
        peak = tracker.peak
    return {"train_tok_s": B * L / seconds, "train_step_ms": 1000 * seconds, "peak_GiB": peak / 2**30}


def sampler_rate(module: Any, B: int, calls: int, device: torch.device, bf16: bool, graphs: bool) -> dict:
    """ms per network call inside the sampler's step loop (``calls`` steps from ``t = T - 1``, after a warm-up
    of the same length), and the time of the full ``T`` calls extrapolated from it."""
    module.eval()
    sched = module.schedule()
    law = module.law_on(device)
    denoiser = module.denoiser(sched)
    if graphs:  # each call's CUDA-graph outputs are consumed before the next call
        inner = denoiser

        def denoiser(x_in: torch.Tensor, hidden: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return inner(x_in, hidden, t).clone()

        denoiser.takes_positions = True  # type: ignore[attr-defined]
    T = sched.num_steps
    calls = min(calls, T)
    V = module.vocab_size
    x = torch.randint(0, V, (B, sched.seq_len), device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    draw = {"hidden_id": V, "temperature": 1.0, "top_p": 1.0, "float64": True}
    steps = range(T - 1, T - 1 - calls, -1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        _reverse_steps(denoiser, sched, law, x, None, steps, gen, False, "warm-up", **draw)
        _sync(device)
        t0 = time.perf_counter()
        _reverse_steps(denoiser, sched, law, x, None, steps, gen, False, "sampling", **draw)
        _sync(device)
    per_call = (time.perf_counter() - t0) / calls
    return {
        "call_ms": 1000 * per_call,
        "measured_calls": calls,
        "T": T,
        "sample_s_T": per_call * T,
        "samples_per_s": B / (per_call * T),
    }


def _row(kind: str, target: str, size: str, compile_mode: str, skipped: str | None, values: dict | None) -> dict:
    row: dict[str, Any] = {"kind": kind, "target": target, "model": size, "compile": compile_mode}
    if skipped:
        row["skipped"] = skipped
    row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in (values or {}).items()})
    sol = SPEED_OF_LIGHT.get(target, {}) if size == target else {}  # a tiny stand-in is not compared
    if not skipped and values and sol:
        key = "train_tok_s" if kind == "train" else "call_ms"
        if key in values:
            frac = values[key] / sol[key] if key == "train_tok_s" else sol[key] / values[key]
            row["speed_of_light"] = sol[key]
            row["fraction_of_sol"] = round(frac, 4)
            row["meets_95pct"] = frac >= TARGET
    return row


def run_gpu_suite(args: argparse.Namespace) -> dict[str, Any]:
    """The rows of the GPU report (training, sampler) for small and medium, eager and compiled."""
    device = torch.device(device_of(args))
    tiny = args.tiny or device.type != "cuda"
    config = args.config[0] if args.config else "experiments/owt.yaml"
    L, B, V = (TINY["seq_len"], TINY["batch"], TINY["vocab"]) if tiny else (args.seq_len, args.batch, args.vocab)
    steps, warmup = (TINY["steps"], TINY["warmup"]) if tiny else (args.steps, args.warmup)
    calls = TINY["sample_calls"] if tiny else args.sample_calls
    bf16 = args.precision == "bf16"
    if tiny and args.compile == "both" and device.type == "cpu" and not args.compile_on_cpu:
        modes = ["off"]
    else:
        modes = {"off": ["off"], "on": ["default"], "both": ["off", "default"]}[args.compile]
    graphs = device.type == "cuda" and "default" in modes
    note = (
        f"TINY stand-in run on {device.type.upper()} (model size tiny, L = {L}, batch {B}, V = {V}): it checks the "
        "script end to end; its numbers say nothing about the GPU targets. Run `make bench-gpu` on an H100/H200."
        if tiny
        else f"measured on {device_name(device)}"
    )
    say(note)
    rows = []
    for target in ("small", "medium"):
        size = "tiny" if tiny else target
        for mode in ["off", "default"]:
            label = "eager" if mode == "off" else "compiled"
            if mode not in modes:
                why = "tiny CPU run: compile not timed (add --compile-on-cpu)" if tiny else "not asked (--compile)"
                rows += [_row("train", target, size, label, why, None), _row("sampler", target, size, label, why, None)]
                continue
            for kind, fn in (("train", train_rate), ("sampler", sampler_rate)):
                say(f"{target} ({size}), {label}: {kind} ...")
                module = build_module(config, size, L, V, device, args.overrides)
                skipped = try_compile(module, mode, device)
                values = None
                if not skipped:
                    try:
                        if kind == "train":
                            values = fn(module, B, L, V, steps, warmup if mode == "off" else max(warmup, 3), bf16, device)
                        else:
                            values = fn(module, B, calls, device, bf16, False)
                    except Exception as e:  # noqa: BLE001 - a compile failure shows up at the first call
                        if mode == "off":
                            raise
                        skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                rows.append(_row(kind, target, size, label, skipped, values))
                say(json.dumps(rows[-1]))
                del module
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
        # the sampler's network call under CUDA graphs (static shapes), where there is CUDA
        label = "cuda-graphs"
        skipped = None if graphs else "CUDA graphs need a CUDA device (mode=reduce-overhead)"
        values = None
        if graphs:
            say(f"{target} ({size}), {label}: sampler ...")
            module = build_module(config, size, L, V, device, args.overrides)
            skipped = try_compile(module, "reduce-overhead", device)
            if not skipped:
                try:
                    values = sampler_rate(module, B, calls, device, bf16, True)
                except Exception as e:  # noqa: BLE001
                    skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            del module
        rows.append(_row("sampler", target, size, label, skipped, values))
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "tiny": tiny,
        "note": note,
        "shape": {"seq_len": L, "batch": B, "vocab": V, "positions_per_step": 1, "precision": args.precision},
        "paper_calls": PAPER_CALLS,
        "rows": rows,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def gpu_markdown(report: dict[str, Any]) -> str:
    lines = [f"# `make bench-gpu`: {report['device']}, torch {report['torch']}", "", report["note"], ""]
    s = report["shape"]
    lines.append(f"Shape: L = {s['seq_len']}, batch {s['batch']}, V = {s['vocab']}, m = 1, {s['precision']}.")
    lines.append("Sampling time of T calls is extrapolated from the measured calls (`measured_calls`).\n")
    cols = {
        "train": "target model compile train_tok_s train_step_ms peak_GiB speed_of_light fraction_of_sol meets_95pct".split(),
        "sampler": (
            "target model compile call_ms measured_calls T sample_s_T samples_per_s speed_of_light fraction_of_sol meets_95pct"
        ).split(),
    }
    for kind, title in (("train", "Training (tokens/s; peak memory)"), ("sampler", "Sampler (ms per network call; T calls)")):
        lines += [f"## {title}", "", "| " + " | ".join([*cols[kind], "skipped"]) + " |", "|" + "---|" * (len(cols[kind]) + 1)]
        for r in report["rows"]:
            if r["kind"] == kind:
                lines.append("| " + " | ".join(_fmt(r.get(c)) for c in [*cols[kind], "skipped"]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_gpu_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "bench_gpu.json", out / "bench_gpu.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(gpu_markdown(report) + "\n")
    return js, md


def run_sampling_suite(args: argparse.Namespace, modes: list[str]) -> list[dict[str, Any]]:
    """Samples/s and ms per network call of the sampler at ``--size``, for each compile mode."""
    device = torch.device(device_of(args))
    config = args.config[0] if args.config else "experiments/owt.yaml"
    rows = []
    for mode in modes:
        say(f"sampling, {args.size}, compile={mode} ...")
        module = build_module(config, args.size, args.seq_len, args.vocab, device, args.overrides)
        skipped = try_compile(module, mode, device)
        values = None
        if not skipped:
            try:
                values = sampler_rate(
                    module, args.batch, args.sample_calls, device, args.precision == "bf16", mode == "reduce-overhead"
                )
            except Exception as e:  # noqa: BLE001
                if mode == "off":
                    raise
                skipped = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        rows.append(_row("sampler", args.size, args.size, mode, skipped, values))
        say(json.dumps(rows[-1]))
    return rows
