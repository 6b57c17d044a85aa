"""Tokenised text for training: a one-time flat token cache (memmap) and fixed-length sequences.

Corpus -> documents -> token stream. A local ``.txt`` file is ONE document (tiny Shakespeare is one
play-long document); each row of a ``.jsonl``/``.json``/``.parquet`` file or a hub dataset is one
document. Documents are tokenised once into ``<cache_dir>/<slug>-<key>/``::

    train.bin, val.bin   flat token ids (uint16 when V <= 65536, else uint32), documents back to back,
                         each followed by EOS when the tokenizer has one (GPT-2: <|endoftext|>)
    unigram.npy          int64 [V] token counts over train.bin
    meta.json            source, split, tokenizer (spec, fingerprint, state), vocab size, dtype, counts

``<key>`` is the tokenizer fingerprint's first 12 hex digits (``char`` for the character tokenizer,
whose vocabulary is read from the corpus and stored in meta.json). meta.json is written last, so a
build that was interrupted has none and is redone. Sequences are cut at read time, so one cache
serves every ``seq_len`` and ``wrap``:

    wrap=bos_eos: sequence k = [BOS] + stream[k(L-2) : (k+1)(L-2)] + [EOS]  (MDLM/DUO OpenWebText)
    wrap=none:    sequence k = stream[kL : (k+1)L]                          (character-level data)

Validation: ``val_source`` when given; else a hub dataset's ``validation`` split, or the last
``val_documents`` documents of its train split (MDLM's OWT protocol); else (local files) the last
``val_fraction`` of the token stream.

Several processes (DDP, any number of nodes): the cache is built once, by global rank 0
(``prepare_data_per_node = False``), while the others wait; every node then reads the same files, so
``cache_dir`` must be on a filesystem all nodes share (or hold a copy of a complete cache on each node).
Each rank reads its own share of the training and validation sequences (see ``TextDataModule``). There
is no streaming mode: hub datasets are downloaded and tokenised into the cache once (so
``datasets.distributed.split_dataset_by_node`` has no use here); sharding is by sequence index.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.sampling import ResumableSampler, ShardedLoaders, rank_world
from data_modules.tokenizers import (
    CharTokenizer,
    HubUnreachableError,
    TextTokenizer,
    hub_reachable,
    load_tokenizer,
    tokenizer_from_state,
)

FORMAT_VERSION = 1
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]
WRAPS = ("bos_eos", "none")


@dataclass
class TextDataConfig:
    """Where the text comes from, how it is tokenised and cut into sequences (see the module docstring)."""

    source: str = "data/tinyshakespeare.txt"  # hub dataset name, or a local file / directory / glob
    text_field: str = "text"  # column holding the text (json/parquet/hub)
    tokenizer: str = "gpt2"  # gpt2 | gpt2-hub | char | path/to/tokenizer.json
    seq_len: int = 1024  # tokens per training sequence L
    wrap: str = "bos_eos"  # bos_eos | none
    val_documents: int = 100_000  # hub datasets without a validation split: last N train documents
    val_fraction: float = 0.1  # local corpora: last fraction of the token stream
    val_source: str | None = None  # explicit validation corpus (same forms as source)
    cache_dir: str = "cache"  # where tokenised corpora are cached (shared by all nodes in multi-node runs)
    num_proc: int = 1  # processes for tokenisation
    num_workers: int = 0  # DataLoader workers
    seed: int = 0  # training order
    hf_offline_timeout_s: float = 3.0  # how long to wait for huggingface.co before declaring no internet


def _say(msg: str) -> None:
    print(f"[glauber.data] {msg}", file=sys.stderr, flush=True)


# -- sources --------------------------------------------------------------------------------------
def is_local_source(source: str) -> bool:
    """Local when it has a corpus extension, glob characters, a path prefix, or exists; else a hub name."""
    p = Path(source).expanduser()
    return (
        any(c in source for c in "*?[")
        or p.suffix in BUILDERS
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or p.exists()
        or (PROJECT_ROOT / p).exists()
    )


def local_files(source: str) -> list[Path]:
    """The corpus files a local source names: a file, the supported files under a directory, or a glob.

    A relative path is looked up in the working directory, then in the project root.
    """
    p = Path(source).expanduser()
    bases = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    looked = []
    for base in dict.fromkeys(bases):
        looked.append(str(base))
        if any(c in str(base) for c in "*?["):
            found = [Path(f) for f in sorted(glob.glob(str(base), recursive=True)) if Path(f).is_file()]
        elif base.is_dir():
            found = sorted(f for f in base.rglob("*") if f.is_file())
        elif base.is_file():
            found = [base]
        else:
            found = []
        found = [f for f in found if f.suffix in BUILDERS]
        if found:
            kinds = {BUILDERS[f.suffix] for f in found}
            if len(kinds) > 1:
                raise ValueError(f"data source {source!r} mixes file kinds {sorted(kinds)}: point it at files of one kind")
            return found
    raise FileNotFoundError(
        f"data source {source!r}: no {'/'.join(BUILDERS)} files found; looked for {' and '.join(looked)}. "
        "Pass data.source=/path/to/file.txt (or a directory, or a glob like '/data/*.jsonl'), or a hub dataset name"
    )


def files_signature(files: list[Path]) -> list[list[Any]]:
    """Names and sizes of the corpus files: a changed corpus invalidates its cache."""
    return [[f.name, f.stat().st_size] for f in files]


def _hf_cached(name: str) -> bool:
    """Whether the HF datasets or hub cache holds anything for dataset ``name``."""
    import datasets.config as dc
    from huggingface_hub import constants

    parts = name.split("/")
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", parts[-1]).lower()
    arrow_dir = Path(dc.HF_DATASETS_CACHE) / "___".join([*parts[:-1], snake])
    hub_dir = Path(constants.HF_HUB_CACHE) / ("datasets--" + name.replace("/", "--"))
    return arrow_dir.exists() or hub_dir.exists()


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` use their caches only, so nothing waits on the network."""
    import datasets.config as dc
    from huggingface_hub import constants

    old = dc.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    dc.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = old


