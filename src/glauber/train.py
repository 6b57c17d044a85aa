"""Build the DataModule, LightningModule and Trainer from a config, and fit (resuming when asked)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from data_modules.text import TextDataModule
from glauber.callbacks import GenerativePerplexityEval, LossByNoisePlot, Throughput, ValidationSamples
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


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    loggers: list[Logger] = []
    for name in cfg.train.loggers:
        if name == "csv":
            loggers.append(CSVLogger(str(run_dir), name="logs", version=""))
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
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # our DataModules shard by rank themselves
    )


def sample_options(cfg: DictConfig) -> dict[str, Any]:
    s = cfg.sample
    return {"positions_per_step": s.positions_per_step, "temperature": s.temperature, "top_p": s.top_p, "float64": s.float64}


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return latest_checkpoint(run_dir)
    path = Path(mode)
    if not path.is_file():
        raise FileNotFoundError(f"train.resume={mode}: no such checkpoint (use auto, never or a .ckpt path)")
    return path


def train(cfg: DictConfig, extra_callbacks: list | None = None) -> Path:
    """Fit a model as configured; returns the run directory."""
    run_dir = Path(cfg.train.run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    per_device, accumulate = batch_layout(cfg.train.global_batch_size, world_size(cfg), cfg.train.micro_batch_size)
    ckpt = resume_path(cfg, run_dir)
    container = OmegaConf.to_container(cfg, resolve=True)
    if ckpt is not None:
        check_compatible(ckpt, container)
    dm = build_datamodule(cfg, per_device, accumulate)
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        dm.check_available()  # missing data stops the run here, in seconds, with what to do
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
    module = method_class(cfg.method)(container)
    trainer = build_trainer(cfg, run_dir, accumulate, extra_callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    if trainer.is_global_zero:
        plot_loss_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "loss.png")
    return run_dir
