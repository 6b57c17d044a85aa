"""Images as VQ token grids: image sources, a one-time token cache (memmap) and a resumable DataModule.

Sources (``data.source``): a folder of ``.png/.jpg/.jpeg/.webp`` images (searched recursively, sorted by
relative path), a ``.zip`` of such images (sorted by name), a ``.npz`` holding ``images`` uint8
``[N, H, W, 3]``, or a Hugging Face dataset ``hf:NAME[:split]`` (column ``image``, split ``train`` by
default). Every image is made RGB (transparency composited on white), centre-cropped to a square
(``center_crop``; else squashed to one) and resized with PIL bicubic (antialiased when shrinking) to
``image_size`` when its size differs.

The images are tokenised once by the VQ tokenizer (``data.tokenizer``: a taming ``.ckpt`` or a
``glauber train-vq`` ``vq.ckpt``, loaded with ``glauber.nn.vq.load_vq``) into
``<cache_dir>/<source>-<S>px[-nocrop][-hflip]-<tokenizer name>-<hash of its path>[-<content digest>]/``
(the digest, a sha256 over a local source's images, changes when an image is edited)::

    train.bin, val.bin   uint16 token ids, one row of h*w ids per image (raster order)
    unigram.npy          int64 [V] token counts over train.bin
    meta.json            source, its signature, image settings, split, tokenizer (path, sha256, grid), counts

meta.json is written last (every file goes to a temporary name first and is renamed when complete),
so an interrupted build has none and is redone. A cache whose tokenizer sha256 is not the configured
tokenizer's (e.g. the VQ checkpoint was retrained in place) is refused, never mixed.

Validation: ``val_size`` images when given, else ``round(val_fraction * N)``, drawn by a fixed seeded
permutation (``SPLIT_SEED``, independent of ``seed``, which orders training); the rest, in source
order, is the train split. ``hflip=True`` stores every train image twice, as rows ``2i`` (the image)
and ``2i + 1`` (its mirror): flipping must happen on pixels, since a VQ codebook is not mirror
symmetric; validation images are not flipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules.cachelock import build_lock
from data_modules.fingerprint import file_sha256, json_digest, newest_cache
from data_modules.sampling import ResumableSampler, ShardedLoaders, rank_world
from data_modules.text import _hf_cached, _hf_offline, _say, read_meta, ready_meta, source_slug
from data_modules.tokenizers import HubUnreachableError, hub_reachable
from glauber.nn.vq import load_vq

FORMAT_VERSION = 2  # 2: the source signature and the cache key hold a sha256 of the images
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SPLIT_SEED = 0  # the train/validation split never depends on data.seed
HF_PREFIX = "hf:"
HF_IMAGE_COLUMNS = ("image", "img")


@dataclass
class ImageDataConfig:
    """Images, the VQ tokenizer that turns them into token grids, and the split (see data_modules/images.py)."""

    source: str = ""  # image folder | .zip | .npz with 'images' uint8 [N,H,W,3] | hf:NAME[:split]
    tokenizer: str = ""  # VQ checkpoint: a taming .ckpt or glauber's vq.ckpt
    image_size: int = 256  # images are centre-cropped and resized to image_size x image_size
    center_crop: bool = True  # false: squash to a square instead of cropping
    hflip: bool = False  # also cache the mirror image of every train image (rows 2i, 2i+1)
    seq_len: int = 256  # tokens per image, h*w of the tokenizer's grid (checked)
    val_fraction: float = 0.05  # fraction of the images held out for validation
    val_size: int | None = None  # number of validation images (overrides val_fraction)
    cache_dir: str = "cache"  # where token grids are cached (shared by all nodes in multi-node runs)
    num_workers: int = 0  # DataLoader workers (training, and reading images for the one-time tokenisation)
    seed: int = 0  # training order
    encode_batch_size: int = 64  # images per VQ encoder call while building the cache
    encode_device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    hf_offline_timeout_s: float = 3.0  # how long to wait for huggingface.co before declaring no internet


# -- images ----------------------------------------------------------------------------------------
def _to_rgb(img: Any) -> Any:
    """A PIL image in RGB; transparency (RGBA, LA, P with a transparent colour) is composited on white."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_image(img: Any, image_size: int | None, center_crop: bool = True) -> np.ndarray:
    """uint8 ``[S, S, 3]`` of a PIL image or an array ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``:
    RGB on white, centre-cropped to a square (or squashed when ``center_crop`` is false), then
    resized with bicubic filtering (PIL's, antialiased when shrinking) if the size differs.
    ``image_size=None``: RGB on white only, at the image's own size."""
    from PIL import Image

    S = image_size
    if isinstance(img, np.ndarray):
        if img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and (S is None or img.shape[:2] == (S, S)):
            return img
        if img.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (got {img.dtype})")
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] in (1, 3, 4))):
            raise ValueError(f"image arrays must be [H, W], [H, W, 3] or [H, W, 4] (got shape {img.shape})")
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img)
    img = _to_rgb(img)
    if S is None:
        return np.asarray(img, dtype=np.uint8)
    w, h = img.size
    if center_crop and w != h:
        m = min(w, h)
        left, top = (w - m) // 2, (h - m) // 2
        img = img.crop((left, top, left + m, top + m))
    if img.size != (S, S):
        img = img.resize((S, S), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _resolve(source: str) -> Path:
    """The path a local source names (relative: the working directory, then the project root)."""
    p = Path(source).expanduser()
    bases = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for base in dict.fromkeys(bases):
        if base.exists():
            return base
    looked = " and ".join(str(b) for b in dict.fromkeys(bases))
    raise FileNotFoundError(
        f"image source {source!r} not found (looked for {looked}). Download the images and put them there, or point "
        f"data.source at them: a folder of {'/'.join(e[1:] for e in IMAGE_EXTS)} files (searched recursively), a .zip "
        "of such files, a .npz with an 'images' uint8 [N, H, W, 3] array, or hf:NAME[:split] for a Hugging Face "
        "dataset. The emoji set bundled with glauber is data/twemoji32.npz"
    )


def parse_hf(source: str) -> tuple[str, str]:
    """``hf:NAME[:split]`` -> ``(NAME, split)`` (split ``train`` by default)."""
    name, _, split = source[len(HF_PREFIX) :].partition(":")
    if not name:
        raise ValueError(f"data.source={source!r}: write hf:NAME or hf:NAME:split")
    return name, split or "train"


def _hf_offline_message(name: str) -> str:
    return (
        f"Hugging Face dataset {name!r} is needed but huggingface.co is unreachable (no internet?) and the HF cache "
        "does not hold it. Pass data.source=/path/to/a/local/image/folder (or a .zip / .npz of images), or build "
        "the token cache on a machine with internet and copy it to the same data.cache_dir here"
    )


def folder_images(root: Path) -> list[Path]:
    """The image files under ``root`` (searched recursively), sorted by relative path."""
    files = [f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def content_digest(path: Path) -> str:
    """sha256 of a local source's content: of the .zip/.npz file, or over the image files of a folder in
    sorted order (with their relative names). Part of the token cache's key and of meta.json."""
    if path.is_dir():
        return json_digest([[f.relative_to(path).as_posix(), file_sha256(f)] for f in folder_images(path)])
    return file_sha256(path)


class ImageSource(Dataset):
    """Random access to the images of a source, each returned as uint8 ``[S, S, 3]`` (``fit_image``;
    ``image_size=None``: RGB at their own sizes)."""

    kind = "?"

    def __init__(self, source: str, image_size: int | None, center_crop: bool = True):
        self.source, self.image_size, self.center_crop = source, image_size, center_crop

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, i: int) -> Any:
        """Image ``i`` as found (a PIL image or an array)."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:
        try:
            return fit_image(self.raw(i), self.image_size, self.center_crop)
        except (OSError, ValueError) as e:
            raise ValueError(f"image {i} of {self.source!r} ({self.name(i)}) cannot be read: {e}") from e

    def name(self, i: int) -> str:
        return f"#{i}"

    def signature(self) -> list[Any]:
        """What identifies the source's content cheaply: a change invalidates its token cache."""
        raise NotImplementedError


class FolderImages(ImageSource):
    kind = "folder"

    def __init__(self, root: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(source, image_size, center_crop)
        self.root = root
        self.files = folder_images(root)
        if not self.files:
            raise ValueError(f"image folder {root} holds no {'/'.join(IMAGE_EXTS)} files (searched recursively)")

    def __len__(self) -> int:
        return len(self.files)

    def raw(self, i: int) -> Any:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            img.load()
            return img

    def name(self, i: int) -> str:
        return str(self.files[i])

    def signature(self) -> list[Any]:
        return ["folder", len(self.files), sum(f.stat().st_size for f in self.files), content_digest(self.root)]


class ZipImages(ImageSource):
    kind = "zip"

    def __init__(self, path: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(source, image_size, center_crop)
        self.path = path
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXTS and not n.startswith("__MACOSX/")]
        self.names = sorted(names)
        if not self.names:
            raise ValueError(f"zip file {path} holds no {'/'.join(IMAGE_EXTS)} files")
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, i: int) -> Any:
        from PIL import Image

        if self._zip is None:  # opened once per process (DataLoader workers get their own)
            self._zip = zipfile.ZipFile(self.path)
        with self._zip.open(self.names[i]) as f, Image.open(f) as img:
            img.load()
            return img

    def name(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"

    def signature(self) -> list[Any]:
        return ["zip", self.path.name, self.path.stat().st_size, content_digest(self.path)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}


class ArrayImages(ImageSource):
    kind = "npz"

    def __init__(self, path: Path, source: str, image_size: int | None, center_crop: bool = True):
        super().__init__(source, image_size, center_crop)
        self.path = path
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise ValueError(f"{path} has no 'images' array (arrays: {z.files}); save one as uint8 [N, H, W, 3]")
            self.images = z["images"]
        a = self.images
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] not in (1, 3, 4) or len(a) == 0:
            raise ValueError(f"{path}: 'images' must be a non-empty uint8 [N, H, W, 3] array (got {a.dtype} {a.shape})")

    @property
    def ready(self) -> bool:
        """Whether the array is already RGB at ``image_size`` (then it is used as it is)."""
        S = self.image_size
        return self.images.shape[3] == 3 and (S is None or self.images.shape[1:3] == (S, S))

    def __len__(self) -> int:
        return len(self.images)

    def raw(self, i: int) -> Any:
        return self.images[i]

    def signature(self) -> list[Any]:
        return ["npz", self.path.name, self.path.stat().st_size, content_digest(self.path)]


class HubImages(ImageSource):
    kind = "hf"

    def __init__(self, source: str, image_size: int | None, center_crop: bool = True, timeout_s: float = 3.0):
        super().__init__(source, image_size, center_crop)
        from datasets import load_dataset

        self.hf_name, self.split = parse_hf(source)
        if hub_reachable(timeout_s):
            ds = load_dataset(self.hf_name, split=self.split)
        elif _hf_cached(self.hf_name):
            try:
                with _hf_offline():
                    ds = load_dataset(self.hf_name, split=self.split)
            except Exception as e:  # datasets raises many kinds here
                raise HubUnreachableError(
                    f"{_hf_offline_message(self.hf_name)} (offline load from the HF cache failed: {e})"
                ) from e
        else:
            raise HubUnreachableError(_hf_offline_message(self.hf_name))
        column = next((c for c in HF_IMAGE_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise ValueError(f"Hugging Face dataset {self.hf_name!r} has no 'image' column (columns: {ds.column_names})")
        self.ds = ds.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.ds)

    def raw(self, i: int) -> Any:
        return self.ds[int(i)][self.column]

    def signature(self) -> list[Any]:
        return ["hf", self.hf_name, self.split, len(self.ds)]


def is_hub_source(source: str) -> bool:
    return source.startswith(HF_PREFIX)


def open_source(source: str, image_size: int | None, center_crop: bool = True, timeout_s: float = 3.0) -> ImageSource:
    """The ``ImageSource`` that ``source`` names (see the module docstring); FileNotFoundError when missing."""
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be >= 1 (got {image_size})")
    if not source:
        raise ValueError("data.source is empty: set it to an image folder, a .zip or .npz of images, or hf:NAME[:split]")
    if is_hub_source(source):
        return HubImages(source, image_size, center_crop, timeout_s)
    path = _resolve(source)
    if path.is_dir():
        return FolderImages(path, source, image_size, center_crop)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return ZipImages(path, source, image_size, center_crop)
    if suffix == ".npz":
        return ArrayImages(path, source, image_size, center_crop)
    raise ValueError(f"image source {path}: expected a folder, a .zip or a .npz (got a {suffix or 'extension-less'} file)")


def _stack(batch: list[np.ndarray]) -> np.ndarray:
    return np.stack(batch)


def load_images(source: str, image_size: int, center_crop: bool = True, progress: bool = True) -> np.ndarray:
    """Every image of ``source`` as uint8 ``[N, S, S, 3]`` (see ``fit_image``), with a progress bar
    for folders, zips and hub datasets."""
    src = open_source(source, image_size, center_crop)
    if isinstance(src, ArrayImages) and src.ready:
        return src.images
    from tqdm.auto import tqdm

    out = np.empty((len(src), image_size, image_size, 3), dtype=np.uint8)
    show = progress and not isinstance(src, ArrayImages)
    for i in tqdm(range(len(src)), desc=f"reading {source}", unit="img", disable=not show, mininterval=1.0):
        out[i] = src[i]
    return out


# -- the tokenizer -------------------------------------------------------------------------------------
def tokenizer_vocab(tok: Any) -> int:
    """The codebook size of a VQ tokenizer (``vocab_size``, ``n_embed`` or ``config.n_embed``)."""
    for get in (lambda: tok.vocab_size, lambda: tok.n_embed, lambda: tok.config.n_embed):
        try:
            return int(get())
        except AttributeError:
            continue
    raise ValueError(f"tokenizer {type(tok).__name__} has no vocab_size / n_embed")


def token_grid(tok: Any, image_size: int) -> tuple[int, int]:
    """The token grid ``(h, w)`` an ``image_size`` image becomes: ``S / downsample_factor`` when the
    tokenizer states its factor, else its ``grid_shape``."""
    f = getattr(tok, "downsample_factor", None)
    if f:
        if image_size % f:
            raise ValueError(f"data.image_size={image_size} is not divisible by the tokenizer's downsampling factor {f}")
        return image_size // f, image_size // f
    h, w = tok.grid_shape
    return int(h), int(w)


def _object_sha256(tok: Any) -> str:
    """A hash of a tokenizer object's weights (when no checkpoint file identifies it)."""
    if isinstance(tok, torch.nn.Module):
        h = hashlib.sha256()
        for k, v in sorted(tok.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    raise ValueError(f"tokenizer object {type(tok).__name__} needs a sha256 attribute (or be an nn.Module) to key its cache")


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


def stale_reason(cache: Path, meta: dict[str, Any] | None, cfg: ImageDataConfig, signature: list[Any] | None) -> str | None:
    """Why the cache at ``cache`` must be (re)built, or None when it can be used."""
    if meta is None:
        return "no completed build (meta.json missing)"
    if meta.get("format") != FORMAT_VERSION:
        return f"cache format {meta.get('format')} != {FORMAT_VERSION}"
    for key in ("image_size", "center_crop", "hflip"):
        if meta.get(key) != getattr(cfg, key):
            return f"data.{key} changed ({meta.get(key)} -> {getattr(cfg, key)})"
    if meta.get("split") != split_spec(cfg):
        return f"split settings changed ({meta.get('split')} -> {split_spec(cfg)})"
    if signature is not None and meta.get("source_signature") != signature:
        return f"the source images changed ({meta.get('source_signature')} -> {signature})"
    for split in ("train", "val"):
        path = cache / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta["rows"][split] * meta["seq_len"] * 2:
            return f"{path.name} is missing or has the wrong size"
    if not (cache / "unigram.npy").is_file():
        return "unigram.npy is missing"
    return None


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


def _encode(tok: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    """int64 ``[B, h, w]`` token ids of uint8 ``[B, S, S, 3]`` images."""
    ids = tok.encode_to_ids(np.ascontiguousarray(images), batch_size=batch_size)
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if ids.ndim != 3 or len(ids) != len(images):
        raise ValueError(f"the tokenizer's encode_to_ids gave shape {ids.shape} for {len(images)} images (want [N, h, w])")
    return ids.astype(np.int64, copy=False)


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


def build_cache(cfg: ImageDataConfig, cache: Path, src: ImageSource, tok: Any, tok_info: dict[str, Any]) -> dict[str, Any]:
    """Tokenise the images of ``src`` into ``cache`` (see the module docstring); returns the meta written last."""
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
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "meta.json").unlink(missing_ok=True)  # the old build is invalid from here on
    for leftover in cache.glob("*.tmp*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    tag = f"tmp{os.getpid()}"
    train_idx, val_idx = split_indices(len(src), cfg)
    device = _device(cfg.encode_device)
    params = list(tok.parameters()) if isinstance(tok, torch.nn.Module) else []
    home = params[0].device if params else None
    if home is not None and home != device:
        tok.to(device)
    _say(f"tokenising {len(src):,} images of {cfg.source!r} ({cfg.image_size}px, {h}x{w} tokens) on {device} into {cache}")
    counts = {"train": 0, "val": 0}
    unigram = np.zeros(V, dtype=np.int64)
    max_id = -1
    try:
        for split, idx in (("train", train_idx), ("val", val_idx)):
            path = cache / f"{split}.bin.{tag}"
            loader = DataLoader(
                _Picked(src, idx), batch_size=cfg.encode_batch_size, num_workers=cfg.num_workers, collate_fn=_stack
            )
            with open(path, "wb") as f, tqdm(total=len(idx), desc=f"tokenising {split}", unit="img", mininterval=1.0) as bar:
                for batch in loader:
                    ids = _encode(tok, batch, cfg.encode_batch_size)
                    if ids.shape[1:] != (h, w):
                        raise ValueError(f"the tokenizer gave {ids.shape[1]}x{ids.shape[2]} token grids, expected {h}x{w}")
                    rows = ids.reshape(len(ids), L_)
                    if split == "train" and cfg.hflip:
                        flipped = _encode(tok, batch[:, :, ::-1], cfg.encode_batch_size).reshape(len(ids), L_)
                        rows = np.stack([rows, flipped], axis=1).reshape(-1, L_)  # rows 2i, 2i+1: image i, its mirror
                    lo, hi = int(rows.min()), int(rows.max())
                    if lo < 0 or hi >= V:
                        raise ValueError(f"the tokenizer produced id {lo if lo < 0 else hi} outside [0, {V})")
                    max_id = max(max_id, hi)
                    if split == "train":
                        unigram += np.bincount(rows.reshape(-1), minlength=V)
                    f.write(rows.astype(np.uint16).tobytes())
                    counts[split] += len(rows)
                    bar.update(len(batch))
                f.flush()
                os.fsync(f.fileno())
    finally:
        if home is not None and home != device:
            tok.to(home)
    np.save(cache / f"unigram.{tag}.npy", unigram)
    for split in ("train", "val"):
        os.replace(cache / f"{split}.bin.{tag}", cache / f"{split}.bin")
    os.replace(cache / f"unigram.{tag}.npy", cache / "unigram.npy")
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
        "max_id": max_id,
        "tokenizer": tok_info,
        "unigram": "unigram.npy",
    }
    tmp = cache / f"meta.json.{tag}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, cache / "meta.json")
    _say(f"token cache ready: {cache} (train {counts['train']:,}, val {counts['val']:,} rows of {L_} tokens)")
    return meta


# -- reading ----------------------------------------------------------------------------------------
class TokenRows(Dataset):
    """LongTensor ``[seq_len]`` rows of a uint16 token file (memmap opened lazily in each process)."""

    def __init__(self, path: Path, num_rows: int, seq_len: int):
        self.path, self.num_rows, self.seq_len = Path(path), num_rows, seq_len
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_rows

    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint16, mode="r", shape=(self.num_rows, self.seq_len))
        return self._data

    def __getitem__(self, k: int) -> torch.Tensor:
        if not 0 <= k < self.num_rows:
            raise IndexError(f"row {k} out of range [0, {self.num_rows})")
        return torch.from_numpy(self.data()[k].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}


class ImageTokenDataModule(ShardedLoaders, L.LightningDataModule):
    """VQ token grids of images, ``[B, h*w]`` LongTensors in raster order, sharded over DDP ranks and
    resumable mid-run (the same contract as ``TextDataModule``).

    ``tokenizer``: a ready tokenizer object (``encode_to_ids``, ``decode_ids``, ``to_uint8``,
    ``grid_shape``, ``vocab_size``/``n_embed``; keyed by its ``sha256`` attribute or its weights) used
    instead of loading ``cfg.tokenizer`` with ``glauber.nn.vq.load_vq`` (tests, notebooks).
    """

    def __init__(
        self,
        cfg: ImageDataConfig,
        batch_size: int,
        max_train_samples: int | None = None,
        val_batch_size: int | None = None,
        tokenizer: Any | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
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
        self.cfg = cfg
        # Global rank 0 alone builds the cache (as in text): one builder per shared cache.
        self.prepare_data_per_node = False
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_train_samples = max_train_samples
        self._given = self._tok = tokenizer
        self._sha: str | None = None
        self._tok_info: dict[str, Any] | None = None
        self._consumed = 0
        self._meta: dict[str, Any] | None = None
        self._cache_path: Path | None = None
        self._sampler: ResumableSampler | None = None
        self.train_set: TokenRows | None = None
        self.val_set: TokenRows | None = None

    # -- the tokenizer ------------------------------------------------------------------------------
    def _tokenizer_path(self) -> Path | None:
        if not self.cfg.tokenizer:
            return None
        p = Path(self.cfg.tokenizer).expanduser()
        if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
            p = PROJECT_ROOT / p
        return p.resolve()

    def _check_tokenizer_file(self) -> None:
        path = self._tokenizer_path()
        if self._tok is None and (path is None or not path.is_file()):
            raise FileNotFoundError(
                f"VQ tokenizer data.tokenizer={self.cfg.tokenizer!r} not found ({path}): train one with `glauber train-vq` "
                "or download a taming-transformers VQGAN (the paper's setting: vqgan_imagenet_f16_16384 from "
                "https://github.com/CompVis/taming-transformers, 'ImageNet (f=16), 16384'), keeping its layout "
                "NAME/checkpoints/last.ckpt + NAME/configs/model.yaml, and point data.tokenizer at the .ckpt"
            )

    def tokenizer_model(self) -> Any:
        """The VQ tokenizer (loaded from ``data.tokenizer`` once, in eval mode, on the CPU)."""
        if self._tok is None:
            self._check_tokenizer_file()
            self._tok = load_vq(self._tokenizer_path())
        return self._tok

    def tokenizer_sha256(self) -> str:
        """What identifies the tokenizer: its checkpoint file's sha256; for a tokenizer object, its
        ``sha256`` attribute, else the file's when ``data.tokenizer`` names one, else a hash of its weights."""
        if self._sha is None:
            path, given = self._tokenizer_path(), self._given
            if given is None:
                self._check_tokenizer_file()
                self._sha = file_sha256(path)
            elif isinstance(getattr(given, "sha256", None), str):
                self._sha = given.sha256
            elif path is not None and path.is_file():
                self._sha = file_sha256(path)
            else:
                self._sha = _object_sha256(given)
        return self._sha

    def tokenizer_info(self) -> dict[str, Any]:
        """Path, name, sha256, token grid, vocabulary and image size of the tokenizer (loads it; recorded in meta.json)."""
        if self._tok_info is None:
            path, tok = self._tokenizer_path(), self.tokenizer_model()
            h, w = token_grid(tok, self.cfg.image_size)
            self._tok_info = {
                "kind": "vq",
                "path": str(path) if path is not None else None,
                "name": path.name if path is not None else str(getattr(tok, "name", type(tok).__name__)),
                "sha256": self.tokenizer_sha256(),
                "grid": [h, w],
                "vocab_size": tokenizer_vocab(tok),
                "image_size": self.cfg.image_size,
            }
        return self._tok_info

    def tokenizer_state(self) -> dict[str, Any]:
        """What a checkpoint needs to decode its samples without the data: the VQ checkpoint's path,
        sha256 and token grid (``glauber.eval.images.vq_of`` reloads and verifies it). Read from the cache's
        meta.json, so ranks that never decode do not load the VQ model."""
        meta = self._load_meta()
        path = self._tokenizer_path()
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
        path = self._tokenizer_path()
        if path is not None:
            tok_key = f"{source_slug(path.stem)[:40]}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        else:
            tok_key = source_slug(str(getattr(self._tok, "name", type(self._tok).__name__)))[:40]
        parts = [source_slug(cfg.source), f"{cfg.image_size}px"]
        parts += [] if cfg.center_crop else ["nocrop"]
        parts += ["hflip"] if cfg.hflip else []
        root, base = Path(cfg.cache_dir).expanduser(), "-".join([*parts, tok_key])
        cache = root / base
        if not is_hub_source(cfg.source):
            try:
                cache = root / f"{base}-{content_digest(_resolve(cfg.source))[:12]}"
            except FileNotFoundError:
                newest, n = newest_cache(root, base, lambda d: stale_reason(d, read_meta(d), cfg, None) is None)
                if n > 1:
                    _say(f"the images of {cfg.source!r} are missing: using their newest token cache {newest} (of {n})")
                cache = newest or root / f"{base}-missing"
        self._cache_path = cache
        return cache

    def _open_source(self) -> ImageSource:
        c = self.cfg
        return open_source(c.source, c.image_size, c.center_crop, c.hf_offline_timeout_s)

    def prepare_data(self) -> None:
        """Build the token cache unless a complete, matching one exists (global rank 0 runs this, holding the build lock)."""
        cache = self.cache_path
        meta = read_meta(cache)
        try:
            src: ImageSource | None = self._open_source()
        except (FileNotFoundError, HubUnreachableError):
            if meta is not None and stale_reason(cache, meta, self.cfg, None) is None:
                src = None  # the images are gone but their complete cache is here: use it
            else:
                raise
        sha = self.tokenizer_sha256()
        reason = stale_reason(cache, meta, self.cfg, src.signature() if src is not None else None)
        if reason is None:
            check_meta(cache, meta, self.cfg, sha)
            return
        if meta is not None:
            check_tokenizer(cache, meta, self.cfg, sha)  # another tokenizer's cache is refused, not overwritten
        with build_lock(cache):  # another process may be building it: wait, then look again
            meta = read_meta(cache)
            reason = stale_reason(cache, meta, self.cfg, src.signature() if src is not None else None)
            if reason is None:
                _say(f"{cache} was built by another process meanwhile: using it")
                check_meta(cache, meta, self.cfg, sha)
                return
            if meta is not None:
                check_tokenizer(cache, meta, self.cfg, sha)
                _say(f"rebuilding {cache}: {reason}")
            build_cache(self.cfg, cache, src, self.tokenizer_model(), self.tokenizer_info())

    def data_fingerprint(self) -> dict[str, Any]:
        """What the token ids mean (stored in checkpoints; a resume on other data is refused)."""
        return {"tokenizer": self.tokenizer_sha256(), "vocab_size": self.vocab_size, "grid": list(self.grid_shape)}

    def check_available(self) -> None:
        """Fail within seconds, before any training machinery starts, when the data cannot be had:
        the tokenizer must exist, and either a complete token cache or the images. When both are missing,
        one error names both."""
        try:
            self._check_tokenizer_file()
        except FileNotFoundError as tok_error:
            if read_meta(self.cache_path) is None and not is_hub_source(self.cfg.source):
                try:
                    _resolve(self.cfg.source)
                except FileNotFoundError as data_error:
                    raise FileNotFoundError(f"two things are missing. (1) {tok_error} (2) {data_error}") from None
            raise
        meta = read_meta(self.cache_path)
        if meta is not None and stale_reason(self.cache_path, meta, self.cfg, None) is None:
            h, w = meta["grid"]
            if self.cfg.seq_len != meta["seq_len"]:
                raise ValueError(
                    f"data.seq_len={self.cfg.seq_len}, but the cached token grids are {h}x{w}: set data.seq_len={h * w}"
                )
            return
        if is_hub_source(self.cfg.source):
            name, _ = parse_hf(self.cfg.source)
            if not hub_reachable(self.cfg.hf_offline_timeout_s) and not _hf_cached(name):
                raise HubUnreachableError(_hf_offline_message(name))
        else:
            _resolve(self.cfg.source)
        h, w = self.tokenizer_info()["grid"]
        if h * w != self.cfg.seq_len:
            raise ValueError(
                f"data.seq_len={self.cfg.seq_len}, but the tokenizer turns {self.cfg.image_size}px images into {h}x{w} = "
                f"{h * w} tokens: set data.seq_len={h * w}"
            )

    def _load_meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = ready_meta(
                self,
                lambda cache, meta: stale_reason(cache, meta, self.cfg, None),
                lambda cache, meta: check_meta(cache, meta, self.cfg, self.tokenizer_sha256()),
            )
        return self._meta

    # -- datasets and loaders ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        meta, cache = self._load_meta(), self.cache_path
        world = rank_world(self.trainer)[1]
        L_ = meta["seq_len"]
        self.train_set = TokenRows(cache / "train.bin", meta["rows"]["train"], L_)
        if len(self.train_set) < world:
            raise ValueError(f"{len(self.train_set)} training images for {world} ranks: each rank needs at least one")
        n_val = meta["rows"]["val"]
        self.val_set = TokenRows(cache / "val.bin", n_val, L_) if n_val else None
        if self.val_set is not None and n_val < world:
            raise ValueError(f"{n_val} validation images for {world} ranks: raise data.val_size (or val_fraction)")

    def val_tokens(self, n: int) -> torch.Tensor | None:
        """The first ``n`` validation token rows ``[n, h*w]`` (None without a validation split)."""
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return None
        k = min(n, len(self.val_set))
        return torch.from_numpy(np.asarray(self.val_set.data()[:k]).astype(np.int64))

    def token_counts(self) -> torch.Tensor:
        """float64 ``[V]`` token counts over the train split (for the unigram noise law)."""
        self._load_meta()
        return torch.from_numpy(np.load(self.cache_path / "unigram.npy")).double()

    # -- pictures -----------------------------------------------------------------------------------
    def decode_images(self, ids: Any) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` images of token ids ``[N, h*w]`` (or ``[N, h, w]``) through the VQ decoder."""
        tok = self.tokenizer_model()
        h, w = self.grid_shape
        ids = torch.as_tensor(ids, dtype=torch.long)
        params = list(tok.parameters()) if isinstance(tok, torch.nn.Module) else []
        if params:
            ids = ids.to(params[0].device)
        with torch.no_grad():
            imgs = tok.to_uint8(tok.decode_ids(ids.reshape(-1, h, w)))
        return imgs.cpu().numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
