"""Training callbacks: throughput in the progress bar, text samples and noise-level plots at validation."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from glauber.inference import format_samples
from glauber.plots import plot_loss_by_noise


class Throughput(Callback):
    """Logs ``train/tokens_per_s`` (all processes together) averaged over the last ``window`` batches."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[float] = []
        self._tokens = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._tokens = batch.numel() * trainer.world_size
        self._times.append(time.perf_counter())
        self._times = self._times[-(self.window + 1) :]
        if len(self._times) > 1:
            rate = self._tokens * (len(self._times) - 1) / (self._times[-1] - self._times[0])
            pl_module.log("train/tokens_per_s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)


class ValidationSamples(Callback):
    """At each validation, rank 0 draws a few samples with the EMA weights, decodes them and writes
    ``<run_dir>/samples/step_XXXXXXXX.txt`` (also logged as TensorBoard text)."""

    def __init__(self, run_dir: str | Path, num_samples: int, sample_options: dict[str, Any]) -> None:
        self.dir = Path(run_dir) / "samples"
        self.num_samples, self.options = num_samples, sample_options

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_samples < 1 or not trainer.is_global_zero:
            return
        gen = torch.Generator(device=pl_module.device).manual_seed(pl_module.cfg.train.seed + 12345)
        ids = pl_module.sample(self.num_samples, generator=gen, **self.options)
        dm = trainer.datamodule
        texts = [dm.decode(row.tolist()) for row in ids.cpu()]
        self.dir.mkdir(parents=True, exist_ok=True)
        body = format_samples(texts)
        (self.dir / f"step_{trainer.global_step:08d}.txt").write_text(body)
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):
                exp.add_text("samples", "\n\n".join(f"    {t}".replace("\n", "\n    ") for t in texts), trainer.global_step)


class GenerativePerplexityEval(Callback):
    """Every ``every_steps`` optimizer steps, rank 0 samples with the EMA weights and logs the judge's
    ``eval/gen_ppl``, ``eval/gen_ppl_per_seq`` and ``eval/entropy`` (also appended to ``eval/gen_ppl.jsonl``)."""

    def __init__(
        self, run_dir: str | Path, judge: str, every_steps: int, num_samples: int, sample_options: dict[str, Any]
    ) -> None:
        self.out = Path(run_dir) / "eval" / "gen_ppl.jsonl"
        self.judge_name, self.every, self.num, self.options = judge, every_steps, num_samples, sample_options
        self._last = -1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last or not trainer.is_global_zero:
            return
        self._last = step
        import json

        from glauber.judges import evaluate_texts, load_judge

        judge = load_judge(self.judge_name, str(pl_module.device))
        gen = torch.Generator(device=pl_module.device).manual_seed(pl_module.cfg.train.seed + 999)
        ids = pl_module.sample(self.num, generator=gen, **{**self.options, "float64": True})
        dm = trainer.datamodule
        report = evaluate_texts([dm.decode(r.tolist()) for r in ids.cpu()], judge, sample_ids=ids.cpu())
        metrics = {
            "eval/gen_ppl": report["gen_ppl"],
            "eval/gen_ppl_per_seq": report["gen_ppl_per_seq"],
            "eval/entropy": report["unigram_entropy"],
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as f:
            f.write(json.dumps({"step": step, **report}) + "\n")


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
