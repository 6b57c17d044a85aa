"""Tokenised text for training: a one-time flat token cache (memmap) and fixed-length sequences.

Corpus -> documents -> token stream. A local ``.txt`` file is ONE document (tiny Shakespeare is one
play-long document); each row of a ``.jsonl``/``.json``/``.parquet`` file or a hub dataset is one
document. Documents are tokenised once into ``<cache_dir>/<slug>-<key>/``::

    train.bin, val.bin   flat token ids (uint16 when V <= 65536, else uint32), documents back to back,
                         each followed by EOS when the tokenizer has one (GPT-2: <|endoftext|>)
    unigram.npy          int64 [V] token counts over train.bin
    meta.json            source, split, tokenizer (spec, fingerprint, state), vocab size, dtype, counts

``<key>`` is the tokenizer fingerprint's first 12 hex digits (``char`` for the character tokenizer,
whose vocabulary is read from the corpus and stored in meta.json), followed for a local corpus by
``-<digest>``, the first 12 hex digits of a sha256 over the content of its files (and of local
``val_source`` files): an edited corpus, even of the same size, gets a new cache, and the old one stays
for runs still reading it (meta.json records each file's name, size and sha256). meta.json is written
last, so a build that was interrupted has none and is redone; builds hold ``<cache>.lock``
(``data_modules.cachelock``), so two processes never build one cache at once. A ``.txt`` file is read
and tokenised ``TXT_CHUNK_BYTES`` at a time, cut only where GPT-2's pre-tokenizer cannot merge across
(``_safe_cut``), so the ids equal a one-shot tokenisation and memory does not grow with the file. An
unreadable file (binary, not UTF-8, a broken JSON line) is refused naming the file and line. The
DataModule's checkpoint state holds ``data_fingerprint()`` (tokenizer fingerprint, vocabulary size, the
characters of a char vocabulary); resuming on data whose ids mean other tokens is refused. Sequences are
cut at read time, so one cache serves every ``seq_len`` and ``wrap``:

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

from data_modules.cachelock import build_lock
from data_modules.fingerprint import file_sha256, files_signature, json_digest, newest_cache
from data_modules.sampling import ResumableSampler, ShardedLoaders, rank_world
from data_modules.tokenizers import (
    CharTokenizer,
    HubUnreachableError,
    TextTokenizer,
    hub_reachable,
    load_tokenizer,
    tokenizer_from_state,
)

FORMAT_VERSION = 2  # 2: files recorded with their sha256, the cache key holds the corpus digest
TXT_CHUNK_BYTES = 1 << 20  # .txt files are tokenised this many bytes at a time (memory does not grow with the file)
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


def corpus_digest(files: list[Path], val_files: list[Path] | None = None) -> str:
    """A hash of the content of the corpus (and validation) files: part of a local corpus's cache key."""
    return json_digest({"train": [file_sha256(f) for f in files], "val": [file_sha256(f) for f in val_files or []]})


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


class BadCorpusError(ValueError):
    """A corpus file that cannot be read as text: the message names the file, where, and what to do."""


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, line0: int, offset0: int) -> BadCorpusError:
    line = line0 + data[: err.start].count(b"\n") + 1
    bad = data[err.start : err.start + 1].hex()
    return BadCorpusError(
        f"corpus file {path} is not UTF-8 text: byte 0x{bad} at line {line} (byte offset {offset0 + err.start}) is "
        f"not valid UTF-8 (a latin-1 or other legacy encoding?). Convert it, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`, and point data.source at the result"
    )


def _binary(path: Path, offset: int) -> BadCorpusError:
    return BadCorpusError(
        f"corpus file {path} looks binary, not text (a NUL byte at byte offset {offset}): point data.source at "
        "UTF-8 text (.txt), JSON lines (.jsonl) or parquet files"
    )


