"""The VQ tokenizer of an image token cache: a checkpoint named by ``data.tokenizer`` (loaded once) or a
ready object, identified by a sha256 that keys and guards the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_modules.fingerprint import file_sha256
from data_modules.paths import find_path
from glauber.nn.vq_checkpoint import load_vq


def tokenizer_vocab(tok: Any) -> int:
    """The codebook size of a VQ tokenizer (``vocab_size``, ``n_embed`` or ``config.n_embed``)."""
    for get in (lambda: tok.vocab_size, lambda: tok.n_embed, lambda: tok.config.n_embed):
        try:
            return int(get())
        except AttributeError:
            continue
    raise ValueError(f"tokenizer {type(tok).__name__} has no vocab_size / n_embed")


def token_grid(tok: Any, image_size: int) -> tuple[int, int]:
    """The token grid ``(h, w)`` of an ``image_size`` image: by the tokenizer's ``downsample_factor``, else its ``grid_shape``."""
    f = getattr(tok, "downsample_factor", None)
    if f:
        if image_size % f:
            raise ValueError(f"data.image_size={image_size} is not divisible by the tokenizer's downsampling factor {f}")
        return image_size // f, image_size // f
    h, w = tok.grid_shape
    return int(h), int(w)


def _object_sha256(tok: Any) -> str:
    if not isinstance(tok, torch.nn.Module):
        raise ValueError(f"tokenizer object {type(tok).__name__} needs a sha256 attribute (or be an nn.Module) to key its cache")
    h = hashlib.sha256()
    for k, v in sorted(tok.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def encode_ids(tok: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    ids = tok.encode_to_ids(np.ascontiguousarray(images), batch_size=batch_size)
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.ndim != 3 or len(ids) != len(images):
        raise ValueError(f"the tokenizer's encode_to_ids gave shape {ids.shape} for {len(images)} images (want [N, h, w])")
    return ids.astype(np.int64, copy=False)


class VQTokenizer:
    """``data.tokenizer`` (a checkpoint path, may be empty) or ``given`` (a ready tokenizer object)."""

    def __init__(self, spec: str, given: Any | None = None):
        self.spec, self.given, self._model, self._sha = spec, given, given, None

    def path(self) -> Path | None:
        if not self.spec:
            return None
        return (find_path(self.spec) or Path(self.spec).expanduser()).resolve()

    def name(self) -> str:
        path = self.path()
        return path.name if path is not None else str(getattr(self._model, "name", type(self._model).__name__))

    def check_file(self) -> None:
        path = self.path()
        if self.given is None and (path is None or not path.is_file()):
            raise FileNotFoundError(
                f"VQ tokenizer data.tokenizer={self.spec!r} not found ({path}): train one with `glauber train-vq` "
                "or download a taming-transformers VQGAN (the paper's setting: vqgan_imagenet_f16_16384 from "
                "https://github.com/CompVis/taming-transformers, 'ImageNet (f=16), 16384'), keeping its layout "
                "NAME/checkpoints/last.ckpt + NAME/configs/model.yaml, and point data.tokenizer at the .ckpt"
            )

    def model(self) -> Any:
        """The tokenizer (loaded from ``data.tokenizer`` once, in eval mode, on the CPU)."""
        if self._model is None:
            self.check_file()
            self._model = load_vq(self.path())
        return self._model

    def sha256(self) -> str:
        """The checkpoint file's sha256; for a given object, its ``sha256`` attribute, else the file's when
        ``data.tokenizer`` names one, else a hash of its weights."""
        if self._sha is None:
            path, given = self.path(), self.given
            if given is None:
                self.check_file()
                self._sha = file_sha256(path)
            elif isinstance(getattr(given, "sha256", None), str):
                self._sha = given.sha256
            elif path is not None and path.is_file():
                self._sha = file_sha256(path)
            else:
                self._sha = _object_sha256(given)
        return self._sha

    def info(self, image_size: int) -> dict[str, Any]:
        """What meta.json records of the tokenizer (loads the model)."""
        path, tok = self.path(), self.model()
        return {
            "kind": "vq",
            "path": str(path) if path is not None else None,
            "name": self.name(),
            "sha256": self.sha256(),
            "grid": list(token_grid(tok, image_size)),
            "vocab_size": tokenizer_vocab(tok),
            "image_size": image_size,
        }

    def decode(self, ids: Any, grid: tuple[int, int]) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` images of token ids ``[N, h*w]`` (or ``[N, h, w]``)."""
        tok = self.model()
        ids = torch.as_tensor(ids, dtype=torch.long)
        params = list(tok.parameters()) if isinstance(tok, torch.nn.Module) else []
        if params:
            ids = ids.to(params[0].device)
        with torch.no_grad():
            imgs = tok.to_uint8(tok.decode_ids(ids.reshape(-1, *grid)))
        return imgs.cpu().numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