def _offline_message(name: str, cache: Path) -> str:
    return (
        f"hub dataset {name!r} is needed but huggingface.co is unreachable (no internet?) and neither the HF cache "
        f"nor the token cache {cache} has it. Pass data.source=/path/to/local/files (.txt/.jsonl/.parquet), or "
        f"build the cache on a machine with internet (start the same config there once: the cache is built before "
        f"training) and copy {cache} to the same path here"
    )


def load_hub(name: str, timeout_s: float, cache: Path) -> Any:
    """The ``DatasetDict`` of hub dataset ``name``; refuses within ``timeout_s`` when offline and uncached."""
    from datasets import load_dataset

    if hub_reachable(timeout_s):
        return load_dataset(name)
    if not _hf_cached(name):
        raise HubUnreachableError(_offline_message(name, cache))
    try:
        with _hf_offline():
            return load_dataset(name)
    except Exception as e:  # datasets raises many kinds here
        raise HubUnreachableError(_offline_message(name, cache) + f" (offline load from the HF cache failed: {e})") from e


def load_local(files: list[Path], workdir: Path) -> Any:
    """A ``Dataset`` of documents from local files (its arrow copy lives in ``workdir``, deleted after the build)."""
    from datasets import load_dataset

    builder = BUILDERS[files[0].suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    return load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=str(workdir / "hf"), **kwargs)


def text_column(ds: Any, field: str, source: str) -> str:
    """The text column to read (``text`` for .txt files), checked to exist."""
    names = ds.column_names
    if field in names:
        return field
    if names == ["text"]:
        return "text"
    raise ValueError(f"data source {source!r} has no column {field!r} (columns: {names}): set data.text_field")


# -- tokenisation and the cache ----------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


class _Tokenise:
    """Batched map function: token ids of each document, EOS appended (picklable for ``num_proc``)."""

    def __init__(self, tokenizer: TextTokenizer, field: str):
        self.tokenizer, self.field = tokenizer, field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[self.field]]
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        ids = [x + eos if t else [] for t, x in zip(texts, self.tokenizer.encode_batch(texts))]
        return {"ids": ids, "n": [len(x) for x in ids]}


def tokenise(ds: Any, tokenizer: TextTokenizer, field: str, num_proc: int, workdir: Path, tag: str) -> Any:
    """``ds`` with columns ``ids`` (token ids) and ``n`` (their count), written under ``workdir``."""
    from datasets import Features, List, Value

    dtype = token_dtype(tokenizer.vocab_size)
    features = Features({"ids": List(Value(dtype.name)), "n": Value("int64")})
    return ds.map(
        _Tokenise(tokenizer, field),
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=str(workdir / f"{tag}.arrow"),
        new_fingerprint=hashlib.sha256(f"{tag}-{tokenizer.fingerprint()}".encode()).hexdigest()[:16],
        desc=f"tokenising {tag}",
    )


def iter_tokens(tok_ds: Any, batch_size: int = 1024) -> Iterator[np.ndarray]:
    """The token stream of a tokenised dataset, a block of documents at a time."""
    import pyarrow.compute as pc

    for table in tok_ds.with_format("arrow").iter(batch_size=batch_size):
        yield pc.list_flatten(table.column("ids")).to_numpy()


class SplitWriter:
    """Appends a token stream to ``train`` until ``cut`` tokens, the rest to ``val``; counts train unigrams."""

    def __init__(self, paths: dict[str, Path], dtype: np.dtype, vocab_size: int, cut: int | None = None):
        self.files = {k: open(p, "wb") for k, p in paths.items()}  # noqa: SIM115 - closed in close()
        self.dtype, self.cut = dtype, cut
        self.counts = {k: 0 for k in paths}
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


def source_slug(source: str, val_source: str | None = None) -> str:
    """A readable directory name for a source (and validation source); long ones end in a short hash."""
    text = source if val_source is None else f"{source}+val={val_source}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "corpus"
    if len(slug) > 80:
        slug = slug[:60] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return slug


def split_spec(cfg: TextDataConfig, local: bool) -> dict[str, Any]:
    """The config values that decide the train/val split (recorded in meta.json; a change rebuilds)."""
    if cfg.val_source is not None:
        return {"val_source": cfg.val_source, "text_field": cfg.text_field}
    if local:
        return {"val_fraction": cfg.val_fraction, "text_field": cfg.text_field}
    return {"val_documents": cfg.val_documents, "text_field": cfg.text_field}


