"""Speed and memory benchmarks (docs/BENCHMARKS.md), one suite per run (``--suite``):

- ``throughput`` (default): training tokens/s (forward + backward + AdamW of the DDiT and the GGM loss on
  synthetic tokens) and the time of one network call, eager and compiled:
  ``glauber bench --size small --seq-len 1024 --batch 32``.
- ``overhead``: the Lightning training step of ``glauber train`` against a bare PyTorch loop, and
  ``glauber_sample`` against bare network calls (``bench_overhead``).
- ``sampling``: samples/s and ms per network call of the sampler, eager, ``torch.compile`` and CUDA graphs.
- ``memory``: peak memory of a config's training step, from a dry run on fake tensors (``eval.peak_memory``).
- ``gpu``: the GPU report of ``make bench-gpu`` (``bench_gpu``); a tiny stand-in run without a GPU.

Every suite prints a markdown table (and writes JSON with ``--json``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from glauber.commands.args import device_of
from glauber.commands.bench_gpu import device_name, run_gpu_suite, run_sampling_suite, say, write_gpu_report
from glauber.commands.bench_overhead import run_overhead
from glauber.config import load_config
from glauber.core.loss import analytic_loss
from glauber.core.noise import NoiseLaw
from glauber.core.process import make_training_example
from glauber.core.schedule import GlauberSchedule
from glauber.eval.peak_memory import estimate_training_memory
from glauber.nn.ddit import DDiT, ModelConfig

SUITES = ("throughput", "overhead", "sampling", "memory", "gpu")
MEMORY_CONFIGS = ["experiments/owt.yaml", "experiments/owt_small.yaml", "experiments/celeba_hq.yaml"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training and sampling speed, framework overhead and peak memory",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="throughput",
        help="what to measure (default throughput; see above). make bench-gpu runs --suite gpu",
    )
    p.add_argument(
        "--size", default="small", help="throughput/sampling: model size, one of tiny, demo, small, medium (default small)"
    )
    p.add_argument("--seq-len", type=int, default=1024, help="throughput/sampling/gpu: sequence length L (default 1024)")
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="vocabulary size V (default 50257, GPT-2; memory: by each config's tokenizer)",
    )
    p.add_argument("--batch", type=int, default=32, help="throughput/sampling/gpu: sequences per step or call (default 32)")
    p.add_argument(
        "--positions-per-step",
        type=int,
        nargs="+",
        default=[1],
        metavar="M",
        help="throughput: hidden positions per sequence in training, one row each (default 1)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per row or run (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5; compile needs more)")
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="both",
        help="torch.compile the network: off, on or both (default both); a failed compile is reported as "
        "'skipped: why', never a crash",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="sampling/gpu: also time the sampler's network call compiled with mode=reduce-overhead "
        "(CUDA graphs; CUDA only, reported as skipped elsewhere)",
    )
    p.add_argument(
        "--compile-on-cpu",
        action="store_true",
        help="gpu: time the compiled rows even in the tiny CPU run (slow: minutes of compilation)",
    )
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument(
        "--config",
        nargs="+",
        default=None,
        metavar="YAML",
        help="overhead: the config to train (default experiments/shakespeare.yaml); sampling/gpu: the config "
        "whose method and schedule are used (default experiments/owt.yaml); memory: the configs to estimate "
        "(default owt, owt_small, celeba_hq)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides applied to every --config (e.g. --set train.micro_batch_size=16)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="overhead: training runs (Lightning with its bare twin in lockstep) and sampler run pairs (default 3)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="overhead: PyTorch CPU threads (default 1: steadier on a shared machine)"
    )
    p.add_argument(
        "--sample-batch",
        type=int,
        default=None,
        help="overhead: sequences drawn at once by the sampler (default: the config's global batch)",
    )
    p.add_argument(
        "--sample-calls",
        type=int,
        default=64,
        help="sampling/gpu: network calls timed; the time of all T calls is extrapolated from them (default 64)",
    )
    p.add_argument("--tiny", action="store_true", help="gpu: the tiny stand-in run even on a GPU (make bench-gpu TINY=1)")
    p.add_argument(
        "--out",
        default="runs/bench-gpu",
        help="gpu: folder for bench_gpu.json and bench_gpu.md (default runs/bench-gpu)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(
    size: str, L: int, V: int, B: int, m: int, steps: int, warmup: int, compiled: bool, bf16: bool, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DDiT(ModelConfig(size=size, dropout=0.0), V).to(device)
    row: dict[str, Any] = {"size": size, "L": L, "V": V, "batch": B, "m": m, "compile": compiled}
    row["precision"] = "bf16" if bf16 else "fp32"
    row["params_M"] = round(model.num_parameters() / 1e6, 1)
    if compiled:
        try:
            model.compile()
        except Exception as e:  # noqa: BLE001 - reported as a skipped row, never a crash
            return {**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
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
    try:
        for _ in range(warmup):
            train_step()
    except Exception as e:  # noqa: BLE001 - a compile failure shows at the first call: a skipped row
        if not compiled:
            raise
        return {**row, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
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
        **row,
        "train_tokens_per_s": round(B * L / train_s),
        "train_step_ms": round(1000 * train_s, 2),
        "nfe_ms": round(1000 * nfe_s, 2),
        "sample_seqs_per_s_K4": round(B / (nfe_s * 4 * L / m), 4),
        "peak_train_GiB": round(peak_train, 2),
    }


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def run_throughput(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for m in args.positions_per_step:
        for compiled in modes:
            say(f"throughput: size {args.size}, m = {m}, compile {'on' if compiled else 'off'} ...")
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
    return rows


def run_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for path in args.config or MEMORY_CONFIGS:
        say(f"memory: {path} (dry run on fake tensors) ...")
        estimate = estimate_training_memory(load_config(path, args.overrides), Path(path).name, args.vocab)
        rows.append(estimate.row())
    return rows


COLUMNS = {
    "throughput": (
        "size params_M L batch m compile precision train_tokens_per_s nfe_ms sample_seqs_per_s_K4 peak_train_GiB skipped"
    ).split(),
    "overhead": ["what", "framework_ms", "bare_ms", "ratio", "overhead_pct", "in_run_ratio"],
    "sampling": ["target", "compile", "call_ms", "measured_calls", "T", "sample_s_T", "samples_per_s", "skipped"],
    "memory": (
        "name params_M micro_batch accumulate precision weights_GiB grads_GiB optimizer_GiB ema_GiB activations_GiB "
        "peak_GiB ddp_buckets_GiB sampling_peak_GiB"
    ).split(),
}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(device_of(args))
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.sample_calls < 1:
        raise ValueError("--steps, --repeats and --sample-calls must be >= 1 and --warmup >= 0")
    if args.suite != "memory":
        args.vocab = args.vocab or 50257
    if args.suite == "gpu":
        report = run_gpu_suite(args)
        js, md = write_gpu_report(report, Path(args.out))
        print(md.read_text())
        print(f"wrote {js} and {md}" + (" (TINY stand-in run)" if report["tiny"] else ""))
        return report["rows"]
    if args.suite == "throughput":
        rows = run_throughput(args, device)
    elif args.suite == "overhead":
        rows = run_overhead(args)
    elif args.suite == "sampling":
        modes = {"off": ["off"], "on": ["default"], "both": ["off", "default"]}[args.compile]
        rows = run_sampling_suite(args, modes + (["reduce-overhead"] if args.cuda_graphs else []))
    else:
        rows = run_memory(args)
    where = "CPU only (fake tensors)" if args.suite == "memory" else device_name(device)
    print(f"\nsuite {args.suite}; device: {where}; torch {torch.__version__}\n")
    print(markdown_table(rows, COLUMNS[args.suite]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"suite": args.suite, "device": where, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows
