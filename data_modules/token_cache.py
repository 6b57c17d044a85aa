"""The token cache shared by the text and image DataModules: a directory of flat token files, built once
and read through memmaps by every process and DataLoader worker::

    train.bin, val.bin   token ids (uint16 when V <= 65536, else uint32), back to back
    unigram.npy          int64 [V] token counts over train.bin
    meta.json            what was tokenised and how (written last: a cache without it is incomplete)

A build holds ``build_lock`` and renames its own temporaries into place, meta.json last.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.fingerprint import newest_cache
from data_modules.hub import HubUnreachableError
from data_modules.sampling import ResumableSampler, rank_world

SPLITS = ("train", "val")


def say(msg: str) -> None:
    print(f"[glauber.data] {msg}", file=sys.stderr, flush=True)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def source_slug(source: str, val_source: str | None = None) -> str:
    """A readable directory name for a source; long ones end in a short hash."""
    text = source if val_source is None else f"{source}+val={val_source}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "corpus"
    if len(slug) > 80:
        slug = slug[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return slug


def read_meta(cache: Path) -> dict[str, Any] | None:
    """``meta.json`` of a completed build, or None (no build, an interrupted one, or an unreadable file)."""
    try:
        return json.loads((cache / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@contextlib.contextmanager
def build_lock(cache: Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``<cache>.lock`` (kept: deleting it is racy), waiting for another builder first, so
    racing processes end with one build; yields False, building unlocked, where ``flock`` is unsupported (some Lustre)."""
    path = cache.parent / f"{cache.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        locked = True
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process building {cache}")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            locked = False
            say(
                f"warning: cannot lock {path} ({e.strerror}); building {cache} unlocked: "
                "do not build the same cache from two processes at once"
            )
        yield locked


class Build:
    """One build of the cache at ``cache``, entered holding its build lock: ``tmp(name)`` is this builder's
    temporary path for file ``name``, ``commit(meta)`` renames them into place, meta.json last; leaving the
    context removes this builder's leftover temporaries, never another's."""

    def __init__(self, cache: Path, exclusive: bool = True):
        self.cache, self.tag = cache, f"tmp{os.getpid()}"
        self.work = cache / f"work.{self.tag}"  # scratch space (e.g. arrow files of ``datasets``)
        self._pending: dict[str, Path] = {}
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "meta.json").unlink(missing_ok=True)  # the old build is invalid from here on
        if exclusive:  # under the lock: temporaries here are a dead builder's
            for leftover in cache.glob("*.tmp*"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        self.work.mkdir(exist_ok=True)

    def tmp(self, name: str) -> Path:
        path = self.cache / f"{name}.{self.tag}"
        self._pending[name] = path
        return path

    def commit(self, meta: dict[str, Any]) -> dict[str, Any]:
        for name, path in self._pending.items():
            os.replace(path, self.cache / name)
        self._pending.clear()
        path = self.cache / f"meta.json.{self.tag}"
        path.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        os.replace(path, self.cache / "meta.json")
        return meta

    def __enter__(self) -> Build:
        return self

    def __exit__(self, *exc: object) -> None:
        for path in self._pending.values():
            path.unlink(missing_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)


class TokenWriter:
    """Appends token ids to ``train.bin`` until ``cut`` tokens, then to ``val.bin``; counts train unigrams and the top id."""

    def __init__(self, build: Build, vocab_size: int, cut: int | None = None):
        self.build, self.dtype, self.cut = build, token_dtype(vocab_size), cut
        self.files = {s: open(build.tmp(f"{s}.bin"), "wb") for s in SPLITS}  # noqa: SIM115 - closed in close()
        self.counts = {s: 0 for s in SPLITS}
        self.unigram = np.zeros(vocab_size, dtype=np.int64)
        self.max_id = -1

    def write(self, split: str, ids: np.ndarray) -> None:
        if split == "train" and self.cut is not None:
            room = max(self.cut - self.counts["train"], 0)
            ids, rest = ids[:room], ids[room:]
            if len(rest):
                self.write("val", rest)
        if len(ids) == 0:
            return
        self.max_id = max(self.max_id, int(ids.max()))
        if split == "train":
            self.unigram += np.bincount(ids, minlength=len(self.unigram))[: len(self.unigram)]
        self.files[split].write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.counts[split] += len(ids)

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        with open(self.build.tmp("unigram.npy"), "wb") as f:
            np.save(f, self.unigram)


class TokenWindows(Dataset):
    """Fixed-length LongTensor sequences cut from a flat token file; ``wrap=bos_eos``: ``[BOS] + seq_len - 2 ids + [EOS]``."""

    def __init__(self, path: Path, dtype: str, num_tokens: int, seq_len: int, wrap="none", bos_id=None, eos_id=None):
        if wrap == "bos_eos" and (bos_id is None or eos_id is None):
            raise ValueError("data.wrap=bos_eos needs a tokenizer with BOS and EOS tokens (char has none): use data.wrap=none")
        self.path, self.dtype, self.num_tokens = Path(path), dtype, num_tokens
        self.seq_len, self.wrap, self.bos_id, self.eos_id = seq_len, wrap, bos_id, eos_id
        self.body = seq_len - 2 if wrap == "bos_eos" else seq_len
        self._data: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_tokens // self.body

    def data(self) -> np.ndarray:
        if self._data is None:  # opened lazily, once per process (memmaps must not be pickled to workers)
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._data

    def __getitem__(self, k: int) -> torch.Tensor:
        if not 0 <= k < len(self):
            raise IndexError(f"sequence {k} out of range [0, {len(self)})")
        ids = torch.from_numpy(self.data()[k * self.body : (k + 1) * self.body].astype(np.int64))
        if self.wrap == "bos_eos":
            ids = torch.cat([torch.tensor([self.bos_id]), ids, torch.tensor([self.eos_id])])
        return ids

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}