def read_meta(cache: Path) -> dict[str, Any] | None:
    """``meta.json`` of a completed build, or None (no build, an interrupted one, or an unreadable file)."""
    try:
        return json.loads((cache / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ready_meta(dm: Any, stale: Callable[[Path, dict], str | None], check: Callable[[Path, dict], None]) -> dict[str, Any]:
    """The metadata of ``dm.cache_path``'s token cache, checked by ``check``; a single process builds a
    missing or ``stale`` cache here (``dm.prepare_data()``), while several expect global rank 0 to have."""
    cache = dm.cache_path
    meta = read_meta(cache)
    if meta is None or stale(cache, meta) is not None:
        rank, world = rank_world(dm.trainer)
        if world > 1:
            raise FileNotFoundError(
                f"token cache {cache} is missing or incomplete on this process (rank {rank}): "
                "global rank 0 builds it once, so data.cache_dir must be on a filesystem shared by all nodes, "
                "or a complete cache must be copied to the same path on every node beforehand"
            )
        dm.prepare_data()
        meta = read_meta(cache)
    check(cache, meta)
    return meta


def stale_reason(cache: Path, meta: dict[str, Any] | None, cfg: TextDataConfig, files: list[Path] | None) -> str | None:
    """Why the cache at ``cache`` must be (re)built, or None when it can be used."""
    if meta is None:
        return "no completed build (meta.json missing)"
    if meta.get("format") != FORMAT_VERSION:
        return f"cache format {meta.get('format')} != {FORMAT_VERSION}"
    local = files is not None or meta.get("files") is not None
    if meta.get("split") != split_spec(cfg, local):
        return f"split settings changed ({meta.get('split')} -> {split_spec(cfg, local)})"
    if files is not None and meta.get("files") != files_signature(files):
        return "the corpus files changed"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        path = cache / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta["tokens"][split] * itemsize:
            return f"{path.name} is missing or has the wrong size"
    if not (cache / "unigram.npy").is_file():
        return "unigram.npy is missing"
    return None


def check_meta(cache: Path, meta: dict[str, Any], cfg: TextDataConfig, tokenizer: TextTokenizer | None) -> None:
    """Refuse a cache made for another tokenizer, or holding ids outside its vocabulary."""
    recorded = meta["tokenizer"]
    if tokenizer is not None and recorded["fingerprint"] != tokenizer.fingerprint():
        raise ValueError(
            f"token cache {cache} was built with tokenizer {recorded['spec']!r} (fingerprint {recorded['fingerprint'][:12]}), "
            f"not the requested {cfg.tokenizer!r} ({tokenizer.fingerprint()[:12]}): delete {cache} to rebuild it"
        )
    if tokenizer is None and recorded["spec"] != cfg.tokenizer:
        raise ValueError(f"token cache {cache} was built with tokenizer {recorded['spec']!r}, not {cfg.tokenizer!r}: delete it")
    V = meta["vocab_size"]
    if meta["max_id"] >= V:
        raise ValueError(f"token cache {cache} holds id {meta['max_id']} >= vocab_size {V}: delete {cache} to rebuild it")
    for split in ("train", "val"):
        n = meta["tokens"][split]
        if n:  # spot check: the first and last million ids of each split
            arr = np.memmap(cache / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,))
            top = max(int(arr[: 1 << 20].max()), int(arr[-(1 << 20) :].max()))
            if top >= V:
                raise ValueError(f"{cache / f'{split}.bin'} holds id {top} >= vocab_size {V}: delete {cache} to rebuild it")


def build_cache(cfg: TextDataConfig, cache: Path, tokenizer: TextTokenizer | None, files: list[Path] | None) -> dict[str, Any]:
    """Tokenise the corpus into ``cache`` (see the module docstring); returns the meta written last.

    ``tokenizer`` is None for ``char``: the vocabulary is then read from the corpus (train and val).
    Everything is written to temporary names and renamed when complete.
    """
    import pyarrow.compute as pc

    cache.mkdir(parents=True, exist_ok=True)
    (cache / "meta.json").unlink(missing_ok=True)  # the old build is invalid from here on
    for leftover in cache.glob("*.tmp*"):  # an interrupted earlier build
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    tag = f"tmp{os.getpid()}"
    work = cache / f"work.{tag}"
    work.mkdir()
    try:
        train, val, split = _documents(cfg, cache, files, work)
        field = text_column(train, cfg.text_field, cfg.source)
        val_field = text_column(val, cfg.text_field, cfg.val_source or cfg.source) if val is not None else field
        if tokenizer is None:
            tokenizer = _char_vocabulary(train, field, val, val_field)
        tok_train = tokenise(train, tokenizer, field, cfg.num_proc, work, "train")
        tok_val = tokenise(val, tokenizer, val_field, cfg.num_proc, work, "val") if val is not None else None
        total = int(pc.sum(tok_train.data.column("n")).as_py() or 0)
        if total == 0:
            where = ", ".join(str(f) for f in files[:5]) if files else cfg.source
            raise ValueError(
                f"corpus {cfg.source!r} is empty: {len(train)} documents, 0 tokens (read from {where}, field {field!r}); "
                "point data.source at non-empty text (and data.text_field at its text column)"
            )
        cut = total - int(round(total * cfg.val_fraction)) if tok_val is None else None
        dtype = token_dtype(tokenizer.vocab_size)
        tmp = {s: cache / f"{s}.bin.{tag}" for s in ("train", "val")}
        writer = SplitWriter(tmp, dtype, tokenizer.vocab_size, cut)
        _say(f"writing {total:,} tokens of {cfg.source!r} to {cache}")
        from tqdm.auto import tqdm

        with tqdm(total=total, unit="tok", unit_scale=True, desc="train tokens", mininterval=1.0) as bar:
            for ids in iter_tokens(tok_train):
                writer.write("train", ids)
                bar.update(len(ids))
        if tok_val is not None:
            for ids in iter_tokens(tok_val):
                writer.write("val", ids)
        writer.close()
        np.save(cache / f"unigram.npy.{tag}.npy", writer.unigram)
        for s in ("train", "val"):
            os.replace(tmp[s], cache / f"{s}.bin")
        os.replace(cache / f"unigram.npy.{tag}.npy", cache / "unigram.npy")
        meta = {
            "format": FORMAT_VERSION,
            "source": cfg.source,
            "val_source": cfg.val_source,
            "split": split_spec(cfg, files is not None),
            "split_rule": split,
            "files": files_signature(files) if files is not None else None,
            "tokenizer": {
                "spec": cfg.tokenizer,
                "name": tokenizer.name,
                "fingerprint": tokenizer.fingerprint(),
                "state": tokenizer.state(),
            },
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "eos_after_documents": tokenizer.eos_id is not None,
            "dtype": dtype.name,
            "tokens": dict(writer.counts),
            "documents": {"train": len(train), "val": len(val) if val is not None else None},
            "max_id": writer.max_id,
            "unigram": "unigram.npy",
        }
        tmp_meta = cache / f"meta.json.{tag}"
        tmp_meta.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        os.replace(tmp_meta, cache / "meta.json")
        _say(f"token cache ready: {cache} (train {writer.counts['train']:,}, val {writer.counts['val']:,} tokens)")
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _documents(cfg: TextDataConfig, cache: Path, files: list[Path] | None, work: Path) -> tuple[Any, Any, str]:
    """Train and validation documents (val None: cut the token stream by ``val_fraction``) and the rule used."""
    if files is not None:
        train = load_local(files, work)
    else:
        dd = load_hub(cfg.source, cfg.hf_offline_timeout_s, cache)
        if "train" not in dd:
            raise ValueError(f"hub dataset {cfg.source!r} has no train split (splits: {list(dd)})")
        train = dd["train"]
        if cfg.val_source is None:
            if "validation" in dd:
                return train, dd["validation"], "hub validation split"
            k = cfg.val_documents
            if not 0 < k < len(train):
                raise ValueError(f"data.val_documents={k} must be in (0, {len(train)}) for {cfg.source!r}: lower it")
            n = len(train)
            return train.select(range(n - k)), train.select(range(n - k, n)), f"last {k} train documents"
    if cfg.val_source is not None:
        val_files = local_files(cfg.val_source) if is_local_source(cfg.val_source) else None
        if val_files is not None:
            val = load_local(val_files, work)
        else:
            vd = load_hub(cfg.val_source, cfg.hf_offline_timeout_s, cache)
            val = vd["validation"] if "validation" in vd else vd["train"]
        return train, val, f"val_source {cfg.val_source}"
    return train, None, f"last {cfg.val_fraction} of the token stream"


def _char_vocabulary(train: Any, field: str, val: Any, val_field: str) -> CharTokenizer:
    """The character tokenizer of a corpus: every character of its train and validation documents."""
    chars: set[str] = set()
    for ds, f in ((train, field), (val, val_field)):
        if ds is not None:
            for batch in ds.iter(batch_size=1024):
                for text in batch[f]:
                    chars.update(text or "")
    if not chars:
        raise ValueError("the corpus is empty (no characters): point data.source at non-empty text")
    return CharTokenizer(sorted(chars))


# -- reading ----------------------------------------------------------------------------------
class TokenWindows(Dataset):
    """Fixed-length LongTensor sequences cut from a flat token file (see the module docstring for ``wrap``)."""

    def __init__(
        self,
        path: Path,
        dtype: str,
        num_tokens: int,
        seq_len: int,
        wrap: str,
        bos_id: int | None = None,
        eos_id: int | None = None,
    ):
        if wrap not in WRAPS:
            raise ValueError(f"data.wrap must be one of {WRAPS} (got {wrap!r})")
        if wrap == "bos_eos" and (bos_id is None or eos_id is None):
            raise ValueError("data.wrap=bos_eos needs a tokenizer with BOS and EOS tokens (char has none): use data.wrap=none")
        self.path, self.dtype, self.num_tokens = Path(path), dtype, num_tokens
        self.seq_len, self.wrap, self.bos_id, self.eos_id = seq_len, wrap, bos_id, eos_id
        self.body = seq_len - 2 if wrap == "bos_eos" else seq_len
        if self.body < 1:
            raise ValueError(f"data.seq_len={seq_len} is too short for wrap={wrap}")
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


class TextDataModule(ShardedLoaders, L.LightningDataModule):
    """Sequences of tokenised text, sharded over DDP ranks and resumable mid-run.

    ``batch_size`` is per device; ``max_train_samples`` is how many sequences this rank draws in the
    whole run (default: one epoch's share). Training draws come from ``ResumableSampler``; validation
    sequences are split by rank (rank r takes r, r + W, ...) with every rank getting the same count
    (at most W - 1 are left out), so the Trainer must run with ``use_distributed_sampler=False``.
    The number of training sequences consumed is kept in ``state_dict`` and set by ``set_consumed``.
    """

    def __init__(
        self, cfg: TextDataConfig, batch_size: int, val_batch_size: int | None = None, max_train_samples: int | None = None
    ):
        super().__init__()
        if cfg.wrap not in WRAPS:
            raise ValueError(f"data.wrap must be one of {WRAPS} (got {cfg.wrap!r})")
        if cfg.wrap == "bos_eos" and cfg.tokenizer == "char":
            raise ValueError("data.wrap=bos_eos needs BOS/EOS tokens, which the char tokenizer lacks: use data.wrap=none")
        if cfg.seq_len < (3 if cfg.wrap == "bos_eos" else 1):
            raise ValueError(f"data.seq_len={cfg.seq_len} is too short for wrap={cfg.wrap}")
        if not 0 <= cfg.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1) (got {cfg.val_fraction})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.cfg = cfg
        # Global rank 0 alone builds the cache: with one builder per node, nodes sharing a filesystem would
        # write the same directory at once (each build also removes another's leftovers).
        self.prepare_data_per_node = False
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_train_samples = max_train_samples
        self._consumed = 0
        self._tokenizer: TextTokenizer | None = None
        self._meta: dict[str, Any] | None = None
        self._sampler: ResumableSampler | None = None
        self.train_set: TokenWindows | None = None
        self.val_set: TokenWindows | None = None

    # -- the cache ------------------------------------------------------------------------------
    def _spec_tokenizer(self) -> TextTokenizer | None:
        """The configured tokenizer, or None for ``char`` (its vocabulary comes from the corpus/cache)."""
        if self.cfg.tokenizer == "char":
            return None
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.tokenizer, timeout_s=self.cfg.hf_offline_timeout_s)
        return self._tokenizer

    @property
    def cache_path(self) -> Path:
        """``<cache_dir>/<slug of source>-<tokenizer fingerprint[:12] | char>``."""
        tok = self._spec_tokenizer()
        key = "char" if tok is None else tok.fingerprint()[:12]
        return Path(self.cfg.cache_dir).expanduser() / f"{source_slug(self.cfg.source, self.cfg.val_source)}-{key}"

    def _corpus_files(self) -> list[Path] | None:
        """Local corpus files (None for a hub dataset); raises when a local source has none."""
        return local_files(self.cfg.source) if is_local_source(self.cfg.source) else None

    def prepare_data(self) -> None:
        """Build the token cache unless a complete, matching one exists (one process per node runs this)."""
        cache, tok = self.cache_path, self._spec_tokenizer()
        meta = read_meta(cache)
        try:
            files = self._corpus_files()
        except FileNotFoundError:
            if meta is not None and stale_reason(cache, meta, self.cfg, None) is None:
                files = None  # the corpus is gone but its complete cache is here: use it
            else:
                raise
        reason = stale_reason(cache, meta, self.cfg, files)
        if reason is None:
            check_meta(cache, meta, self.cfg, tok)
            return
        if meta is not None:
            _say(f"rebuilding {cache}: {reason}")
        build_cache(self.cfg, cache, tok, files)

    def check_available(self) -> None:
        """Fail within seconds, before any training machinery starts, when the data cannot be had:
        a complete token cache, the local files, or a reachable (or HF-cached) hub dataset."""
        meta = read_meta(self.cache_path)
        if meta is not None and stale_reason(self.cache_path, meta, self.cfg, None) is None:
            return
        if is_local_source(self.cfg.source):
            self._corpus_files()
        elif not hub_reachable(self.cfg.hf_offline_timeout_s) and not _hf_cached(self.cfg.source):
            raise HubUnreachableError(_offline_message(self.cfg.source, self.cache_path))

    def _load_meta(self) -> dict[str, Any]:
        if self._meta is None:
            self._meta = ready_meta(
                self,
                lambda cache, meta: stale_reason(cache, meta, self.cfg, None),
                lambda cache, meta: check_meta(cache, meta, self.cfg, self._spec_tokenizer()),
            )
            if self._tokenizer is None:
                self._tokenizer = tokenizer_from_state(self._meta["tokenizer"]["state"])
        return self._meta

    # -- datasets and loaders -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        meta, cache, cfg = self._load_meta(), self.cache_path, self.cfg
        tok = self.tokenizer
        world = rank_world(self.trainer)[1]

        def windows(split: str) -> TokenWindows:
            return TokenWindows(
                cache / f"{split}.bin", meta["dtype"], meta["tokens"][split], cfg.seq_len, cfg.wrap, tok.bos_id, tok.eos_id
            )

        n_train = meta["tokens"]["train"]
        self.train_set = windows("train")
        need = self.train_set.body * world
        if len(self.train_set) < world:
            raise ValueError(
                f"the train split of {cfg.source!r} has {n_train:,} tokens, fewer than the {need:,} needed for one "
                f"sequence of data.seq_len={cfg.seq_len} (wrap={cfg.wrap}) on each of {world} rank(s): "
                "use a longer corpus or lower data.seq_len"
            )
        n_val = meta["tokens"]["val"]
        self.val_set = windows("val") if n_val else None
        if self.val_set is not None and len(self.val_set) < world:
            raise ValueError(
                f"the validation split has {n_val:,} tokens, fewer than the {need:,} needed for one sequence of "
                f"data.seq_len={cfg.seq_len} per rank: raise data.val_fraction (or val_documents), or lower data.seq_len"
            )

    # -- tokenizer --------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._load_meta()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokenizer_state(self) -> dict[str, Any]:
        """What ``tokenizer_from_state`` needs to rebuild the tokenizer (store it in checkpoints)."""
        return self.tokenizer.state()

    def token_counts(self) -> torch.Tensor:
        """float64 ``[V]`` token counts over the train split (for the unigram noise law)."""
        self._load_meta()
        return torch.from_numpy(np.load(self.cache_path / "unigram.npy")).double()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids)
