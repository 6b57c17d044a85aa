"""Training a small VQ image tokenizer: ``glauber train-vq CONFIG [key=value ...]``.

The configuration (``VQTrainConfig``), the held-out split of the images, and the run's outputs; the loss and
the codebook maintenance are ``glauber.training.vq_module.VQTrainModule``'s. Writes to ``run_dir``:
``vq.ckpt`` (atomic; ``glauber.nn.vq.load_vq`` reads it), ``recon.png`` (held-out originals on top, their
reconstructions below), ``metrics.csv``, ``config.yaml`` and ``summary.json``.
"""

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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from data_modules.images import load_images
from glauber.eval.images import fill_rows, save_grid
from glauber.nn.vq import VQConfig, save_vq
from glauber.training.train import cpu_threads
from glauber.training.vq_module import VQTrainModule


@dataclass
class VQTrainConfig:
    """Training of a VQ image tokenizer (``glauber train-vq``).

    data: a ``.npz`` with ``images`` uint8 [N, H, W, 3] or a folder of images. image_size: side the
        images are brought to (None: ``vq.resolution``; must equal it). val_fraction: held-out share.
    l1_weight, mse_weight: reconstruction loss on [-1, 1] pixels. beta: commitment weight.
    codebook_ema: 0 = the codebook learns from the codebook loss (AdamW); in (0, 1) = EMA codebook
        updates with that decay. dead_code_every: every N steps re-seed the codes unused for N steps
        (0: never, the first-batch initialisation still happens).
    lr_schedule: constant | cosine (after ``warmup_steps``, down to ``min_lr_ratio * lr``).
    """

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
    lr_schedule: str = "cosine"
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
    threads: int = 0  # CPU threads of PyTorch (0: its default); 1 is far faster for tiny models on a small or busy CPU
    progress_bar: bool = True


# -- configuration ----------------------------------------------------------------------------------------
def load_vq_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Merge a YAML file and ``key=value`` overrides onto the typed defaults, then validate (errors name the key)."""
    cfg = OmegaConf.structured(VQTrainConfig)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} not found; e.g. experiments/vq_emoji.yaml")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"overrides must look like key=value (got {bad})")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except (ConfigKeyError, ConfigAttributeError) as e:
        raise ValueError(f"unknown config key {e.full_key!r}: {e.msg.splitlines()[0]}") from None
    except ValidationError as e:
        raise ValueError(f"bad value for config key {e.full_key!r}: {e.msg.splitlines()[0]}") from None
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
        ("lr_schedule", cfg.lr_schedule in ("constant", "cosine"), "constant or cosine"),
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


# -- data -------------------------------------------------------------------------------------------------
def load_image_array(cfg: DictConfig) -> np.ndarray:
    """uint8 [N, image_size, image_size, 3] from ``cfg.data`` (``data_modules.images.load_images``)."""
    try:
        return load_images(str(cfg.data), cfg.image_size, center_crop=cfg.center_crop)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data={cfg.data} (the train-vq key is `data`): {e}") from None


def split_images(images: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split into (train, held-out); at least one image each. The held-out images stay in
    random order, so the first ones (shown in recon.png) are a fair sample."""
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 images to hold some out (got {n})")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return images[np.sort(perm[n_val:])], images[perm[:n_val]]


# -- outputs ------------------------------------------------------------------------------------------------
def save_recon_grid(originals: np.ndarray, recons: np.ndarray, path: Path, cols: int = 16) -> None:
    """uint8 ``[N, H, W, 3]`` images as rows of originals, each followed by the row of their reconstructions,
    enlarged to about 64 px."""
    rows = [r for k in range(0, len(originals), cols) for r in (originals[k : k + cols], recons[k : k + cols])]
    save_grid(fill_rows(rows), path, ncol=len(rows[0]), scale=max(1, 64 // max(originals.shape[1:3])))


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
            train_config=OmegaConf.to_container(pl_module.cfg, resolve=True),
            codebook_usage=stats.get("codebook_usage"),
            image_size=int(pl_module.cfg.image_size),
            step=trainer.global_step,
            val_metrics={k: v for k, v in stats.items() if k.startswith("val/")},
        )
        if pl_module.recon_pair is not None:
            orig, rec = pl_module.recon_pair
            save_recon_grid(orig.numpy(), rec.numpy(), self.run_dir / "recon.png")


# -- the command ----------------------------------------------------------------------------------------------
def train_vq(cfg: DictConfig) -> Path:
    """Fit a VQ tokenizer as configured; returns the run directory (holding vq.ckpt, recon.png, metrics.csv)."""
    with cpu_threads(cfg.threads):
        return _fit_vq(cfg)


def _fit_vq(cfg: DictConfig) -> Path:
    from lightning.pytorch.loggers import CSVLogger

    run_dir = Path(cfg.run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    images = load_image_array(cfg)
    train_images, val_images = split_images(images, cfg.val_fraction, cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = torch.utils.data.DataLoader(
        torch.from_numpy(train_images),  # a tensor is a map-style dataset of its rows
        batch_size=min(cfg.batch_size, len(train_images)),
        shuffle=True,
        drop_last=True,
        generator=gen,
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
    n_params = sum(p.numel() for p in module.model.parameters())
    print(
        f"train-vq: {len(train_images)} train / {len(val_images)} held-out images of {cfg.image_size}px -> "
        f"{module.model.grid_shape[0]}x{module.model.grid_shape[1]} tokens, codebook {cfg.vq.n_embed}, "
        f"{n_params / 1e6:.2f}M parameters"
    )
    # metrics.csv sits beside config.yaml (and replaces that of an earlier run): not worth a warning
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    train_s = time.perf_counter() - t0
    trainer.validate(module, dataloaders=val_loader, verbose=False)  # final numbers, vq.ckpt and recon.png
    if trainer.is_global_zero:
        s = module.val_stats
        u = s.get("codebook_usage") or {}
        summary = {
            "steps": trainer.global_step,
            "train_s": round(train_s, 1),
            "val_mse": s.get("val/mse"),
            "val_psnr_db": s.get("val/psnr"),
            "codebook_size": cfg.vq.n_embed,
            "codebook_perplexity": u.get("perplexity"),
            "codes_used_fraction": u.get("used_fraction"),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(
            f"train-vq: {trainer.global_step} steps in {train_s:.0f} s; held-out MSE {s.get('val/mse', float('nan')):.4f} "
            f"([-1, 1] pixels), PSNR {s.get('val/psnr', float('nan')):.2f} dB, codebook perplexity "
            f"{u.get('perplexity', float('nan')):.1f}, {100 * u.get('used_fraction', float('nan')):.1f}% of codes used"
        )
    return run_dir
