"""Images as VQ token grids: a one-time token cache of an image source (one row of h*w uint16 ids per image, raster
order; a cache of another tokenizer is refused, never mixed), and a resumable DataModule. Validation: ``val_size`` images,
else ``round(val_fraction * N)``, drawn with ``SPLIT_SEED`` (not ``seed``). ``hflip=True`` stores train image i as rows
2i and 2i + 1 (its mirror: a VQ codebook is not mirror symmetric)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from data_modules.hub import HubUnreachableError, hf_cached, hub_reachable
from data_modules.image_sources import (
    ImageSource,
    content_digest,
    fit_image,
    is_hub_source,
    load_images,
    offline_message,
    open_source,
    parse_hf,
    resolve_source,
)
from data_modules.sampling import ShardedLoaders, rank_world
from data_modules.token_cache import Build, TokenCacheModule, TokenWindows, TokenWriter, read_meta, say, source_slug
from data_modules.vq_tokenizer import VQTokenizer, encode_ids
from glauber.schema import option

__all__ = ["ImageDataConfig", "ImageTokenDataModule", "fit_image", "load_images", "open_source"]

FORMAT_VERSION = 3  # 2: sha256 of the images in the source signature and cache key; 3: PIL.ImageOps.fit crops
SPLIT_SEED = 0


@dataclass
class ImageDataConfig:
    """Images, the VQ tokenizer that turns them into token grids, and the split (see data_modules/images.py)."""

    source: str = option("", "image folder | .zip | .npz with 'images' uint8 [N,H,W,3] | hf:NAME[:split]")
    tokenizer: str = option("", "VQ checkpoint: a taming .ckpt or glauber's vq.ckpt")
    image_size: int = option(256, "images are centre-cropped and resized to image_size x image_size")
    center_crop: bool = option(True, "false: squash to a square instead of cropping")
    hflip: bool = option(False, "also cache the mirror image of every train image (rows 2i, 2i+1)")
    seq_len: int = option(256, "tokens per image, h*w of the tokenizer's grid (checked)")
    val_fraction: float = option(0.05, "fraction of the images held out for validation")
    val_size: int | None = option(None, "number of validation images (overrides val_fraction)")
    cache_dir: str = option("cache", "where token grids are cached (shared by all nodes in multi-node runs)")
    num_workers: int = option(0, "DataLoader workers (training, and reading images for the one-time tokenisation)")
    seed: int = option(0, "training order")
    encode_batch_size: int = option(64, "images per VQ encoder call while building the cache")
    encode_device: str = option("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    hf_offline_timeout_s: float = option(3.0, "how long to wait for huggingface.co before declaring no internet")


def split_spec(cfg: ImageDataConfig) -> dict[str, Any]:
    """The config values that decide the train/val split (recorded in meta.json; a change rebuilds)."""
    return {"val_fraction": cfg.val_fraction, "val_size": cfg.val_size, "split_seed": SPLIT_SEED}


def split_indices(n: int, cfg: ImageDataConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` image indices, each sorted: ``val`` is a seeded random subset."""
    n_val = cfg.val_size if cfg.val_size is not None else int(round(n * cfg.val_fraction))
    if not 0 <= n_val < n:
        raise ValueError(f"{n_val} validation images leave none to train on ({n} images): lower data.val_size / val_fraction")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def check_seq_len(cfg: ImageDataConfig, h: int, w: int) -> None:
    if cfg.seq_len != h * w:
        raise ValueError(
            f"data.seq_len={cfg.seq_len}, but the tokenizer turns {cfg.image_size}px images into {h}x{w} = {h * w} tokens: "
            f"set data.seq_len={h * w}"
        )


def check_tokenizer(cache: Path, meta: dict[str, Any], cfg: ImageDataConfig, sha256: str) -> None:
    recorded = meta["tokenizer"]
    if recorded["sha256"] != sha256:
        raise ValueError(
            f"token cache {cache} was built with another VQ tokenizer ({recorded.get('path') or recorded.get('name')}, "
            f"sha256 {recorded['sha256'][:12]}) than data.tokenizer={cfg.tokenizer or recorded.get('name')!r} "
            f"(sha256 {sha256[:12]}); tokens of two tokenizers are never mixed: delete {cache} to re-tokenise the "
            "images, or set data.cache_dir elsewhere"
        )


