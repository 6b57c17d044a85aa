"""Training a small VQ image tokenizer: ``glauber train-vq CONFIG [key=value ...]``.

Loss: ``l1_weight * |x - x_hat| + mse_weight * (x - x_hat)^2 + beta * |z_e - sg(z_q)|^2`` plus the codebook
term ``|sg(z_e) - z_q|^2`` (or, with ``codebook_ema > 0``, codebook updates by exponential moving averages of
the assigned encoder outputs instead), the decoder's gradient reaching the encoder by the straight-through
estimator. No perceptual or adversarial loss: this is the small-scale tokenizer (VQ-VAE style), not
taming's full VQGAN recipe.

The codebook starts from encoder outputs of the first batch; every ``dead_code_every`` steps the codes
unused for that many steps ("dead") are re-seeded from encoder outputs of the current batch. Codebook
usage (perplexity and % of codes used) is logged.

Writes to ``run_dir``: ``vq.ckpt`` (atomic; ``glauber.nn.vq.load_vq`` reads it), ``recon.png`` (held-out
originals on top, their reconstructions below), ``metrics.csv``, ``config.yaml``.
"""

from __future__ import annotations

import json
import os
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
from torch import Tensor

from data_modules.images import load_images
from glauber.nn.optim import adamw_with_schedule
from glauber.nn.vq import VQConfig, VQModel, codebook_usage, save_vq
from glauber.training.train import cpu_threads


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


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