def _decode(path: Path, data: bytes, line0: int, offset0: int) -> str:
    """``data`` (bytes of ``path`` from ``offset0``, after ``line0`` lines) as text, or a clear error."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise _binary(path, offset0 + nul)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data, e, line0, offset0) from None


def diagnose_json_files(files: list[Path], field: str | None = None) -> None:
    """Raise ``BadCorpusError`` naming the first unreadable file and line of JSON-lines corpus files
    (binary, not UTF-8, broken JSON, not an object), or the empty corpus; return when none is found."""
    rows = 0
    for path in files:
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
                rows += 1
                continue  # a single JSON document (an array of rows): fine
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass  # maybe JSON lines: look line by line
        offset = 0
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                text = _decode(path, raw, n - 1, offset)
                offset += len(raw)
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise BadCorpusError(
                        f"line {n} of {path} is not valid JSON ({e.msg} at column {e.colno}): fix or delete that line "
                        f'(each line of a .jsonl file is one JSON object, e.g. {{"{field or "text"}": "..."}})'
                    ) from None
                if not isinstance(row, dict):
                    raise BadCorpusError(
                        f"line {n} of {path} is a JSON {type(row).__name__}, not an object: each line must be one object "
                        f'like {{"{field or "text"}": "..."}}'
                    )
                rows += 1
    if rows == 0:
        names = ", ".join(str(f) for f in files[:5])
        raise BadCorpusError(f"the corpus is empty: {names} hold no JSON rows; point data.source at non-empty files")


def load_local(files: list[Path], workdir: Path) -> Any:
    """A ``Dataset`` of documents from local .jsonl/.json/.parquet files (its arrow copy lives in ``workdir``,
    deleted after the build). An unreadable file gives one message naming it (and the line), not a traceback."""
    from datasets import load_dataset

    builder = BUILDERS[files[0].suffix]
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=str(workdir / "hf"), **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; find the culprit ourselves
        error = e
    if builder == "json":  # outside the except block: the message stands alone, without datasets' traceback
        diagnose_json_files(files)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    names = ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    raise BadCorpusError(f"cannot read the {builder} corpus files {names}: {type(error).__name__}: {first}")


def _safe_cut(buf: bytes, lo: int = 0) -> int:
    """The last position where ``buf`` may be split so that GPT-2's pre-tokenizer (hence BPE) sees the same
    pieces on both sides as in the whole text: just before a newline that is followed by a printable ASCII
    character (before its ``\\r`` for ``\\r\\n``), at or after ``lo``; 0 when there is none."""
    q = len(buf) - 1
    while True:
        q = buf.rfind(b"\n", max(lo, 0), q)
        if q <= 0:
            return 0
        if 0x21 <= buf[q + 1] <= 0x7E:
            cut = q - 1 if buf[q - 1] == 0x0D else q
            if cut > 0:
                return cut


class TextFiles:
    """Local ``.txt`` files, each one document, read and tokenised ``chunk_bytes`` at a time.

    Chunks end where no BPE merge or pre-token can cross (``_safe_cut``), so the token stream equals the
    one-shot tokenisation of each whole file, with memory bounded by the chunk (a file without such a
    place, e.g. one long line, is read whole). Newlines are translated as Python's text mode does
    (``\\r\\n`` and ``\\r`` become ``\\n``), as the ``datasets`` text loader did before.
    """

    def __init__(self, files: list[Path], chunk_bytes: int = TXT_CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1 (got {chunk_bytes})")
        self.files, self.chunk_bytes = files, chunk_bytes

    def __len__(self) -> int:
        return len(self.files)

    def chunks(self, path: Path) -> Iterator[str]:
        """The text of ``path``, in pieces of about ``chunk_bytes`` bytes."""
        buf, offset, lines = b"", 0, 0
        with open(path, "rb") as f:
            while True:
                data = f.read(self.chunk_bytes)
                nul = data.find(b"\0")
                if nul >= 0:  # before gathering more of a file without newlines
                    raise _binary(path, offset + len(buf) + nul)
                seen, buf = len(buf), buf + data
                cut = _safe_cut(buf, seen - 2) if data else len(buf)  # the bytes before had no safe place
                if cut == 0 and data:
                    continue  # no safe place yet: read on
                piece, buf = buf[:cut], buf[cut:]
                text = _decode(path, piece, lines, offset)
                offset, lines = offset + len(piece), lines + piece.count(b"\n")
                if text:
                    yield text.replace("\r\n", "\n").replace("\r", "\n")
                if not data:
                    return

    def texts(self) -> Iterator[str]:
        for path in self.files:
            yield from self.chunks(path)

    def token_blocks(self, tokenizer: TextTokenizer) -> Iterator[np.ndarray]:
        """Token ids of each file, EOS after each non-empty one (when the tokenizer has EOS)."""
        dtype = token_dtype(tokenizer.vocab_size)
        for path in self.files:
            any_text = False
            for text in self.chunks(path):
                any_text = True
                yield np.asarray(tokenizer.encode(text), dtype=dtype)
            if any_text and tokenizer.eos_id is not None:
                yield np.asarray([tokenizer.eos_id], dtype=dtype)


class DatasetDocs:
    """The documents of a ``datasets.Dataset`` (one per row of column ``field``), tokenised with ``datasets.map``."""

    def __init__(self, ds: Any, field: str, num_proc: int, work: Path, tag: str, files: list[Path] | None = None):
        self.ds, self.field, self.num_proc, self.work, self.tag = ds, field, num_proc, work, tag
        self.files = files  # local files the rows come from (named when one turns out unreadable)

    def __len__(self) -> int:
        return len(self.ds)

    def texts(self) -> Iterator[str]:
        yield from self._guarded(text or "" for batch in self.ds.iter(batch_size=1024) for text in batch[self.field])

    def token_blocks(self, tokenizer: TextTokenizer) -> Iterator[np.ndarray]:
        yield from self._guarded(iter_tokens(tokenise(self.ds, tokenizer, self.field, self.num_proc, self.work, self.tag)))

    def _guarded(self, it: Iterator[Any]) -> Iterator[Any]:
        """``it``, with a decoding failure of a local file (``datasets`` reads latin-1 JSON lines without
        complaint, then fails on the text) turned into one message naming the file and line."""
        try:
            yield from it
            return
        except UnicodeDecodeError as e:
            if self.files is None:
                raise
            error = e
        if BUILDERS[self.files[0].suffix] == "json":  # outside the except block: no chained traceback
            diagnose_json_files(self.files, self.field)
        names = ", ".join(str(f) for f in self.files[:5])
        raise BadCorpusError(f"cannot read the corpus files {names}: {error}")


def text_column(ds: Any, field: str, source: str, files: list[Path] | None = None) -> str:
    """The text column to read (``text`` for .txt files), checked to exist."""
    names = ds.column_names
    if field in names:
        return field
    if names == ["text"]:
        return "text"
    where = f" ({', '.join(str(f) for f in files[:5])})" if files else ""
    raise ValueError(
        f"data source {source!r}{where} has no field {field!r} (its fields: {names}): set data.text_field to the "
        "one holding the text, e.g. data.text_field=" + (names[0] if names else "text")
    )


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


def build_cache(
    cfg: TextDataConfig,
    cache: Path,
    tokenizer: TextTokenizer | None,
    files: list[Path] | None,
    chunk_bytes: int = TXT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Tokenise the corpus into ``cache`` (see the module docstring); returns the meta written last.

    ``tokenizer`` is None for ``char``: the vocabulary is then read from the corpus (train and val).
    Everything is written to temporary names and renamed when complete. ``.txt`` files are read and
    tokenised ``chunk_bytes`` at a time. The caller holds the cache's build lock (``prepare_data``).
    """
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "meta.json").unlink(missing_ok=True)  # the old build is invalid from here on
    for leftover in cache.glob("*.tmp*"):  # an interrupted earlier build (under the lock: never a live one's)
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    tag = f"tmp{os.getpid()}"
    work = cache / f"work.{tag}"
    work.mkdir()
    try:
        train, val, split = _documents(cfg, cache, files, work, chunk_bytes)
        where = ", ".join(str(f) for f in files[:5]) if files else cfg.source
        if tokenizer is None:
            tokenizer = _char_vocabulary(train, val, where)
        dtype = token_dtype(tokenizer.vocab_size)
        from tqdm.auto import tqdm

        if val is None:  # cut the stream by val_fraction: its length must be known first
            raw = work / "train.all"
            total = 0
            with open(raw, "wb") as f:
                for ids in train.token_blocks(tokenizer):
                    f.write(np.ascontiguousarray(ids, dtype=dtype).tobytes())
                    total += len(ids)
            stream: Callable[[], Iterator[np.ndarray]] = lambda: _blocks_of(raw, dtype, total)  # noqa: E731
        else:
            total, stream = None, lambda: train.token_blocks(tokenizer)  # noqa: E731
        cut = total - int(round(total * cfg.val_fraction)) if total is not None else None
        tmp = {s: cache / f"{s}.bin.{tag}" for s in ("train", "val")}
        writer = SplitWriter(tmp, dtype, tokenizer.vocab_size, cut)
        _say(f"writing the tokens of {cfg.source!r} to {cache}")
        with tqdm(total=total, unit="tok", unit_scale=True, desc="train tokens", mininterval=1.0) as bar:
            for ids in stream():
                writer.write("train", ids)
                bar.update(len(ids))
        if val is not None:
            for ids in val.token_blocks(tokenizer):
                writer.write("val", ids)
        writer.close()
        if writer.counts["train"] + writer.counts["val"] == 0 or (val is not None and writer.counts["train"] == 0):
            field = cfg.text_field if not isinstance(train, TextFiles) else "text"
            raise ValueError(
                f"corpus {cfg.source!r} is empty: {len(train)} documents, 0 tokens (read from {where}, field {field!r}); "
                "point data.source at non-empty text (and data.text_field at its text column)"
            )
        np.save(cache / f"unigram.npy.{tag}.npy", writer.unigram)
        for s in ("train", "val"):
            os.replace(tmp[s], cache / f"{s}.bin")
        os.replace(cache / f"unigram.npy.{tag}.npy", cache / "unigram.npy")
        val_files = _val_files(cfg)
        meta = {
            "format": FORMAT_VERSION,
            "source": cfg.source,
            "val_source": cfg.val_source,
            "split": split_spec(cfg, files is not None),
            "split_rule": split,
            "files": files_signature(files) if files is not None else None,
            "val_files": files_signature(val_files) if val_files is not None else None,
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
        for t in (cache / f"{s}.bin.{tag}" for s in ("train", "val")):
            t.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _blocks_of(path: Path, dtype: np.dtype, n: int, block: int = 1 << 22) -> Iterator[np.ndarray]:
    """The ``n`` ids of a flat token file, ``block`` at a time."""
    if n == 0:
        return
    arr = np.memmap(path, dtype=dtype, mode="r", shape=(n,))
    for i in range(0, n, block):
        yield np.asarray(arr[i : i + block])


def _val_files(cfg: TextDataConfig) -> list[Path] | None:
    """The local files of ``val_source`` (None when there is none or it is a hub dataset)."""
    if cfg.val_source is None or not is_local_source(cfg.val_source):
        return None
    return local_files(cfg.val_source)


def _local_docs(files: list[Path], field: str, source: str, cfg: TextDataConfig, work: Path, tag: str, chunk_bytes: int) -> Any:
    if BUILDERS[files[0].suffix] == "text":
        return TextFiles(files, chunk_bytes)
    ds = load_local(files, work)
    return DatasetDocs(ds, text_column(ds, field, source, files), cfg.num_proc, work, tag, files)


def _documents(
    cfg: TextDataConfig, cache: Path, files: list[Path] | None, work: Path, chunk_bytes: int = TXT_CHUNK_BYTES
) -> tuple[Any, Any, str]:
    """Train and validation documents (``TextFiles`` or ``DatasetDocs``; val None: cut the token stream by
    ``val_fraction``) and the rule used."""
    if files is not None:
        train = _local_docs(files, cfg.text_field, cfg.source, cfg, work, "train", chunk_bytes)
    else:
        dd = load_hub(cfg.source, cfg.hf_offline_timeout_s, cache)
        if "train" not in dd:
            raise ValueError(f"hub dataset {cfg.source!r} has no train split (splits: {list(dd)})")
        ds = dd["train"]
        field = text_column(ds, cfg.text_field, cfg.source)
        if cfg.val_source is None:
            n = len(ds)
            if "validation" in dd:
                val_ds, rule = dd["validation"], "hub validation split"
            else:
                k = cfg.val_documents
                if not 0 < k < n:
                    raise ValueError(f"data.val_documents={k} must be in (0, {n}) for {cfg.source!r}: lower it")
                ds, val_ds, rule = ds.select(range(n - k)), ds.select(range(n - k, n)), f"last {k} train documents"
            val_field = text_column(val_ds, cfg.text_field, cfg.source)
            return (
                DatasetDocs(ds, field, cfg.num_proc, work, "train"),
                DatasetDocs(val_ds, val_field, cfg.num_proc, work, "val"),
                rule,
            )
        train = DatasetDocs(ds, field, cfg.num_proc, work, "train")
    if cfg.val_source is not None:
        val_files = _val_files(cfg)
        if val_files is not None:
            val = _local_docs(val_files, cfg.text_field, cfg.val_source, cfg, work, "val", chunk_bytes)
        else:
            vd = load_hub(cfg.val_source, cfg.hf_offline_timeout_s, cache)
            vds = vd["validation"] if "validation" in vd else vd["train"]
            val = DatasetDocs(vds, text_column(vds, cfg.text_field, cfg.val_source), cfg.num_proc, work, "val")
        return train, val, f"val_source {cfg.val_source}"
    return train, None, f"last {cfg.val_fraction} of the token stream"


def _char_vocabulary(train: Any, val: Any, where: str) -> CharTokenizer:
    """The character tokenizer of a corpus: every character of its train and validation documents."""
    chars: set[str] = set()
    for docs in (train, val):
        if docs is not None:
            for text in docs.texts():
                chars.update(text)
    if not chars:
        raise ValueError(f"the corpus is empty (no characters in {where}): point data.source at non-empty text")
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
        self._cache_path: Path | None = None
        self.txt_chunk_bytes = TXT_CHUNK_BYTES  # .txt files are tokenised this many bytes at a time
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
        """``<cache_dir>/<slug of source>-<tokenizer fingerprint[:12] | char>[-<corpus digest[:12]>]``.

        A local corpus's key ends in a hash of its files' content (``corpus_digest``), so an edited corpus
        gets a new cache (the old one stays for runs still reading it). When the local files are gone, the
        newest complete cache of that source and tokenizer is used."""
        if self._cache_path is None:
            tok = self._spec_tokenizer()
            key = "char" if tok is None else tok.fingerprint()[:12]
            root = Path(self.cfg.cache_dir).expanduser()
            base = f"{source_slug(self.cfg.source, self.cfg.val_source)}-{key}"
            path = root / base
            if is_local_source(self.cfg.source):
                try:
                    path = root / f"{base}-{corpus_digest(self._corpus_files(), _val_files(self.cfg))[:12]}"
                except FileNotFoundError:
                    path = self._newest_cache(root, base) or root / f"{base}-missing"
            self._cache_path = path
        return self._cache_path

    def _newest_cache(self, root: Path, base: str) -> Path | None:
        """The most recently built complete cache ``<base>-<digest>`` (the corpus files are gone)."""
        newest, n = newest_cache(root, base, lambda d: stale_reason(d, read_meta(d), self.cfg, None) is None)
        if n > 1:
            _say(f"the files of {self.cfg.source!r} are missing: using its newest token cache {newest} (of {n})")
        return newest

    def _corpus_files(self) -> list[Path] | None:
        """Local corpus files (None for a hub dataset); raises when a local source has none."""
        return local_files(self.cfg.source) if is_local_source(self.cfg.source) else None

    def prepare_data(self) -> None:
        """Build the token cache unless a complete, matching one exists (global rank 0 runs this, holding the build lock)."""
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
        with build_lock(cache):  # another process may be building it: wait, then look again
            meta = read_meta(cache)
            reason = stale_reason(cache, meta, self.cfg, files)
            if reason is None:
                _say(f"{cache} was built by another process meanwhile: using it")
                check_meta(cache, meta, self.cfg, tok)
                return
            if meta is not None:
                _say(f"rebuilding {cache}: {reason}")
            build_cache(self.cfg, cache, tok, files, self.txt_chunk_bytes)

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

    def data_fingerprint(self) -> dict[str, Any]:
        """What the token ids mean: the tokenizer fingerprint and vocabulary (kept in the DataModule's
        checkpoint state; resuming on data whose ids mean other tokens is refused in ``load_state_dict``)."""
        tok = self.tokenizer
        out: dict[str, Any] = {"tokenizer": tok.fingerprint(), "vocab_size": tok.vocab_size}
        if isinstance(tok, CharTokenizer):
            out["chars"] = "".join(tok.chars)
        return out

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