def build_cache(cfg: ImageDataConfig, build: Build, src: ImageSource, tok: Any, tok_info: dict[str, Any]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    (h, w), V = tok_info["grid"], tok_info["vocab_size"]
    L_ = h * w
    check_seq_len(cfg, h, w)
    if V > 65536:
        raise ValueError(f"the tokenizer's codebook has {V} entries; the uint16 token cache holds at most 65536")
    train_idx, val_idx = split_indices(len(src), cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.encode_device == "auto" else cfg.encode_device)
    params = list(tok.parameters()) if isinstance(tok, torch.nn.Module) else []
    home = params[0].device if params else None
    if home is not None and home != device:
        tok.to(device)
    say(f"tokenising {len(src):,} images of {cfg.source!r} ({cfg.image_size}px, {h}x{w} tokens) on {device} into {build.cache}")
    writer = TokenWriter(build, V)
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            loader = DataLoader(
                Subset(src, idx.tolist()), batch_size=cfg.encode_batch_size, num_workers=cfg.num_workers, collate_fn=np.stack
            )
            for batch in tqdm(loader, total=len(loader), desc=f"tokenising {split}", unit="batch", mininterval=1.0):
                ids = encode_ids(tok, batch, cfg.encode_batch_size)
                if ids.shape[1:] != (h, w):
                    raise ValueError(f"the tokenizer gave {ids.shape[1]}x{ids.shape[2]} token grids, expected {h}x{w}")
                rows = ids.reshape(len(ids), L_)
                if split == "train" and cfg.hflip:
                    flipped = encode_ids(tok, batch[:, :, ::-1], cfg.encode_batch_size).reshape(len(ids), L_)
                    rows = np.stack([rows, flipped], axis=1).reshape(-1, L_)  # rows 2i, 2i+1: image i, its mirror
                lo, hi = int(rows.min()), int(rows.max())
                if lo < 0 or hi >= V:
                    raise ValueError(f"the tokenizer produced id {lo if lo < 0 else hi} outside [0, {V})")
                writer.write(split, rows.reshape(-1))
    finally:
        if home is not None and home != device:
            tok.to(home)
    writer.close()
    counts = {s: n // L_ for s, n in writer.counts.items()}
    meta = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "source_kind": src.kind,
        "source_signature": src.signature(),
        "image_size": cfg.image_size,
        "center_crop": cfg.center_crop,
        "hflip": cfg.hflip,
        "hflip_layout": "train rows 2i and 2i+1 are image i and its mirror" if cfg.hflip else None,
        "split": split_spec(cfg),
        "images": {"total": len(src), "train": len(train_idx), "val": len(val_idx)},
        "rows": counts,
        "grid": [h, w],
        "seq_len": L_,
        "dtype": "uint16",
        "vocab_size": V,
        "max_id": writer.max_id,
        "tokenizer": tok_info,
        "unigram": "unigram.npy",
    }
    build.commit(meta)
    say(f"token cache ready: {build.cache} (train {counts['train']:,}, val {counts['val']:,} rows of {L_} tokens)")
    return meta


class ImageTokenDataModule(TokenCacheModule, ShardedLoaders, L.LightningDataModule):
    """VQ token grids of images, ``[B, h*w]`` LongTensors in raster order. ``tokenizer``: a ready VQ tokenizer
    object used instead of loading ``cfg.tokenizer`` (tests, notebooks)."""

    cache_format = FORMAT_VERSION

    def __init__(
        self,
        cfg: ImageDataConfig,
        batch_size: int,
        max_train_samples: int | None = None,
        val_batch_size: int | None = None,
        tokenizer: Any | None = None,
    ):
        super().__init__()
        for name in ("image_size", "seq_len", "encode_batch_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"data.{name} must be >= 1 (got {getattr(cfg, name)})")
        if cfg.val_size is not None and cfg.val_size < 0:
            raise ValueError(f"data.val_size must be >= 0 (got {cfg.val_size})")
        if not cfg.source:
            raise ValueError("data.source is empty: set it to an image folder, a .zip or .npz of images, or hf:NAME[:split]")
        if tokenizer is None and not cfg.tokenizer:
            raise ValueError("data.tokenizer is empty: set it to a VQ checkpoint (a taming .ckpt or a glauber vq.ckpt)")
        self.init_loading(cfg, batch_size, val_batch_size, max_train_samples)
        self.vq = VQTokenizer(cfg.tokenizer, tokenizer)

    def tokenizer_model(self) -> Any:
        return self.vq.model()

    def tokenizer_state(self) -> dict[str, Any]:
        """The VQ checkpoint's path, sha256 and token grid (for checkpoints), from meta.json: no model load."""
        state = {**self._load_meta()["tokenizer"], "sha256": self.vq.sha256()}
        path = self.vq.path()
        if path is not None:
            state.update(path=str(path), name=path.name)
        return state

    @property
    def vocab_size(self) -> int:
        return int(self._load_meta()["vocab_size"])

    @property
    def grid_shape(self) -> tuple[int, int]:
        h, w = self._load_meta()["grid"]
        return int(h), int(w)

    def find_cache_path(self) -> Path:
        """``<cache_dir>/<source>-<S>px[-nocrop][-hflip]-<tokenizer name>[-<hash of its path>][-<content digest[:12]>]``."""
        cfg, path = self.cfg, self.vq.path()
        if path is not None:
            tok_key = f"{source_slug(path.stem)[:40]}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        else:
            tok_key = source_slug(self.vq.name())[:40]
        parts = [source_slug(cfg.source), f"{cfg.image_size}px"]
        parts += [] if cfg.center_crop else ["nocrop"]
        parts += ["hflip"] if cfg.hflip else []
        root, base = Path(cfg.cache_dir).expanduser(), "-".join([*parts, tok_key])
        if is_hub_source(cfg.source):
            return root / base
        return self.keyed_cache(root, base, lambda: content_digest(resolve_source(cfg.source)), "images")

    def cache_content(self) -> ImageSource:
        c = self.cfg
        return open_source(c.source, c.image_size, c.center_crop, c.hf_offline_timeout_s)

    def cache_expect(self, meta: dict[str, Any], src: ImageSource | None) -> dict[str, Any]:
        expect = {key: getattr(self.cfg, key) for key in ("image_size", "center_crop", "hflip")}
        expect["split"] = split_spec(self.cfg)
        if src is not None:
            expect["source_signature"] = src.signature()
        return expect

    @staticmethod
    def split_tokens(meta: dict[str, Any]) -> dict[str, int]:
        return {split: rows * meta["seq_len"] for split, rows in meta["rows"].items()}

    def check_cache(self, cache: Path, meta: dict[str, Any]) -> None:
        check_tokenizer(cache, meta, self.cfg, self.vq.sha256())
        check_seq_len(self.cfg, *meta["grid"])
        if meta["max_id"] >= meta["vocab_size"]:
            raise ValueError(f"token cache {cache} holds id {meta['max_id']} >= vocab_size {meta['vocab_size']}: delete it")

    def check_overwrite(self, cache: Path, meta: dict[str, Any]) -> None:
        check_tokenizer(cache, meta, self.cfg, self.vq.sha256())  # another tokenizer's cache is refused

    def build_cache_into(self, build: Build, src: ImageSource) -> dict[str, Any]:
        return build_cache(self.cfg, build, src, self.vq.model(), self.vq.info(self.cfg.image_size))

    def data_fingerprint(self) -> dict[str, Any]:
        return {"tokenizer": self.vq.sha256(), "vocab_size": self.vocab_size, "grid": list(self.grid_shape)}

    def check_available(self) -> None:
        """Fail within seconds, before any training machinery starts, when the tokenizer is missing or there
        is neither a complete token cache nor the images (one error names both when both are missing)."""
        try:
            self.vq.check_file()
        except FileNotFoundError as tok_error:
            if read_meta(self.cache_path) is None and not is_hub_source(self.cfg.source):
                try:
                    resolve_source(self.cfg.source)
                except FileNotFoundError as data_error:
                    raise FileNotFoundError(f"two things are missing. (1) {tok_error} (2) {data_error}") from None
            raise
        if self.complete(self.cache_path):
            h, w = read_meta(self.cache_path)["grid"]
            if self.cfg.seq_len != h * w:
                raise ValueError(
                    f"data.seq_len={self.cfg.seq_len}, but the cached token grids are {h}x{w}: set data.seq_len={h * w}"
                )
            return
        if is_hub_source(self.cfg.source):
            name, _ = parse_hf(self.cfg.source)
            if not hub_reachable(self.cfg.hf_offline_timeout_s) and not hf_cached(name):
                raise HubUnreachableError(offline_message(name))
        else:
            resolve_source(self.cfg.source)
        check_seq_len(self.cfg, *self.vq.info(self.cfg.image_size)["grid"])

    def setup(self, stage: str | None = None) -> None:
        meta, cache = self._load_meta(), self.cache_path
        world = rank_world(self.trainer)[1]
        L_, n_val = meta["seq_len"], meta["rows"]["val"]
        self.train_set = TokenWindows(cache / "train.bin", "uint16", meta["rows"]["train"] * L_, L_)
        if len(self.train_set) < world:
            raise ValueError(f"{len(self.train_set)} training images for {world} ranks: each rank needs at least one")
        self.val_set = TokenWindows(cache / "val.bin", "uint16", n_val * L_, L_) if n_val else None
        if self.val_set is not None and n_val < world:
            raise ValueError(f"{n_val} validation images for {world} ranks: raise data.val_size (or val_fraction)")

    def val_tokens(self, n: int) -> torch.Tensor | None:
        """The first ``n`` validation token rows ``[n, h*w]`` (None without validation)."""
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return None
        k, L_ = min(n, len(self.val_set)), self.val_set.seq_len
        return torch.from_numpy(np.asarray(self.val_set.data()[: k * L_]).reshape(k, L_).astype(np.int64))

    def decode_images(self, ids: Any) -> np.ndarray:
        return self.vq.decode(ids, self.grid_shape)