# -- the LightningModule ------------------------------------------------------------------------------------
class VQTrainModule(L.LightningModule):
    """Trains a ``VQModel`` (``self.model``); the training state (code last-use steps, EMA statistics) lives
    in buffers of this module, so ``self.model.state_dict()`` keeps the taming layout."""

    def __init__(self, cfg: dict | DictConfig) -> None:
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = OmegaConf.create(cfg)
        self.model = VQModel(VQConfig(**cfg["vq"]))
        n = self.model.config.n_embed
        self.register_buffer("last_used", torch.full((n,), -(2**40), dtype=torch.long))  # step a code was last chosen
        if self.cfg.codebook_ema > 0:
            self.model.quantize.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(n))
            self.register_buffer("ema_sum", self.model.quantize.embedding.weight.detach().clone().float())
        self.codes_reseeded = 0
        self.val_stats: dict[str, Any] = {}
        self.recon_pair: tuple[Tensor, Tensor] | None = None
        self._val: dict[str, Tensor] = {}

    # -- helpers ------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        return self.model.quantize.embedding.weight

    def _reduce(self, t: Tensor) -> Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def to_float(self, batch: Tensor, augment: bool = False) -> Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (random horizontal flips when asked)."""
        x = batch.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous(memory_format=torch.channels_last)
        if augment and self.cfg.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def on_fit_start(self) -> None:
        self.model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU; same state dict

    # -- codebook maintenance -----------------------------------------------------------------------
    @torch.no_grad()
    def reseed_dead_codes(self, z_e: Tensor, step: int) -> Tensor:
        """Codes unused for ``dead_code_every`` steps (all codes at the first step) get encoder outputs of
        this batch, drawn at random; returns the indices of the re-seeded codes. Live codes are untouched."""
        window = max(1, int(self.cfg.dead_code_every))
        dead = (step - self.last_used) >= window
        idx = dead.nonzero().squeeze(1)
        if idx.numel() == 0:
            return idx
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        gen = torch.Generator(device=flat.device).manual_seed(int(self.cfg.seed) * 1_000_003 + step)
        k = idx.numel()
        if flat.shape[0] >= k:
            new = flat[torch.randperm(flat.shape[0], generator=gen, device=flat.device)[:k]]
        else:  # fewer vectors than dead codes: repeat some, jittered so that they differ
            new = flat[torch.randint(flat.shape[0], (k,), generator=gen, device=flat.device)]
            new = new + 1e-3 * flat.std() * torch.randn(new.shape, generator=gen, device=flat.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            new = self.trainer.strategy.broadcast(new, src=0)  # every rank keeps the same codebook
        self.codebook[idx] = new.to(self.codebook.dtype)
        self.last_used[idx] = step  # a grace period of one window
        if self.cfg.codebook_ema > 0:
            self.ema_count[idx] = 1.0
            self.ema_sum[idx] = new
        return idx

    @torch.no_grad()
    def ema_update(self, z_e: Tensor, ids: Tensor, counts: Tensor) -> None:
        decay = float(self.cfg.codebook_ema)
        flat = z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids.reshape(-1), flat)
        sums = self._reduce(sums)
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n, eps = self.ema_count.numel(), 1e-5
        total = self.ema_count.sum()
        smoothed = (self.ema_count + eps) / (total + n * eps) * total  # Laplace smoothing keeps empty codes finite
        self.codebook.copy_((self.ema_sum / smoothed[:, None]).to(self.codebook.dtype))

    # -- training -------------------------------------------------------------------------------------
    def compute_loss(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """One training step's loss on float images ``x`` (also does the codebook maintenance of ``step``)."""
        c = self.cfg
        z_e = self.model.encode_latent(x)
        if step == 0 or (c.dead_code_every > 0 and step % c.dead_code_every == 0):
            self.codes_reseeded += self.reseed_dead_codes(z_e, step).numel()
        z_st, ids, _, codebook_loss, commit_loss = self.model.quantise(z_e)
        recon = self.model.decode_latent(z_st).float()
        l1 = (recon - x.float()).abs().mean()
        mse = (recon - x.float()).pow(2).mean()
        loss = c.l1_weight * l1 + c.mse_weight * mse + c.beta * commit_loss
        if c.codebook_ema == 0:
            loss = loss + codebook_loss
        counts = self._reduce(torch.bincount(ids.reshape(-1), minlength=c.vq.n_embed).float())
        with torch.no_grad():
            self.last_used[counts > 0] = step
            if c.codebook_ema > 0:
                self.ema_update(z_e, ids, counts)
            p = counts / counts.sum()
            perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
            window = c.dead_code_every if c.dead_code_every > 0 else 100
            live = ((step - self.last_used) < window).float().mean()
        stats = {
            "l1": l1.detach(),
            "mse": mse.detach(),
            "psnr": _psnr(mse.detach()),
            "codebook": codebook_loss.detach(),
            "commit": commit_loss.detach(),
            "perplexity": perplexity,
            "codes_used_pct": 100 * live,
            "codes_reseeded": torch.tensor(float(self.codes_reseeded), device=x.device),  # in all, the initialisation included
        }
        return loss, stats

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        step = self.global_step
        loss, stats = self.compute_loss(self.to_float(batch, augment=True), step)
        bs = batch.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        for k, v in stats.items():
            self.log(f"train/{k}", v, prog_bar=k in ("psnr", "codes_used_pct"), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def configure_optimizers(self):
        c = self.cfg
        codebook = [p for p in self.model.quantize.parameters() if p.requires_grad]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("quantize.") and p.requires_grad]
        groups = [{"params": rest, "weight_decay": c.weight_decay}]
        if codebook:
            groups.append({"params": codebook, "weight_decay": 0.0})  # decay would pull the codes to 0
        return adamw_with_schedule(groups, c, c.max_steps)

    # -- validation: held-out reconstruction error and codebook usage -----------------------------------
    def on_validation_epoch_start(self) -> None:
        dev = self.device
        self._val = {
            "abs": torch.zeros((), device=dev, dtype=torch.float64),
            "sq": torch.zeros((), device=dev, dtype=torch.float64),
            "pixels": torch.zeros((), device=dev, dtype=torch.float64),
            "counts": torch.zeros(self.cfg.vq.n_embed, device=dev, dtype=torch.float64),
        }
        self.recon_pair = None

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x = self.to_float(batch)
        out = self.model(x)
        recon = out.recon.float().clamp(-1, 1)
        diff = recon - x
        v = self._val
        v["abs"] += diff.abs().sum().double()
        v["sq"] += diff.pow(2).sum().double()
        v["pixels"] += diff.numel()
        v["counts"] += torch.bincount(out.ids.reshape(-1), minlength=self.cfg.vq.n_embed).double()
        if batch_idx == 0 and self.cfg.num_recon > 0:
            k = self.cfg.num_recon
            self.recon_pair = (batch[:k].cpu(), self.model.to_uint8(recon[:k]).cpu())

    def on_validation_epoch_end(self) -> None:
        v = {k: self._reduce(t) for k, t in self._val.items()}
        mse = v["sq"] / v["pixels"].clamp_min(1)
        counts = v["counts"]
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        used = (counts > 0).double().mean()
        metrics = {
            "val/l1": (v["abs"] / v["pixels"].clamp_min(1)).float(),
            "val/mse": mse.float(),
            "val/psnr": _psnr(mse).float(),
            "val/perplexity": perplexity.float(),
            "val/codes_used_pct": (100 * used).float(),
        }
        for k, t in metrics.items():
            self.log(k, t, prog_bar=k == "val/psnr", sync_dist=False)
        self.val_stats = {k: float(t) for k, t in metrics.items()}
        usage = codebook_usage(torch.repeat_interleave(torch.arange(len(counts)), counts.long().cpu()), len(counts))
        self.val_stats["codebook_usage"] = {**usage, "split": "held-out"}


def _psnr(mse_pm1: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] from the MSE measured on [-1, 1] pixels (4x the [0, 1] MSE)."""
    return 10 * torch.log10(4.0 / mse_pm1.clamp_min(1e-12))


# -- outputs ------------------------------------------------------------------------------------------------
def recon_grid(originals: np.ndarray, recons: np.ndarray, cols: int = 16, pad: int = 2, scale: int | None = None) -> np.ndarray:
    """uint8 [H', W', 3]: rows of originals, each followed by the row of their reconstructions."""
    n, h, w, _ = originals.shape
    scale = scale or max(1, 64 // max(h, w))
    if scale > 1:
        originals = originals.repeat(scale, 1).repeat(scale, 2)
        recons = recons.repeat(scale, 1).repeat(scale, 2)
        h, w = h * scale, w * scale
    cols = max(1, min(cols, n))
    pairs = -(-n // cols)
    canvas = np.full((2 * pairs * (h + pad) + pad + (pairs - 1) * pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top = pad + r * (2 * (h + pad) + pad)
        left = pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = originals[i]
        canvas[top + h + pad : top + 2 * h + pad, left : left + w] = recons[i]
    return canvas


def write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


class VQArtifacts(Callback):
    """After every validation, rank 0 writes ``vq.ckpt`` (atomically) and ``recon.png`` to the run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: VQTrainModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        write_vq_outputs(pl_module, self.run_dir, trainer.global_step)


def write_vq_outputs(module: VQTrainModule, run_dir: Path, step: int) -> None:
    stats = module.val_stats
    save_vq(
        run_dir / "vq.ckpt",
        module.model,
        train_config=OmegaConf.to_container(module.cfg, resolve=True),
        codebook_usage=stats.get("codebook_usage"),
        image_size=int(module.cfg.image_size),
        step=step,
        val_metrics={k: v for k, v in stats.items() if k.startswith("val/")},
    )
    if module.recon_pair is not None:
        orig, rec = module.recon_pair
        write_png(recon_grid(orig.numpy(), rec.numpy()), run_dir / "recon.png")


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
        _Images(train_images),
        batch_size=min(cfg.batch_size, len(train_images)),
        shuffle=True,
        drop_last=True,
        generator=gen,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
    val_loader = torch.utils.data.DataLoader(_Images(val_images), batch_size=max(cfg.batch_size, cfg.num_recon), shuffle=False)
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


__all__ = [
    "VQTrainConfig",
    "VQTrainModule",
    "load_vq_train_config",
    "train_vq",
]
