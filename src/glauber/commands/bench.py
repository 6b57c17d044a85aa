"""Speed benchmark: training tokens/s, time per network call when sampling, peak memory.

Synthetic tokens, the real network and loss: ``glauber bench --size small --seq-len 1024 --batch 32``.
Results print as a markdown table (and JSON with ``--json``) to paste into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from glauber.core.loss import analytic_loss
from glauber.core.noise import NoiseLaw
from glauber.core.process import make_training_example
from glauber.core.schedule import GlauberSchedule
from glauber.nn.ddit import DDiT, ModelConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training and sampling speed",
        description="Measure training throughput (tokens/s, forward+backward+AdamW on synthetic tokens) and the "
        "time of one network call when sampling, with and without torch.compile, and peak memory.",
    )
    p.add_argument("--size", default="small", help="model size: tiny, demo, small, medium (default small)")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length L (default 1024)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary size V (default 50257, GPT-2)")
    p.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument(
        "--positions-per-step",
        type=int,
        nargs="+",
        default=[1],
        metavar="M",
        help="hidden positions per sequence in training (default 1)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5; compile needs more)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both", help="torch.compile (default both)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    size: str, L: int, V: int, B: int, m: int, steps: int, warmup: int, compiled: bool, bf16: bool, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DDiT(ModelConfig(size=size, dropout=0.0), V).to(device)
    if compiled:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    sched = GlauberSchedule(L, sweeps=4, positions_per_step=m)
    law = NoiseLaw.uniform(V).to(device)
    x0 = torch.randint(0, V, (B, L), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    gen = torch.Generator(device=device).manual_seed(0)

    def train_step() -> None:
        ex = make_training_example(x0, sched, law, V, gen)
        with autocast:
            h = model(ex.x_in, ex.positions, (ex.t.float() + 1) / sched.num_steps, sched.signal_level(ex.t).float())
        loss = analytic_loss(h, ex.targets.reshape(-1), ex.pi_phi.reshape(-1), law).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        train_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    _sync(device)
    train_s = (time.perf_counter() - t0) / steps
    peak_train = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    model.eval()
    t_vec = torch.full((B,), sched.num_steps // 2, device=device)
    hidden = sched.hidden_mask(t_vec)
    x_in = x0.masked_fill(hidden, V)
    alpha = sched.signal_level(t_vec).float()
    with torch.no_grad(), autocast:
        for _ in range(warmup):
            model(x_in, hidden, (t_vec.float() + 1) / sched.num_steps, alpha)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x_in, hidden, (t_vec.float() + 1) / sched.num_steps, alpha)
        _sync(device)
    nfe_s = (time.perf_counter() - t0) / steps
    return {
        "size": size,
        "L": L,
        "V": V,
        "batch": B,
        "m": m,
        "compile": compiled,
        "precision": "bf16" if bf16 else "fp32",
        "params_M": round(model.num_parameters() / 1e6, 1),
        "train_tokens_per_s": round(B * L / train_s),
        "train_step_ms": round(1000 * train_s, 2),
        "nfe_ms": round(1000 * nfe_s, 2),
        "sample_seqs_per_s_K4": round(B / (nfe_s * 4 * L / m), 4),
        "peak_train_GiB": round(peak_train, 2),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for m in args.positions_per_step:
        for compiled in modes:
            rows.append(
                bench_one(
                    args.size,
                    args.seq_len,
                    args.vocab,
                    args.batch,
                    m,
                    args.steps,
                    args.warmup,
                    compiled,
                    args.precision == "bf16",
                    device,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}\n")
    cols = [
        "size",
        "params_M",
        "L",
        "batch",
        "m",
        "compile",
        "precision",
        "train_tokens_per_s",
        "nfe_ms",
        "sample_seqs_per_s_K4",
        "peak_train_GiB",
    ]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows
