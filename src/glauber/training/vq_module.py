"""The LightningModule of ``glauber train-vq``: L1/MSE reconstruction + ``beta`` x commitment loss, the codebook learnt by
its loss or by EMA (``codebook_ema``), unused codes re-seeded; no perceptual or adversarial loss (not taming's VQGAN)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from glauber.nn.optim import adamw_with_schedule
from glauber.nn.vq_config import VQConfig
from glauber.nn.vq_model import VQModel, codebook_perplexity, codebook_usage


class VQTrainModule(L.LightningModule):
    """Trains ``self.model``; the training state (code last-use steps, EMA statistics) lives in buffers of
    this module, so ``self.model.state_dict()`` keeps the taming layout."""

    def __init__(self, cfg: dict | DictConfig) -> None:
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig) else cfg
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

    @property
    def codebook(self) -> Tensor:
        return self.model.quantize.embedding.weight

    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    def _reduce(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self._distributed() else t

    def to_float(self, batch: Tensor, augment: bool = False) -> Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (random horizontal flips when asked)."""
        x = self.model.prepare(batch).contiguous(memory_format=torch.channels_last)
        if augment and self.cfg.hflip:
            flip = torch.rand(x.shape[0], device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def on_fit_start(self) -> None:
        self.model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU; same state dict

    @torch.no_grad()
    def reseed_dead_codes(self, z_e: Tensor, step: int) -> Tensor:
        """Give the codes unused for ``dead_code_every`` steps (all at step 0) random encoder outputs of this batch;
        returns their indices."""
        idx = ((step - self.last_used) >= max(1, int(self.cfg.dead_code_every))).nonzero().squeeze(1)
        if idx.numel() == 0:
            return idx
        flat = _vectors(z_e)
        gen = torch.Generator(device=flat.device).manual_seed(int(self.cfg.seed) * 1_000_003 + step)
        k = idx.numel()
        if flat.shape[0] >= k:
            new = flat[torch.randperm(flat.shape[0], generator=gen, device=flat.device)[:k]]
        else:  # fewer vectors than dead codes: repeat some, jittered so that they differ
            new = flat[torch.randint(flat.shape[0], (k,), generator=gen, device=flat.device)]
            new = new + 1e-3 * flat.std() * torch.randn(new.shape, generator=gen, device=flat.device)
        if self._distributed():
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
        sums = self._reduce(torch.zeros_like(self.ema_sum).index_add_(0, ids.reshape(-1), _vectors(z_e)))
        self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n, eps, total = self.ema_count.numel(), 1e-5, self.ema_count.sum()
        smoothed = (self.ema_count + eps) / (total + n * eps) * total  # Laplace smoothing keeps empty codes finite
        self.codebook.copy_((self.ema_sum / smoothed[:, None]).to(self.codebook.dtype))

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
            window = c.dead_code_every if c.dead_code_every > 0 else 100
            live = ((step - self.last_used) < window).float().mean()
        stats = {
            "l1": l1.detach(),
            "mse": mse.detach(),
            "psnr": _psnr(mse.detach()),
            "codebook": codebook_loss.detach(),
            "commit": commit_loss.detach(),
            "perplexity": codebook_perplexity(counts),
            "codes_used_pct": 100 * live,
            "codes_reseeded": torch.tensor(float(self.codes_reseeded), device=x.device),  # in all, the initialisation included
        }
        return loss, stats

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, stats = self.compute_loss(self.to_float(batch, augment=True), self.global_step)
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

    def on_validation_epoch_start(self) -> None:
        shapes = {"abs": (), "sq": (), "pixels": (), "counts": (self.cfg.vq.n_embed,)}
        self._val = {k: torch.zeros(shape, device=self.device, dtype=torch.float64) for k, shape in shapes.items()}
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
        usage = codebook_usage(v["counts"])
        metrics = {
            "val/l1": float(v["abs"] / v["pixels"].clamp_min(1)),
            "val/mse": float(mse),
            "val/psnr": float(_psnr(mse)),
            "val/perplexity": usage["perplexity"],
            "val/codes_used_pct": 100 * usage["used_fraction"],
        }
        for k, t in metrics.items():
            self.log(k, t, prog_bar=k == "val/psnr", sync_dist=False)
        self.val_stats = {**metrics, "codebook_usage": {**usage, "split": "held-out"}}


def _vectors(z: Tensor) -> Tensor:
    """Latents [N, C, h, w] -> float32 vectors [N*h*w, C], detached."""
    return z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _psnr(mse_pm1: Tensor) -> Tensor:
    """PSNR in dB of images in [0, 1] from the MSE measured on [-1, 1] pixels (4x the [0, 1] MSE)."""
    return 10 * torch.log10(4.0 / mse_pm1.clamp_min(1e-12))
