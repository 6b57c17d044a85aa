"""``glauber train-vq``: the config, held-out split and outputs of training a small VQ image tokenizer (the loss is
``VQTrainModule``'s): ``vq.ckpt``, ``recon.png``, ``metrics.csv``, ``config.yaml`` and ``summary.json`` in ``run_dir``."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from data_modules.images import load_images
from glauber.config import LrSchedule, merge_typed, read_config
from glauber.eval.images import fill_rows, save_grid
from glauber.nn.vq_checkpoint import save_vq
from glauber.nn.vq_config import VQConfig
from glauber.training.train import cpu_threads
from glauber.training.vq_module import VQTrainModule


@dataclass
class VQTrainConfig:
    """The keys of a ``glauber train-vq`` config. data: a ``.npz`` of ``images`` uint8 [N, H, W, 3] or an image folder.
    image_size: None = ``vq.resolution`` (must equal it). codebook_ema: 0 = the codebook learns by its loss, else EMA
    updates with this decay. dead_code_every: re-seed codes unused for this many steps (0: never, after step 0)."""

    name: str = "vq"
    vq: VQConfig = field(default_factory=VQConfig)
    data: str = "data/twemoji32.npz"
    image_size: int | None = None
    center_crop: bool = True
    hflip: bool = False
    val_fraction: float = 0.05
    batch_size: int = 64
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: LrSchedule = LrSchedule.cosine
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_steps: int = 2000
    l1_weight: float = 1.0
    mse_weight: float = 0.0
    beta: float = 0.25
    codebook_ema: float = 0.0
    dead_code_every: int = 100
    seed: int = 0
    run_dir: str = "runs/vq"
    accelerator: str = "auto"
    devices: Any = 1
    precision: str = "32-true"
    val_every_steps: int = 500
    log_every_steps: int = 25
    num_recon: int = 16
    num_workers: int = 0
    threads: int = 0  # PyTorch's CPU threads (0: its default); 1 is far faster for tiny models on a small or busy CPU
    progress_bar: bool = True


def load_vq_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge a YAML file (over its ``base:`` files) and ``key=value`` overrides onto ``VQTrainConfig``, then validate."""
    raw, overrides = read_config(path, overrides, "e.g. experiments/vq_emoji.yaml")
    cfg = merge_typed(VQTrainConfig, raw, overrides, "the keys are VQTrainConfig's, in glauber/training/train_vq.py")
    if cfg.image_size is None:
        cfg.image_size = cfg.vq.resolution
    validate_vq_train(cfg)
    return cfg


def validate_vq_train(cfg: DictConfig) -> None:
    vq = VQConfig(**OmegaConf.to_container(cfg.vq, resolve=True)).validate("vq.")
    if cfg.image_size != vq.resolution:
        raise ValueError(
            f"image_size={cfg.image_size} differs from vq.resolution={vq.resolution}: set both "
            "(the resolution places the attention blocks)"
        )
    checks = [
        ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("lr", cfg.lr > 0, "> 0"),
        ("max_steps", cfg.max_steps >= 1, ">= 1"),
        ("val_fraction", 0 < cfg.val_fraction < 1, "in (0, 1)"),
        ("dead_code_every", cfg.dead_code_every >= 0, ">= 0 (0: off)"),
        ("codebook_ema", 0 <= cfg.codebook_ema < 1, "in [0, 1) (0: codebook loss)"),
        ("beta", cfg.beta >= 0, ">= 0"),
        ("l1_weight", cfg.l1_weight >= 0, ">= 0"),
        ("mse_weight", cfg.mse_weight >= 0, ">= 0"),
        ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
        ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
        ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0: off)"),
        ("val_every_steps", cfg.val_every_steps >= 1, ">= 1"),
        ("log_every_steps", cfg.log_every_steps >= 1, ">= 1"),
        ("num_recon", cfg.num_recon >= 0, ">= 0"),
        ("threads", cfg.threads >= 0, ">= 0 (0: PyTorch's default)"),
        ("betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
    ]
    for key, ok, what in checks:
        if not ok:
            raise ValueError(f"{key} must be {what} (got {cfg[key]!r})")
    if cfg.l1_weight + cfg.mse_weight <= 0:
        raise ValueError("l1_weight and mse_weight are both 0: no reconstruction loss")


