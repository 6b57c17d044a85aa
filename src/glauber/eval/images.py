"""Everything pictorial (GGM only sees ``[B, h*w]`` token ids in raster order): grid PNGs, the region masks
of infilling, and decoded images sampled from a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import save_image

from data_modules.fingerprint import file_sha256
from glauber.eval.inference import generate
from glauber.files import atomic_write
from glauber.nn.vq_checkpoint import load_vq


def save_grid(images: np.ndarray | Tensor, path: str | Path, ncol: int = 8, pad: int = 2, scale: int = 1) -> Path:
    """Write uint8 images ``[N, H, W, 3]`` as one PNG, ``ncol`` per row with white padding, each enlarged ``scale`` times."""
    imgs = torch.from_numpy(np.ascontiguousarray(images.cpu() if isinstance(images, Tensor) else images))
    if imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.dtype != torch.uint8:
        raise ValueError(f"save_grid wants uint8 [N, H, W, 3] (got {imgs.dtype} {tuple(imgs.shape)})")
    x = imgs.permute(0, 3, 1, 2).float().div(255)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    atomic_write(path, lambda f: save_image(x, f, nrow=ncol, padding=pad, pad_value=1.0, format="PNG"))
    return Path(path)


def fill_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Rows of uint8 images ``[n_i, H, W, 3]`` as one batch, each padded with white images to the longest."""
    ncol = max(len(r) for r in rows)
    return np.concatenate([np.concatenate([r, np.full((ncol - len(r), *r.shape[1:]), 255, np.uint8)]) for r in rows])


def region_mask(grid: tuple[int, int], region: str = "center") -> Tensor:
    """Boolean ``[h*w]`` raster mask of the tokens to regenerate: ``center`` (half-size square), ``bottom`` or ``right`` half."""
    h, w = grid
    m = torch.zeros(h, w, dtype=torch.bool)
    if region == "center":
        m[h // 4 : h - h // 4, w // 4 : w - w // 4] = True
    elif region == "bottom":
        m[h // 2 :] = True
    elif region == "right":
        m[:, w // 2 :] = True
    else:
        raise ValueError(f"infill region must be center, bottom or right (got {region!r})")
    return m.reshape(-1)


def show_mask(images: np.ndarray, grid: tuple[int, int], free: Tensor, shade: int = 160) -> np.ndarray:
    """Copies of ``images`` with the regenerated region greyed out, to show what the model was given."""
    fh, fw = images.shape[1] // grid[0], images.shape[2] // grid[1]
    pix = free.view(grid).repeat_interleave(fh, 0).repeat_interleave(fw, 1).numpy()
    out = images.copy()
    out[:, pix] = shade
    return out


class CheckpointImages:
    """A trained image checkpoint with its VQ tokenizer: sampled or infilled token ids, decoded to uint8 images."""

    def __init__(self, module: Any, tokenizer: Any | None = None) -> None:
        self.module = module
        self.vq = tokenizer if tokenizer is not None else vq_of(module)
        self.grid = tuple(self.vq.grid_shape)

    def decode(self, ids: Tensor) -> np.ndarray:
        with torch.no_grad():
            imgs = self.vq.to_uint8(self.vq.decode_ids(ids.to(next(self.vq.parameters()).device).view(-1, *self.grid)))
        return imgs.cpu().numpy() if isinstance(imgs, Tensor) else np.asarray(imgs)

    def sample_ids(self, n: int, batch_size: int = 64, seed: int = 0, progress: bool = True, **options: Any) -> Tensor:
        return generate(self.module, n, batch_size, seed, progress=progress, **options)

    def infill_ids(self, ids: Tensor, free: Tensor, seed: int = 0, **options: Any) -> Tensor:
        gen = torch.Generator(device=self.module.device).manual_seed(seed)
        return self.module.sample(ids.shape[0], template=ids, clamp_mask=~free, generator=gen, **options).cpu()


def vq_of(module: Any) -> Any:
    """The VQ tokenizer recorded in an image checkpoint (path + sha256 in its data info)."""
    info = module.data_info_.get("tokenizer") or {}
    path = info.get("path")
    if not path:
        raise ValueError("this checkpoint does not record a VQ tokenizer (not an image run?)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"the VQ tokenizer this model was trained with, {path}, is missing: restore it or retrain it")
    sha = info.get("sha256")
    if sha and (got := file_sha256(path)) != sha:
        raise ValueError(f"{path} is not the VQ tokenizer this model was trained with (sha256 {got[:12]} != {sha[:12]})")
    return load_vq(path).to(module.device).eval()
