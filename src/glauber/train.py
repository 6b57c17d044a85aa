"""Build the DataModule, LightningModule and Trainer from a config, and fit (resuming when asked).

Runs the same way on one process, on several local GPUs (the Trainer launches them), under ``torchrun``
and under SLURM's ``srun`` (one task per GPU; see ``glauber slurm`` and docs/SCALING.md): every process
calls ``train``, rank 0 alone writes files, and the process group is closed at the end.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from data_modules.text import TextDataModule
from glauber.callbacks import (
    GenerativePerplexityEval,
    LossByNoisePlot,
    RunInfo,
    SlurmRequeue,
    Throughput,
    ValidationSamples,
)
from glauber.checkpoint import AtomicCheckpointIO, check_compatible, latest_checkpoint
from glauber.config import batch_layout
from glauber.methods import method_class
from glauber.plots import plot_loss_curves


def world_size(cfg: DictConfig) -> int:
    """Processes in the run: devices per node x nodes (``auto`` devices = visible GPUs, or 1 on CPU)."""
    devices = cfg.train.devices
    if devices in ("auto", -1, "-1"):
        accel = cfg.train.accelerator
        gpus = torch.cuda.device_count() if accel in ("auto", "gpu", "cuda") else 0
        devices = gpus or 1
    elif isinstance(devices, str):
        devices = len(devices.split(",")) if "," in devices else int(devices)
    elif not isinstance(devices, int):
        devices = len(devices)
    return int(devices) * int(cfg.train.num_nodes)


def build_datamodule(cfg: DictConfig, per_device: int, accumulate: int) -> L.LightningDataModule:
    """The text DataModule, or the VQ-token image DataModule for ``modality: image`` configs."""
    max_train = cfg.train.max_steps * accumulate * per_device
    if cfg.get("modality", "text") == "image":
        from data_modules.images import ImageTokenDataModule

        return ImageTokenDataModule(OmegaConf.to_object(cfg.data), batch_size=per_device, max_train_samples=max_train)
    return TextDataModule(OmegaConf.to_object(cfg.data), batch_size=per_device, max_train_samples=max_train)


def sample_callbacks(cfg: DictConfig, run_dir: Path) -> list:
    """What is written at validation: decoded text samples, or decoded image grids (+ FID) for images."""
    if cfg.get("modality", "text") == "image":
        from glauber.image_callbacks import image_callbacks

        return image_callbacks(cfg, run_dir)
    return [ValidationSamples(run_dir, cfg.sample.num_samples, sample_options(cfg))]


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing ``metrics.csv`` is continued (with its columns) rather
    than deleted: a resumed or requeued run keeps the rows from before its checkpoint (``RunInfo`` drops the
    rows logged after it; ``train`` deletes the file when a run starts from scratch)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ContinuingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    for name in cfg.train.loggers:
        if name == "csv":
            loggers.append(ContinuingCSVLogger(str(run_dir), name="logs", version=""))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version="", default_hp_metric=False))
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(project="glauber", name=cfg.name, save_dir=str(run_dir)))
        else:
            raise ValueError(f"train.loggers: unknown logger {name!r} (csv, tensorboard, wandb)")
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path, accumulate: int, extra_callbacks: list | None = None) -> L.Trainer:
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:08d}",
            every_n_train_steps=t.ckpt_every_steps,
            save_top_k=-1,
            save_last=True,
            auto_insert_metric_name=False,
        ),
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1, auto_insert_metric_name=False
        ),
        Throughput(),
        *sample_callbacks(cfg, run_dir),
        LossByNoisePlot(run_dir),
        *(extra_callbacks or []),
    ]
    if cfg.eval.judge:
        callbacks.append(
            GenerativePerplexityEval(run_dir, cfg.eval.judge, cfg.eval.every_steps, cfg.eval.num_samples, sample_options(cfg))
        )
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        # SLURM's SIGUSR1 is handled at step boundaries by SlurmRequeue, not inside Lightning's signal handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(SlurmRequeue(run_dir))
    loggers = build_loggers(cfg, run_dir)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_time=t.max_time,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.optim.grad_clip or None,
        val_check_interval=t.val_every_steps * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_steps,
        enable_progress_bar=t.progress_bar,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=plugins,
        use_distributed_sampler=False,  # our DataModules shard by rank themselves
    )


def sample_options(cfg: DictConfig) -> dict[str, Any]:
    s = cfg.sample
    return {"positions_per_step": s.positions_per_step, "temperature": s.temperature, "top_p": s.top_p, "float64": s.float64}


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: ``auto`` = the newest of ``last.ckpt`` and SLURM's ``hpc_ckpt_*.ckpt``
    (None on a first start: we never pass Lightning's ``"hpc"``, which fails when there is none yet)."""
    mode = cfg.train.resume
    if mode == "never":
        if SLURMEnvironment.detect() and any(run_dir.glob("hpc_ckpt_*.ckpt")):
            # Under SLURM, Lightning itself resumes from these when given no checkpoint: refuse instead.
            raise ValueError(
                f"train.resume=never, but {run_dir} holds SLURM hpc_ckpt_*.ckpt files that Lightning would resume "
                "from by itself: use a new train.run_dir, or delete them"
            )
        return None
    if mode == "auto":
        return latest_checkpoint(run_dir)
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume={mode}: no such checkpoint (use auto, never or a .ckpt path)")
    return path


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """PyTorch's CPU thread count set to ``n`` (0: left alone) inside the block, restored after it, so a
    run called from Python (a test, a notebook) does not change the caller's later arithmetic."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(cfg: DictConfig, extra_callbacks: list | None = None) -> Path:
    """Fit a model as configured; returns the run directory."""
    with cpu_threads(cfg.train.threads):
        return _fit(cfg, extra_callbacks)


def _fit(cfg: DictConfig, extra_callbacks: list | None) -> Path:
    run_dir = Path(cfg.train.run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    per_device, accumulate = batch_layout(cfg.train.global_batch_size, world_size(cfg), cfg.train.micro_batch_size)
    ckpt = resume_path(cfg, run_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    if ckpt is not None:
        check_compatible(ckpt, container)
    dm = build_datamodule(cfg, per_device, accumulate)
    # Every process checks: missing data stops all of them here, in seconds, with what to do (none is left
    # waiting for a peer that has exited).
    dm.check_available()
    callbacks = [RunInfo(run_dir, ckpt, per_device, accumulate), *(extra_callbacks or [])]
    trainer = build_trainer(cfg, run_dir, accumulate, callbacks)
    if trainer.is_global_zero:  # the rank is known before fit under srun, torchrun and Lightning's own launcher
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        if ckpt is None:  # a run from scratch does not continue an older run's metrics
            (run_dir / "logs" / "metrics.csv").unlink(missing_ok=True)
    module = method_class(cfg.method)(container)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
        plot_loss_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "loss.png")
    close_distributed()
    return run_dir


def close_distributed() -> None:
    """Destroy the process group when one was set up: left to interpreter exit, NCCL/gloo teardown sometimes
    aborts (``terminate called without an active exception``, exit 134) after a run that finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
