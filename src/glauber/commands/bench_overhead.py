"""``glauber bench --suite overhead``: what the framework adds on top of the arithmetic.

Training: the real ``GGMModule`` fitted by the ``lightning.Trainer`` that ``glauber train`` builds
(``build_trainer``: its checkpoint, throughput, sample and plot callbacks, the CSV/TensorBoard loggers, and the
run-info, signal and divergence guards ``train`` adds), against a bare PyTorch loop over the same DataModule's
batches, the same module's ``compute_loss``, gradient clipping, AdamW + learning-rate schedule and EMA update.
A step's time is the time between the starts of consecutive batches (data loading and every hook included).
The bare loop runs in lockstep with Lightning's (``BareTwin``: one bare step at the end of each Lightning step,
timed and taken off that step's interval), so a busy neighbour slows both alike; the medians of the per-step
times after the warm-up steps are compared, and the median of the per-step ratios.

Sampling: ``glauber_sample`` with the module's denoiser (the sampler of ``glauber sample``) against the same
number of bare network calls on inputs of the same shapes, prepared in advance, in alternating runs; and,
within each sampler run, its total time against the time spent inside its network calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from glauber.config import batch_layout, load_config
from glauber.core.sampler import glauber_sample
from glauber.methods import method_class
from glauber.training.callbacks import RunInfo
from glauber.training.guards import DivergenceGuard, StopOnSignal
from glauber.training.train import build_datamodule, build_trainer


def say(message: str) -> None:
    print(f"[glauber bench] {message}", file=sys.stderr, flush=True)


def overhead_config(path: str, overrides: list[str], steps: int, run_dir: Path) -> DictConfig:
    """The config as ``glauber train`` would run it, for ``steps`` optimizer steps in ``run_dir``: validation and
    checkpoints only after the last step (outside the timing), no progress bar (the bench reports progress)."""
    return load_config(
        path,
        [
            *overrides,
            f"train.run_dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.val_every_steps={steps}",
            f"train.ckpt_every_steps={steps}",
            "train.val_batches=1",
            "train.max_time=null",
            "train.resume=never",
            "train.progress_bar=false",
            "eval.judge=null",
            "sample.num_samples=1",
        ],
    )


class BareTwin(Callback):
    """Runs one bare optimizer step, on its own copy of the module and its own DataModule, at the end of every
    Lightning step, and times it: the two loops advance in lockstep, so a busy neighbour slows both alike."""

    def __init__(self, cfg: DictConfig) -> None:
        self.starts: list[float] = []
        self.bare: list[tuple[int, float]] = []
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        per_device, self.accumulate = batch_layout(cfg.train.global_batch_size, 1, cfg.train.micro_batch_size)
        dm = build_datamodule(cfg, per_device, self.accumulate)
        dm.prepare_data()
        dm.setup("fit")
        self.vocab = dm.vocab_size
        self.module = method_class(cfg.method)(OmegaConf.to_container(cfg, resolve=True), vocab_size=dm.vocab_size)
        self.module.train()
        optim = self.module.configure_optimizers()
        self.opt, self.sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
        self.params = list(self.module.model.parameters())
        self.clip = cfg.optim.grad_clip
        self.batches = iter(dm.train_dataloader())
        self.micro = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int) -> None:
        if (i + 1) % self.accumulate == 0:
            t0 = time.perf_counter()
            with torch.enable_grad():
                self.step()
            self.bare.append((len(self.starts) - 1, time.perf_counter() - t0))

    def step(self) -> None:
        """One optimizer step of the plain loop: the same calls as Lightning makes, without Lightning."""
        m = self.module
        for _ in range(self.accumulate):
            batch = next(self.batches)
            m.on_train_batch_start(batch, self.micro)
            loss, _ = m.compute_loss(batch, m.step_generator())
            (loss / self.accumulate).backward()
            self.micro += 1
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if m.ema is not None:
            m.ema.update(m.model)


def paired_steps(cfg: DictConfig) -> tuple[list[float], list[float], int]:
    """Per-step seconds of ``Trainer.fit`` as ``glauber train`` sets it up (single process) and of the bare
    loop run in lockstep with it; the vocabulary size."""
    run_dir = Path(cfg.train.run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    per_device, accumulate = batch_layout(cfg.train.global_batch_size, 1, cfg.train.micro_batch_size)
    twin = BareTwin(cfg)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg, per_device, accumulate)
    guards = [RunInfo(run_dir, None, per_device, accumulate), StopOnSignal(run_dir / "checkpoints" / "last.ckpt")]
    trainer = build_trainer(cfg, run_dir, accumulate, [*guards, DivergenceGuard(cfg.optim.lr), twin])
    module = method_class(cfg.method)(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=dm)
    starts, bare = twin.starts[::accumulate], dict(twin.bare)
    lightning, plain = [], []
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        idx = k * accumulate + accumulate - 1
        if idx in bare:  # the step's interval holds its bare twin: take it off
            lightning.append(b - a - bare[idx])
            plain.append(bare[idx])
    return lightning, plain, twin.vocab


def sampler_times(cfg: DictConfig, V: int, batch: int, repeats: int) -> dict[str, Any]:
    """Seconds of one ``glauber_sample`` run and of the same number of bare network calls (medians)."""
    L.seed_everything(cfg.train.seed, verbose=False)
    module = method_class(cfg.method)(OmegaConf.to_container(cfg, resolve=True), vocab_size=V)
    module.eval()
    opts = {"temperature": cfg.sample.temperature, "top_p": cfg.sample.top_p, "float64": cfg.sample.float64}
    sched = module.schedule(cfg.sample.positions_per_step)
    law = module.law_on(torch.device("cpu"))
    denoiser = module.denoiser(sched)
    T = sched.num_steps
    inputs = []
    for t in range(T - 1, -1, -1):
        t_vec = torch.full((batch,), t, dtype=torch.long)
        pos, _ = sched.hidden_set(t_vec)
        x_in = torch.randint(0, V, (batch, sched.seq_len)).scatter_(1, pos, V)
        inputs.append((x_in, pos, (t_vec.float() + 1) / T, module.signal_levels(sched, t_vec)))

    inside: list[float] = []  # seconds spent in the network calls of each sampler run

    def timed(x_in: torch.Tensor, hidden: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        h = denoiser(x_in, hidden, t)
        inside[-1] += time.perf_counter() - t0
        return h

    timed.takes_positions = True  # type: ignore[attr-defined]

    def sample() -> None:
        inside.append(0.0)
        glauber_sample(timed, sched, law, batch, generator=torch.Generator().manual_seed(0), **opts)

    def bare() -> None:
        with torch.no_grad():
            for x_in, pos, time_frac, alpha in inputs:
                module.model(x_in, pos, time_frac, alpha)

    sample(), bare()  # warm-up
    runs: dict[str, list[float]] = {"sampler": [], "bare": []}
    for r in range(repeats):
        for name, fn in (("sampler", sample), ("bare", bare)):
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
        say(f"sampler overhead: repeat {r + 1}/{repeats}: sampler {runs['sampler'][-1]:.3f} s, bare {runs['bare'][-1]:.3f} s")
    s, b = statistics.median(runs["sampler"]), statistics.median(runs["bare"])
    split = statistics.median(total / net for total, net in zip(runs["sampler"], inside[1:]))
    return {
        "what": f"sampler, {T} network calls, batch {batch}, m = {sched.m}",
        "framework_ms": round(1000 * s / T, 3),
        "bare_ms": round(1000 * b / T, 3),
        "ratio": round(s / b, 4),
        "overhead_pct": round(100 * (s / b - 1), 2),
        "in_run_ratio": round(split, 4),
        "runs": {k: [round(x, 4) for x in v] for k, v in runs.items()},
    }


def run_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The training and sampling rows of the overhead table."""
    config = args.config[0] if args.config else "experiments/shakespeare.yaml"
    torch.set_num_threads(args.threads)
    steps = args.warmup + args.steps + 1
    per_step: dict[str, list[float]] = {"lightning": [], "bare": []}
    medians: dict[str, list[float]] = {"lightning": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="glauber-bench-") as tmp:
        for r in range(args.repeats):
            cfg = overhead_config(config, args.overrides, steps, Path(tmp) / f"run{r}")
            lightning, bare, vocab = paired_steps(cfg)
            for name, times in (("lightning", lightning), ("bare", bare)):
                times = times[args.warmup :][: args.steps]
                per_step[name] += times
                medians[name].append(statistics.median(times))
            say(
                f"training overhead: run {r + 1}/{args.repeats}: median ms/step Lightning "
                f"{1000 * medians['lightning'][-1]:.1f}, bare {1000 * medians['bare'][-1]:.1f}"
            )
    lt, bt = statistics.median(per_step["lightning"]), statistics.median(per_step["bare"])
    train_row = {
        "what": f"training step ({Path(config).name}: batch {cfg.train.global_batch_size} x L {cfg.data.seq_len})",
        "framework_ms": round(1000 * lt, 3),
        "bare_ms": round(1000 * bt, 3),
        "ratio": round(lt / bt, 4),
        "overhead_pct": round(100 * (lt / bt - 1), 2),
        "in_run_ratio": round(statistics.median(a / b for a, b in zip(per_step["lightning"], per_step["bare"])), 4),
        "runs": {k: [round(1000 * x, 2) for x in v] for k, v in medians.items()},
    }
    sample_row = sampler_times(cfg, vocab, args.sample_batch or cfg.train.global_batch_size, args.repeats)
    return [train_row, sample_row]