def blocks_of(path: Path, dtype: np.dtype, n: int, block: int = 1 << 22) -> Iterator[np.ndarray]:
    """The ``n`` ids of a flat token file, ``block`` at a time."""
    if n == 0:
        return
    arr = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    for i in range(0, n, block):
        yield np.asarray(arr[i : i + block])


class TokenCacheModule:
    """The token-cache half of a DataModule: builds the cache when missing or stale (``prepare_data``, by global rank 0
    under the build lock) and reads its checked metadata (``_load_meta``). The DataModule sets ``cache_format`` and provides
    ``find_cache_path()``, ``cache_content()`` (the source; FileNotFoundError or HubUnreachableError when gone),
    ``cache_expect(meta, content)`` (the meta.json values the config needs; ``content`` None when not looked at) and
    ``build_cache_into(build, content)`` (returns the committed meta)."""

    cache_format: int

    def init_loading(self, cfg: Any, batch_size: int, val_batch_size: int | None, max_train_samples: int | None) -> None:
        if not 0 <= cfg.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1) (got {cfg.val_fraction})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.cfg = cfg
        self.prepare_data_per_node = False  # one builder: nodes sharing a filesystem would write the same directory
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.max_train_samples = max_train_samples
        self._consumed = 0
        self._meta: dict[str, Any] | None = None
        self._cache_path: Path | None = None
        self._sampler: ResumableSampler | None = None
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    @property
    def cache_path(self) -> Path:
        if self._cache_path is None:
            self._cache_path = self.find_cache_path()
        return self._cache_path

    def check_cache(self, cache: Path, meta: dict[str, Any]) -> None:
        """Refuse a complete cache that must not be used (another tokenizer, ids out of range)."""

    def check_overwrite(self, cache: Path, meta: dict[str, Any]) -> None:
        """Refuse to rebuild over a stale cache that is not ours to replace (default: any may be)."""

    @staticmethod
    def split_tokens(meta: dict[str, Any]) -> dict[str, int]:
        return meta["tokens"]

    def stale_reason(self, cache: Path, meta: dict[str, Any] | None, content: Any = None) -> str | None:
        """Why ``cache`` must be (re)built, or None."""
        if meta is None:
            return "no completed build (meta.json missing)"
        if meta.get("format") != self.cache_format:
            return f"cache format {meta.get('format')} != {self.cache_format}"
        for key, want in self.cache_expect(meta, content).items():
            if meta.get(key) != want:
                return f"{key} changed ({_short(meta.get(key))} -> {_short(want)})"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split, n in self.split_tokens(meta).items():
            path = cache / f"{split}.bin"
            if not path.is_file() or path.stat().st_size != n * itemsize:
                return f"{path.name} is missing or has the wrong size"
        if not (cache / "unigram.npy").is_file():
            return "unigram.npy is missing"
        return None

    def complete(self, cache: Path) -> bool:
        return self.stale_reason(cache, read_meta(cache)) is None

    def keyed_cache(self, root: Path, base: str, digest: Callable[[], str], what: str) -> Path:
        """``<root>/<base>-<digest()[:12]>``; when the source's ``what`` are gone, the newest complete such cache."""
        try:
            return root / f"{base}-{digest()[:12]}"
        except FileNotFoundError:
            newest, n = newest_cache(root, base, self.complete)
        if n > 1:
            say(f"the {what} of {self.cfg.source!r} are missing: using the newest token cache {newest} (of {n})")
        return newest or root / f"{base}-missing"

    def prepare_data(self) -> None:
        cache = self.cache_path
        meta = read_meta(cache)
        try:
            content = self.cache_content()
        except (FileNotFoundError, HubUnreachableError):
            if not self.complete(cache):
                raise
            content = None  # the source is gone but its complete cache is here: use it
        if self.stale_reason(cache, meta, content) is None:
            self.check_cache(cache, meta)
            return
        if meta is not None:
            self.check_overwrite(cache, meta)
        with build_lock(cache) as exclusive:  # another process may have built it meanwhile: look again
            meta = read_meta(cache)
            reason = self.stale_reason(cache, meta, content)
            if reason is None:
                say(f"{cache} was built by another process meanwhile: using it")
                self.check_cache(cache, meta)
                return
            if meta is not None:
                self.check_overwrite(cache, meta)
                say(f"rebuilding {cache}: {reason}")
            with Build(cache, exclusive) as build:
                self.build_cache_into(build, content)

    def _load_meta(self) -> dict[str, Any]:
        """The checked metadata of the cache; a single process builds a missing or stale cache here, while
        several expect global rank 0 to have built it (``prepare_data``)."""
        if self._meta is None:
            cache = self.cache_path
            if not self.complete(cache):
                rank, world = rank_world(self.trainer)
                if world > 1:
                    raise FileNotFoundError(
                        f"token cache {cache} is missing or incomplete on this process (rank {rank}): "
                        "global rank 0 builds it once, so data.cache_dir must be on a filesystem shared by all nodes, "
                        "or a complete cache must be copied to the same path on every node beforehand"
                    )
                self.prepare_data()
            meta = read_meta(cache)
            self.check_cache(cache, meta)
            self._meta = meta
        return self._meta

    def token_counts(self) -> torch.Tensor:
        """float64 ``[V]`` train token counts (for the unigram noise law)."""
        self._load_meta()
        return torch.from_numpy(np.load(self.cache_path / "unigram.npy")).double()
