"""Images as VQ token grids: a one-time token cache (memmap) of an image source, and a resumable DataModule.

The images of ``data.source`` (``data_modules.image_sources``, fitted to ``image_size``) are tokenised
once by the VQ tokenizer ``data.tokenizer`` (``data_modules.vq_tokenizer``) into a token cache
(``data_modules.token_cache``) at
``<cache_dir>/<source>-<S>px[-nocrop][-hflip]-<tokenizer name>-<hash of its path>[-<content digest>]/``:
one row of h*w uint16 ids per image (raster order). The digest, a sha256 over a local source's images,
changes when an image is edited. A cache of another tokenizer (its sha256 differs, e.g. the checkpoint
was retrained in place) is refused, never mixed.

Validation: ``val_size`` images when given, else ``round(val_fraction * N)``, drawn by a fixed seeded
permutation (``SPLIT_SEED``, independent of ``seed``); the rest, in source order, is the train split.
``hflip=True`` stores every train image twice, as rows ``2i`` (the image) and ``2i + 1`` (its mirror):
a VQ codebook is not mirror symmetric, so flipping happens on pixels; validation images are not flipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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

__all__ = ["ImageDataConfig", "ImageTokenDataModule", "_resolve", "fit_image", "load_images", "open_source"]

FORMAT_VERSION = 3  # 2: sha256 of the images in the source signature and cache key; 3: PIL.ImageOps.fit crops
SPLIT_SEED = 0  # the train/validation split never depends on data.seed
_resolve = resolve_source  # the old name, still imported by glauber.eval.fid


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


# -- the cache -----------------------------------------------------------------------------------------
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


def check_tokenizer(cache: Path, meta: dict[str, Any], cfg: ImageDataConfig, sha256: str) -> None:
    """Refuse a cache made by another tokenizer (the sha256 of its checkpoint differs)."""
    recorded = meta["tokenizer"]
    if recorded["sha256"] != sha256:
        raise ValueError(
            f"token cache {cache} was built with another VQ tokenizer ({recorded.get('path') or recorded.get('name')}, "
            f"sha256 {recorded['sha256'][:12]}) than data.tokenizer={cfg.tokenizer or recorded.get('name')!r} "
            f"(sha256 {sha256[:12]}); tokens of two tokenizers are never mixed: delete {cache} to re-tokenise the "
            "images, or set data.cache_dir elsewhere"
        )


def check_meta(cache: Path, meta: dict[str, Any], cfg: ImageDataConfig, sha256: str) -> None:
    """Refuse a cache made by another tokenizer, for another sequence length, or holding ids outside the vocabulary."""
    check_tokenizer(cache, meta, cfg, sha256)
    h, w = meta["grid"]
    if cfg.seq_len != meta["seq_len"]:
        raise ValueError(
            f"data.seq_len={cfg.seq_len}, but the tokenizer turns {cfg.image_size}px images into {h}x{w} = "
            f"{meta['seq_len']} tokens: set data.seq_len={meta['seq_len']}"
        )
    if meta["max_id"] >= meta["vocab_size"]:
        raise ValueError(f"token cache {cache} holds id {meta['max_id']} >= vocab_size {meta['vocab_size']}: delete it")


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class _Picked(Dataset):
    def __init__(self, src: ImageSource, indices: np.ndarray):
        self.src, self.indices = src, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.src[int(self.indices[k])]


def build_cache(cfg: ImageDataConfig, build: Build, src: ImageSource, tok: Any, tok_info: dict[str, Any]) -> dict[str, Any]:
    """Tokenise the images of ``src`` into ``build``'s cache (see the module docstring); returns the meta committed last."""
    from tqdm.auto import tqdm

    h, w = tok_info["grid"]
    L_, V = h * w, tok_info["vocab_size"]
    if L_ != cfg.seq_len:
        raise ValueError(
            f"data.seq_len={cfg.seq_len}, but the tokenizer turns {cfg.image_size}px images into {h}x{w} = {L_} tokens: "
            f"set data.seq_len={L_}"
        )
    if V > 65536:
        raise ValueError(f"the tokenizer's codebook has {V} entries; the uint16 token cache holds at most 65536")
    train_idx, val_idx = split_indices(len(src), cfg)
    device = _device(cfg.encode_device)
    params = list(tok.parameters()) if isinstance(tok, torch.nn.Module) else []
    home = params[0].device if params else None
    if home is not None and home != device:
        tok.to(device)
    say(f"tokenising {len(src):,} images of {cfg.source!r} ({cfg.image_size}px, {h}x{w} tokens) on {device} into {build.cache}")
    writer = TokenWriter(build, V)
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            loader = DataLoader(
                _Picked(src, idx), batch_size=cfg.encode_batch_size, num_workers=cfg.num_workers, collate_fn=np.stack
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
    meta = build.commit(
        {
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
    )
    say(f"token cache ready: {build.cache} (train {counts['train']:,}, val {counts['val']:,} rows of {L_} tokens)")
    return meta


class ImageTokenDataModule(TokenCacheModule, ShardedLoaders, L.LightningDataModule):
    """VQ token grids of images, ``[B, h*w]`` LongTensors in raster order, sharded over DDP ranks and
    resumable mid-run (the same contract as ``TextDataModule``).

    ``tokenizer``: a ready tokenizer object (``encode_to_ids``, ``decode_ids``, ``to_uint8``,
    ``grid_shape``, ``vocab_size``/``n_embed``; keyed by its ``sha256`` attribute or its weights) used
    instead of loading ``cfg.tokenizer`` with ``glauber.nn.vq.load_vq`` (tests, notebooks).
    """

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
        if cfg.image_size < 1:
            raise ValueError(f"data.image_size must be >= 1 (got {cfg.image_size})")
        if cfg.seq_len < 1:
            raise ValueError(f"data.seq_len must be >= 1 (got {cfg.seq_len})")
        if not 0 <= cfg.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1) (got {cfg.val_fraction})")
        if cfg.val_size is not None and cfg.val_size < 0:
            raise ValueError(f"data.val_size must be >= 0 (got {cfg.val_size})")
        if cfg.encode_batch_size < 1:
            raise ValueError(f"data.encode_batch_size must be >= 1 (got {cfg.encode_batch_size})")
        if not cfg.source:
            raise ValueError("data.source is empty: set it to an image folder, a .zip or .npz of images, or hf:NAME[:split]")
        if tokenizer is None and not cfg.tokenizer:
            raise ValueError("data.tokenizer is empty: set it to a VQ checkpoint (a taming .ckpt or a glauber vq.ckpt)")
        self.init_loading(cfg, batch_size, val_batch_size, max_train_samples)
        self.vq = VQTokenizer(cfg.tokenizer, tokenizer)

    # -- the tokenizer ------------------------------------------------------------------------------
    def tokenizer_model(self) -> Any:
        """The VQ tokenizer (loaded from ``data.tokenizer`` once, in eval mode, on the CPU)."""
        return self.vq.model()

    def tokenizer_sha256(self) -> str:
        """What identifies the tokenizer (see ``VQTokenizer.sha256``); keys and guards the cache."""
        return self.vq.sha256()

    def tokenizer_info(self) -> dict[str, Any]:
        """Path, name, sha256, token grid, vocabulary and image size of the tokenizer (recorded in meta.json)."""
        return self.vq.info(self.cfg.image_size)

    def tokenizer_state(self) -> dict[str, Any]:
        """What a checkpoint needs to decode its samples without the data: the VQ checkpoint's path,
        sha256 and token grid (``glauber.eval.images.vq_of`` reloads and verifies it). Read from the cache's
        meta.json, so ranks that never decode do not load the VQ model."""
        meta = self._load_meta()
        path = self.vq.path()
        state = {**meta["tokenizer"], "sha256": self.tokenizer_sha256()}
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

    # -- the cache ----------------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        """``<cache_dir>/<source slug>-<S>px[-nocrop][-hflip]-<tokenizer name>[-<hash of its path>][-<content digest>]``.

        A local source's key ends in the first 12 hex digits of ``content_digest`` (a sha256 over its
        images), so edited images get a new cache (the old one stays for runs still reading it). When the
        images are gone, the newest complete cache of that source and tokenizer is used."""
        if self._cache_path is not None:
            return self._cache_path
        cfg = self.cfg
        path = self.vq.path()
        if path is not None:
            tok_key = f"{source_slug(path.stem)[:40]}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        else:
            tok_key = source_slug(self.vq.name())[:40]
        parts = [source_slug(cfg.source), f"{cfg.image_size}px"]
        parts += [] if cfg.center_crop else ["nocrop"]
        parts += ["hflip"] if cfg.hflip else []
        root, base = Path(cfg.cache_dir).expanduser(), "-".join([*parts, tok_key])
        cache = root / base
        if not is_hub_source(cfg.source):
            try:
                cache = root / f"{base}-{content_digest(resolve_source(cfg.source))[:12]}"
            except FileNotFoundError:
                cache = self.newest_cache(root, base, "images")
        self._cache_path = cache
        return cache

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
        check_meta(cache, meta, self.cfg, self.tokenizer_sha256())

    def check_overwrite(self, cache: Path, meta: dict[str, Any]) -> None:
        check_tokenizer(cache, meta, self.cfg, self.tokenizer_sha256())  # another tokenizer's cache is refused

    def build_cache_into(self, build: Build, src: ImageSource) -> dict[str, Any]:
        return build_cache(self.cfg, build, src, self.tokenizer_model(), self.tokenizer_info())

    def data_fingerprint(self) -> dict[str, Any]:
        """What the token ids mean (stored in checkpoints; a resume on other data is refused)."""
        return {"tokenizer": self.tokenizer_sha256(), "vocab_size": self.vocab_size, "grid": list(self.grid_shape)}

    def check_available(self) -> None:
        """Fail within seconds, before any training machinery starts, when the data cannot be had:
        the tokenizer must exist, and either a complete token cache or the images. When both are missing,
        one error names both."""
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
            meta = read_meta(self.cache_path)
            h, w = meta["grid"]
            if self.cfg.seq_len != meta["seq_len"]:
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
        h, w = self.tokenizer_info()["grid"]
        if h * w != self.cfg.seq_len:
            raise ValueError(
                f"data.seq_len={self.cfg.seq_len}, but the tokenizer turns {self.cfg.image_size}px images into {h}x{w} = "
                f"{h * w} tokens: set data.seq_len={h * w}"
            )

    # -- datasets and loaders ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        meta, cache = self._load_meta(), self.cache_path
        world = rank_world(self.trainer)[1]
        L_ = meta["seq_len"]
        self.train_set = TokenWindows(cache / "train.bin", "uint16", meta["rows"]["train"] * L_, L_)
        if len(self.train_set) < world:
            raise ValueError(f"{len(self.train_set)} training images for {world} ranks: each rank needs at least one")
        n_val = meta["rows"]["val"]
        self.val_set = TokenWindows(cache / "val.bin", "uint16", n_val * L_, L_) if n_val else None
        if self.val_set is not None and n_val < world:
            raise ValueError(f"{n_val} validation images for {world} ranks: raise data.val_size (or val_fraction)")

    def val_tokens(self, n: int) -> torch.Tensor | None:
        """The first ``n`` validation token rows ``[n, h*w]`` (None without a validation split)."""
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return None
        k, L_ = min(n, len(self.val_set)), self.val_set.seq_len
        return torch.from_numpy(np.asarray(self.val_set.data()[: k * L_]).reshape(k, L_).astype(np.int64))

    # -- pictures -----------------------------------------------------------------------------------
    def decode_images(self, ids: Any) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` images of token ids ``[N, h*w]`` (or ``[N, h, w]``) through the VQ decoder."""
        return self.vq.decode(ids, self.grid_shape)