def load_image_array(cfg: DictConfig) -> np.ndarray:
    """uint8 [N, image_size, image_size, 3] from ``cfg.data`` (``data_modules.images.load_images``)."""
    try:
        return load_images(str(cfg.data), cfg.image_size, center_crop=cfg.center_crop)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data={cfg.data} (the train-vq key is `data`): {e}") from None


def split_images(images: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split into (train, held-out), at least one image each; held-out in random order, so the
    first ones (in recon.png) are a fair sample."""
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 images to hold some out (got {n})")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return images[np.sort(perm[n_val:])], images[perm[:n_val]]


class VQArtifacts(Callback):
    """After every validation, rank 0 writes ``vq.ckpt`` (atomically) and ``recon.png`` to the run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: VQTrainModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        stats = pl_module.val_stats
        save_vq(
            self.run_dir / "vq.ckpt",
            pl_module.model,
            train_config=OmegaConf.to_container(pl_module.cfg, resolve=True, enum_to_str=True),
            codebook_usage=stats.get("codebook_usage"),
            image_size=int(pl_module.cfg.image_size),
            step=trainer.global_step,
            val_metrics={k: v for k, v in stats.items() if k.startswith("val/")},
        )
        if pl_module.recon_pair is not None:  # rows of 16 originals, each followed by their reconstructions, ~64 px
            orig, rec = (t.numpy() for t in pl_module.recon_pair)
            rows = [r for k in range(0, len(orig), 16) for r in (orig[k : k + 16], rec[k : k + 16])]
            scale = max(1, 64 // max(orig.shape[1:3]))
            save_grid(fill_rows(rows), self.run_dir / "recon.png", ncol=len(rows[0]), scale=scale)


def train_vq(cfg: DictConfig) -> Path:
    """Fit a VQ tokenizer as configured; returns the run directory (holding vq.ckpt, recon.png, metrics.csv)."""
    with cpu_threads(cfg.threads):
        run_dir = Path(cfg.run_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        train_images, val_images = split_images(load_image_array(cfg), cfg.val_fraction, cfg.seed)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        train_loader = torch.utils.data.DataLoader(
            torch.from_numpy(train_images),  # a tensor is a map-style dataset of its rows
            batch_size=min(cfg.batch_size, len(train_images)),
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(cfg.seed),
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
        )
        val_loader = torch.utils.data.DataLoader(torch.from_numpy(val_images), batch_size=max(cfg.batch_size, cfg.num_recon))
        module = VQTrainModule(cfg)
        trainer = L.Trainer(
            default_root_dir=str(run_dir),
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            precision=cfg.precision,
            max_steps=cfg.max_steps,
            val_check_interval=cfg.val_every_steps,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            log_every_n_steps=cfg.log_every_steps,
            enable_progress_bar=cfg.progress_bar,
            enable_checkpointing=False,
            enable_model_summary=cfg.progress_bar,
            gradient_clip_val=cfg.grad_clip or None,
            logger=CSVLogger(str(run_dir), name="", version=""),
            callbacks=[VQArtifacts(run_dir)],
        )
        print(
            f"train-vq: {len(train_images)} train / {len(val_images)} held-out images of {cfg.image_size}px -> "
            f"{module.model.grid_shape[0]}x{module.model.grid_shape[1]} tokens, codebook {cfg.vq.n_embed}, "
            f"{sum(p.numel() for p in module.model.parameters()) / 1e6:.2f}M parameters"
        )
        # metrics.csv sits beside config.yaml (and replaces that of an earlier run): not worth a warning
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        t0 = time.perf_counter()
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
        train_s = time.perf_counter() - t0
        trainer.validate(module, dataloaders=val_loader, verbose=False)  # final numbers, vq.ckpt and recon.png
        if trainer.is_global_zero:
            s, u = module.val_stats, module.val_stats["codebook_usage"]
            summary = {
                "steps": trainer.global_step,
                "train_s": round(train_s, 1),
                "val_mse": s["val/mse"],
                "val_psnr_db": s["val/psnr"],
                "codebook_size": cfg.vq.n_embed,
                "codebook_perplexity": u["perplexity"],
                "codes_used_fraction": u["used_fraction"],
            }
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            print(
                f"train-vq: {trainer.global_step} steps in {train_s:.0f} s; held-out MSE {s['val/mse']:.4f} ([-1, 1] pixels), "
                f"PSNR {s['val/psnr']:.2f} dB, codebook perplexity {u['perplexity']:.1f}, "
                f"{100 * u['used_fraction']:.1f}% of codes used"
            )
        return run_dir
