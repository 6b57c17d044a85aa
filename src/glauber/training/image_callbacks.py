"""Training callbacks of image runs: a sample grid (with infilling rows) at every validation, FID every K steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from glauber.config import sample_options
from glauber.eval.fid import compute_fid
from glauber.eval.images import CheckpointImages, fill_rows, region_mask, save_grid, show_mask


def image_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    options = sample_options(cfg)
    callbacks: list[Callback] = [ImageSamples(run_dir, cfg.sample.num_samples, options, cfg.image.infill_region)]
    if cfg.image.fid_every_steps > 0:
        callbacks.append(FIDEval(run_dir, cfg.image.fid_every_steps, cfg.image.fid_num_samples, cfg.image, options))
    return callbacks


def _images(trainer: L.Trainer, pl_module: Any) -> CheckpointImages:
    return CheckpointImages(pl_module, trainer.datamodule.tokenizer_model())


class ImageSamples(Callback):
    """At each validation rank 0 writes ``samples/step_XXXXXXXX.png``: samples, then real, masked and infilled images."""

    def __init__(self, run_dir: str | Path, num_samples: int, options: dict[str, Any], region: str = "center", n_infill: int = 8):
        self.dir = Path(run_dir) / "samples"
        self.num_samples, self.options, self.region, self.n_infill = num_samples, options, region, n_infill

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_samples < 1 or not trainer.is_global_zero:
            return
        imgs = _images(trainer, pl_module)
        seed = pl_module.cfg.train.seed + 12345
        ids = imgs.sample_ids(self.num_samples, batch_size=self.num_samples, seed=seed, progress=False, **self.options)
        rows = [imgs.decode(ids)]
        real = trainer.datamodule.val_tokens(self.n_infill)
        if real is not None and len(real):
            free = region_mask(imgs.grid, self.region)
            filled = imgs.infill_ids(real.to(pl_module.device), free, seed=seed, **self.options)
            orig = imgs.decode(real)
            rows += [orig, show_mask(orig, imgs.grid, free), imgs.decode(filled)]
        path = save_grid(fill_rows(rows), self.dir / f"step_{trainer.global_step:08d}.png", ncol=max(map(len, rows)))
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                from PIL import Image

                exp.add_image("samples", np.asarray(Image.open(path)), trainer.global_step, dataformats="HWC")


class FIDEval(Callback):
    """Every ``every_steps`` optimizer steps rank 0 logs ``eval/fid`` of ``num_samples`` samples (EMA weights) against
    ``image.fid_reference``, also appended to ``eval/fid.jsonl``."""

    def __init__(self, run_dir: str | Path, every_steps: int, num_samples: int, image_cfg: Any, options: dict[str, Any]):
        self.dir = Path(run_dir) / "eval"
        self.every, self.num, self.image_cfg, self.options = every_steps, num_samples, image_cfg, options
        self._last = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self._last:
            return
        self._last = step
        if not trainer.is_global_zero:
            return
        imgs = _images(trainer, pl_module)
        data = trainer.datamodule.cfg
        seed = pl_module.cfg.train.seed + step
        ids = imgs.sample_ids(self.num, batch_size=min(self.num, 256), seed=seed, progress=False, **self.options)
        reference, route = self.image_cfg.fid_reference or data.source, self.image_cfg.fid_route
        res = compute_fid(imgs.decode(ids), reference, route=route, device=pl_module.device, image_size=data.image_size)
        pl_module.log("eval/fid", float(res["fid"]), rank_zero_only=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / "fid.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in res.items() if isinstance(v, (int, float, str))}}) + "\n")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
