"""Build the DataModule, LightningModule and Trainer from a config and fit, the same on one process, several local GPUs,
``torchrun`` or ``srun`` (every process calls ``train``; rank 0 alone writes files). A run never loses work: rank 0 holds
the run lock, a restart resumes from the newest checkpoint that loads, old files are moved aside (docs/RELIABILITY.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from data_modules.images import ImageTokenDataModule
from data_modules.text import TextDataModule
from glauber.config import batch_layout, sample_options
from glauber.eval.plots import merge_metric_logs, plot_loss_curves
from glauber.files import AtomicCheckpointIO, atomic_write, remove_partial_files
from glauber.methods import method_class
from glauber.training.callbacks import GenerativePerplexityEval, LossByNoisePlot, RunInfo, Throughput, ValidationSamples
from glauber.training.checkpoint import (
    CheckpointScan,
    check_compatible,
    load_lazily,
    move_aside,
    run_history,
    run_lock,
    scan_checkpoints,
)
from glauber.training.guards import DivergenceGuard, SlurmRequeue, StopOnSignal, say
from glauber.training.image_callbacks import image_callbacks


def world_size(cfg: DictConfig) -> int:
    """Processes in the run: devices per node x nodes (``auto`` devices = visible GPUs, or 1 on CPU)."""
    devices = cfg.train.devices
    if devices in ("auto", -1, "-1"):
        devices = (torch.cuda.device_count() if cfg.train.accelerator in ("auto", "gpu", "cuda") else 0) or 1
    elif isinstance(devices, str):
        devices = len(devices.split(",")) if "," in devices else int(devices)
    elif not isinstance(devices, int):
        devices = len(devices)
    return int(devices) * int(cfg.train.num_nodes)


def text_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """Decoded text samples written at each validation."""
    return [ValidationSamples(run_dir, cfg.sample.num_samples, sample_options(cfg))]


# What differs between modalities: the DataModule, and what is written at validation (image grids + FID).
MODALITIES = {"text": (TextDataModule, text_callbacks), "image": (ImageTokenDataModule, image_callbacks)}


def build_datamodule(cfg: DictConfig, per_device: int, accumulate: int) -> L.LightningDataModule:
    datamodule = MODALITIES[cfg.get("modality", "text")][0]
    return datamodule(
        OmegaConf.to_object(cfg.data), batch_size=per_device, max_train_samples=cfg.train.max_steps * accumulate * per_device
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    for name in cfg.train.loggers:
        if name == "csv":
            loggers.append(CSVLogger(str(run_dir), name="logs"))  # logs/version_N/ per start; see merge_metric_logs
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
        *MODALITIES[cfg.get("modality", "text")][1](cfg, run_dir),
        LossByNoisePlot(run_dir),
        *(extra_callbacks or []),
    ]
    if cfg.eval.judge:
        callbacks.append(
            GenerativePerplexityEval(run_dir, cfg.eval.judge, cfg.eval.every_steps, cfg.eval.num_samples, sample_options(cfg))
        )
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # SIGUSR1 is SlurmRequeue's, at step boundaries
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


def resume_path(cfg: DictConfig, run_dir: Path, scan: CheckpointScan | None = None) -> Path | None:
    """The checkpoint to continue from: ``auto`` = ``scan``'s newest that loads (None on a first start: never
    Lightning's ``"hpc"``, which fails when there is none); ``never`` = None; else the given path, which must load."""
    mode = cfg.train.resume
    if mode == "never":
        if SLURMEnvironment.detect() and any(run_dir.glob("hpc_ckpt_*.ckpt")):
            raise ValueError(
                f"train.resume=never, but {run_dir} holds SLURM hpc_ckpt_*.ckpt files that Lightning would resume "
                "from by itself: use a new train.run_dir, or move them out of it"
            )
        return None
    if mode == "auto":
        scan = scan or scan_checkpoints(run_dir)
        if scan.newest is None and scan.unreadable:
            raise ValueError(
                f"no checkpoint in {run_dir} loads ({'; '.join(scan.unreadable.values())}); resume from another "
                "with train.resume=PATH, or start over with train.resume=never (the old files are moved to previous/)"
            )
        return scan.newest
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume={mode}: no such checkpoint (use auto, never or a .ckpt path)")
    load_lazily(path)  # a clear error now rather than a reader's traceback inside fit
    return path


def prepare_run_dir(cfg: DictConfig, run_dir: Path, ckpt: Path | None, scan: CheckpointScan | None) -> None:
    """Rank 0, holding the lock, the run about to start: delete partial files of killed writes, move aside what
    this run must not continue (an earlier run's files, checkpoints that do not load), write config.yaml."""
    removed = remove_partial_files(run_dir, run_dir / "checkpoints")
    if removed:
        say(f"deleted {len(removed)} partial file(s) left by a killed checkpoint write: {', '.join(p.name for p in removed)}")
    if ckpt is not None and scan is not None:
        say(scan.explain())
    if ckpt is None:
        old, what = run_history(run_dir), "the earlier run's files"
    else:
        old, what = list(scan.unreadable) if scan else [], "the checkpoints that do not load"
    if old:
        dest = move_aside(run_dir, old)
        say(f"moved {what} ({', '.join(p.name for p in old)}) to {dest}")
    legacy = run_dir / "logs" / "metrics.csv"  # a run logged before logs/version_N/: its log becomes version 0
    if ckpt is not None and legacy.is_file() and not any(legacy.parent.glob("version_*")):
        (legacy.parent / "version_0").mkdir()
        os.replace(legacy, legacy.parent / "version_0" / "metrics.csv")
    atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(cfg).encode()))


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
    """Fit a model as configured; returns the run directory. Raises ``SystemExit(128 + signal)`` after a
    SIGINT/SIGTERM stop (``last.ckpt`` saved), ``TrainingDiverged`` on a non-finite loss or weights."""
    run_dir = Path(cfg.train.run_dir)
    with cpu_threads(cfg.train.threads):
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        per_device, accumulate = batch_layout(cfg.train.global_batch_size, world_size(cfg), cfg.train.micro_batch_size)
        scan = scan_checkpoints(run_dir) if cfg.train.resume == "auto" else None
        ckpt = resume_path(cfg, run_dir, scan)
        container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        if ckpt is not None:
            check_compatible(ckpt, container)
        dm = build_datamodule(cfg, per_device, accumulate)
        dm.check_available()  # on every process: missing data stops all of them here, none waits for an exited peer
        stop = StopOnSignal(run_dir / "checkpoints" / "last.ckpt")
        guards = [RunInfo(run_dir, ckpt, per_device, accumulate), stop, DivergenceGuard(cfg.optim.lr)]
        trainer = build_trainer(cfg, run_dir, accumulate, [*guards, *(extra_callbacks or [])])
        # the rank is known before fit under srun, torchrun and Lightning's own launcher
        with run_lock(run_dir, owner=trainer.is_global_zero):
            module = method_class(cfg.method)(container)
            if trainer.is_global_zero:
                prepare_run_dir(cfg, run_dir, ckpt, scan)
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
            if trainer.is_global_zero and merge_metric_logs(run_dir / "logs"):
                plot_loss_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "loss.png")
        # left to interpreter exit, NCCL/gloo teardown sometimes aborts (exit 134) after a run that finished
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if stop.stopped_by:
            raise SystemExit(128 + stop.stopped_by)
    return run_dir
