"""Training callbacks: throughput, text samples and gen-PPL shared out over DDP ranks, noise-level plots, the run banner."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as LightningThroughput
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from glauber.eval.inference import format_samples
from glauber.eval.judges import evaluate_texts, load_judge
from glauber.eval.plots import START_STEP, plot_loss_by_noise
from glauber.training.guards import hpc_checkpoints, say


class Throughput(Callback):
    """Logs ``train/tokens_per_s`` (all processes), averaged over ``window`` batches. Not Lightning's
    ``ThroughputMonitor``, which syncs the GPU after every batch: the clock is read at each batch start instead."""

    def __init__(self, window: int = 20) -> None:
        self.window = window

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.meter = LightningThroughput(window_size=self.window + 1, world_size=trainer.world_size)
        self._t0, self._batches, self._tokens = time.perf_counter(), 0, 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.meter.update(time=time.perf_counter() - self._t0, batches=self._batches, samples=self._tokens, lengths=self._tokens)
        self._batches, self._tokens = self._batches + 1, self._tokens + batch.numel()
        rate = self.meter.compute().get("items_per_sec")
        if rate is not None:
            pl_module.log("train/tokens_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)


def rank_share(total: int, rank: int, world: int) -> int:
    """How many of ``total`` items rank ``rank`` of ``world`` takes: the first ``total % world`` ranks one more."""
    return total // world + (1 if rank < total % world else 0)


def gather_rows(trainer: L.Trainer, ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ``[n_r, L]`` token ids in rank order, on every rank (CPU); ``n_r`` may differ (or be 0)."""
    ids = ids.detach().cpu()
    if trainer.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ids
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, ids)
    return torch.cat(parts, 0)


def draw_share(pl_module: L.LightningModule, trainer: L.Trainer, total: int, seed: int, options: dict[str, Any]) -> torch.Tensor:
    """This rank's share of ``total`` samples as ``[n_r, L]`` ids, seeded ``seed + rank`` (rank 0 draws what one process does)."""
    n = rank_share(total, trainer.global_rank, trainer.world_size)
    if n == 0:
        return torch.empty(0, pl_module.cfg.data.seq_len, dtype=torch.long, device=pl_module.device)
    gen = torch.Generator(device=pl_module.device).manual_seed(seed + trainer.global_rank)
    return pl_module.sample(n, generator=gen, **options)


class ValidationSamples(Callback):
    """At each validation the ranks draw their shares of ``num_samples`` samples (EMA weights), and rank 0 writes them
    all to ``samples/step_XXXXXXXX.txt`` and TensorBoard; ``last_ids`` keeps the gathered ids (on every rank)."""

    def __init__(self, run_dir: str | Path, num_samples: int, sample_options: dict[str, Any]) -> None:
        self.dir = Path(run_dir) / "samples"
        self.num_samples, self.options = num_samples, sample_options
        self.last_ids: torch.Tensor | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_samples < 1:
            return
        mine = draw_share(pl_module, trainer, self.num_samples, pl_module.cfg.train.seed + 12345, self.options)
        ids = self.last_ids = gather_rows(trainer, mine)  # a collective: every rank gets here
        if not trainer.is_global_zero:
            return
        texts = [trainer.datamodule.decode(row.tolist()) for row in ids]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"step_{trainer.global_step:08d}.txt").write_text(format_samples(texts))
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):
                exp.add_text("samples", "\n\n".join(f"    {t}".replace("\n", "\n    ") for t in texts), trainer.global_step)


class GenerativePerplexityEval(Callback):
    """Every ``every_steps`` optimizer steps the ranks draw and score their shares of ``num_samples`` samples; rank 0 logs
    ``eval/*`` and appends the report to ``eval/gen_ppl.jsonl``. ``last_report`` is the same on every rank."""

    def __init__(
        self, run_dir: str | Path, judge: str, every_steps: int, num_samples: int, sample_options: dict[str, Any]
    ) -> None:
        self.out = Path(run_dir) / "eval" / "gen_ppl.jsonl"
        self.judge_name, self.every, self.num, self.options = judge, every_steps, num_samples, sample_options
        self._last = -1
        self.last_report: dict | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # the same on every rank, so every rank takes part (or none does)
        if step == 0 or step % self.every or step == self._last:
            return
        self._last = step
        judge = load_judge(self.judge_name, str(pl_module.device))
        ids = draw_share(pl_module, trainer, self.num, pl_module.cfg.train.seed + 999, {**self.options, "float64": True})
        texts = [trainer.datamodule.decode(r.tolist()) for r in ids.cpu()]
        report = self.last_report = evaluate_texts(texts, judge, ids, device=pl_module.device, num_samples=self.num)
        if not trainer.is_global_zero:
            return
        keys = ("gen_ppl", "gen_ppl_per_seq", "nll_per_byte", "bits_per_byte", "ppl_per_byte", "unigram_entropy")
        metrics = {f"eval/{k.replace('unigram_', '')}": report[k] for k in keys}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as f:
            f.write(json.dumps({"step": step, **report}) + "\n")


class RunInfo(Callback):
    """At the start of fitting, rank 0 says where the run stands (on stderr), records the start step beside this
    start's CSV metrics (read by ``merge_metric_logs``) and deletes all but the newest SLURM ``hpc_ckpt_*.ckpt``."""

    def __init__(self, run_dir: str | Path, resumed_from: str | Path | None, per_device: int, accumulate: int) -> None:
        self.run_dir, self.resumed_from = Path(run_dir), resumed_from
        self.per_device, self.accumulate = per_device, accumulate

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        where = f"resumed from {self.resumed_from} at" if self.resumed_from else "starting at"
        W = trainer.world_size
        say(
            f"{where} global step {trainer.global_step} of {trainer.max_steps}; "
            f"{trainer.num_nodes} node(s) x {trainer.num_devices} device(s) = {W} process(es); global batch "
            f"{self.per_device * self.accumulate * W} = {self.per_device} per device x {self.accumulate} accumulation x {W}"
        )
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
                (Path(logger.log_dir) / START_STEP).write_text(f"{trainer.global_step}\n")
        for old in hpc_checkpoints(self.run_dir)[:-1]:
            old.unlink(missing_ok=True)


class LossByNoisePlot(Callback):
    """Saves ``<run_dir>/plots/val_loss_by_noise.png`` from the logged ``val/loss_t{k}`` values."""

    def __init__(self, run_dir: str | Path, num_buckets: int = 10) -> None:
        self.out = Path(run_dir) / "plots" / "val_loss_by_noise.png"
        self.num_buckets = num_buckets

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        losses = {k: float(m[f"val/loss_t{k}"]) for k in range(self.num_buckets) if f"val/loss_t{k}" in m}
        if losses:
            plot_loss_by_noise(losses, self.num_buckets, trainer.global_step, self.out)
