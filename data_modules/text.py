"""Tokenised text: a one-time token cache of a corpus's documents (each followed by EOS when the tokenizer
has one), cut into sequences at read time, so one cache serves every ``seq_len`` and ``wrap``:

    wrap=bos_eos: sequence k = [BOS] + stream[k(L-2) : (k+1)(L-2)] + [EOS]  (MDLM/DUO OpenWebText)
    wrap=none:    sequence k = stream[kL : (k+1)L]                          (character-level data)

Validation: ``val_source`` when given; else a hub dataset's ``validation`` split or its last
``val_documents`` documents (MDLM's OWT protocol); else the last ``val_fraction`` of a local token stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from data_modules import corpus
from data_modules.corpus import TXT_CHUNK_BYTES, is_local_source
from data_modules.fingerprint import files_signature
from data_modules.hub import HubUnreachableError, hf_cached, hub_reachable
from data_modules.sampling import ShardedLoaders, rank_world
from data_modules.token_cache import Build, TokenCacheModule, TokenWindows, TokenWriter, blocks_of, say, source_slug, token_dtype
from data_modules.tokenizers import CharTokenizer, TextTokenizer, load_tokenizer, tokenizer_from_state
from glauber.schema import option

FORMAT_VERSION = 2  # 2: files recorded with their sha256, the cache key holds the corpus digest
WRAPS = ("bos_eos", "none")


@dataclass
class TextDataConfig:
    """Where the text comes from, how it is tokenised and cut into sequences."""

    source: str = option("data/tinyshakespeare.txt", "hub dataset name, or a local file / directory / glob")
    text_field: str = option("text", "column holding the text (json/parquet/hub)")
    tokenizer: str = option("gpt2", "gpt2 | gpt2-hub | char | path/to/tokenizer.json")
    seq_len: int = option(1024, "tokens per training sequence L")
    wrap: str = option("bos_eos", "bos_eos | none")
    val_documents: int = option(100_000, "hub datasets without a validation split: last N train documents")
    val_fraction: float = option(0.1, "local corpora: last fraction of the token stream")
    val_source: str | None = option(None, "explicit validation corpus (same forms as source)")
    cache_dir: str = option("cache", "where tokenised corpora are cached (shared by all nodes in multi-node runs)")
    num_proc: int = option(1, "processes for tokenisation")
    num_workers: int = option(0, "DataLoader workers")
    seed: int = option(0, "training order")
    hf_offline_timeout_s: float = option(3.0, "how long to wait for huggingface.co before declaring no internet")


def split_spec(cfg: TextDataConfig, local: bool) -> dict[str, Any]:
    key = "val_source" if cfg.val_source is not None else "val_fraction" if local else "val_documents"
    return {key: getattr(cfg, key), "text_field": cfg.text_field}


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
    cfg: TextDataConfig, build: Build, tok: TextTokenizer | None, files: list[Path] | None, chunk_bytes: int = TXT_CHUNK_BYTES
) -> dict[str, Any]:
    """Tokenise the corpus into ``build``; ``tok`` None (``char``): the vocabulary comes from the corpus."""
    from tqdm.auto import tqdm

    cache, work = build.cache, build.work
    train, val, split = corpus.documents(cfg, cache, files, work, chunk_bytes)
    where = corpus.names_of(files) if files else cfg.source
    if tok is None:
        tok = corpus.char_vocabulary(train, val, where)
    dtype = token_dtype(tok.vocab_size)
    total, stream = None, train.token_blocks(tok)
    if val is None:  # cut the stream by val_fraction: its length must be known first
        raw, total = work / "train.all", 0
        with open(raw, "wb") as f:
            for ids in stream:
                f.write(np.ascontiguousarray(ids, dtype=dtype).tobytes())
                total += len(ids)
        stream = blocks_of(raw, dtype, total)
    writer = TokenWriter(build, tok.vocab_size, total - int(round(total * cfg.val_fraction)) if total is not None else None)
    say(f"writing the tokens of {cfg.source!r} to {cache}")
    with tqdm(total=total, unit="tok", unit_scale=True, desc="train tokens", mininterval=1.0) as bar:
        for ids in stream:
            writer.write("train", ids)
            bar.update(len(ids))
    if val is not None:
        for ids in val.token_blocks(tok):
            writer.write("val", ids)
    writer.close()
    if writer.counts["train"] + writer.counts["val"] == 0 or (val is not None and writer.counts["train"] == 0):
        field = cfg.text_field if not isinstance(train, corpus.TextFiles) else "text"
        raise ValueError(
            f"corpus {cfg.source!r} is empty: {len(train)} documents, 0 tokens (read from {where}, field {field!r}); "
            "point data.source at non-empty text (and data.text_field at its text column)"
        )
    vfiles = corpus.val_files(cfg)
    meta = {
        "format": FORMAT_VERSION,
        "source": cfg.source,
        "val_source": cfg.val_source,
        "split": split_spec(cfg, files is not None),
        "split_rule": split,
        "files": files_signature(files) if files is not None else None,
        "val_files": files_signature(vfiles) if vfiles is not None else None,
        "tokenizer": {"spec": cfg.tokenizer, "name": tok.name, "fingerprint": tok.fingerprint(), "state": tok.state()},
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "eos_after_documents": tok.eos_id is not None,
        "dtype": dtype.name,
        "tokens": dict(writer.counts),
        "documents": {"train": len(train), "val": len(val) if val is not None else None},
        "max_id": writer.max_id,
        "unigram": "unigram.npy",
    }
    build.commit(meta)
    say(f"token cache ready: {cache} (train {writer.counts['train']:,}, val {writer.counts['val']:,} tokens)")
    return meta


class TextDataModule(TokenCacheModule, ShardedLoaders, L.LightningDataModule):
    """Sequences of tokenised text. ``batch_size`` is per device; ``max_train_samples``: the sequences this rank
    draws in the whole run (default: one epoch's share)."""

    cache_format = FORMAT_VERSION

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
        self.init_loading(cfg, batch_size, val_batch_size, max_train_samples)
        self._tokenizer: TextTokenizer | None = None
        self.txt_chunk_bytes = TXT_CHUNK_BYTES

    def _spec_tokenizer(self) -> TextTokenizer | None:
        """The configured tokenizer, or None for ``char`` (its vocabulary comes from the corpus/cache)."""
        if self.cfg.tokenizer == "char":
            return None
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.tokenizer, timeout_s=self.cfg.hf_offline_timeout_s)
        return self._tokenizer

    def find_cache_path(self) -> Path:
        """``<cache_dir>/<slug>-<tokenizer fingerprint[:12] | char>[-<corpus digest[:12]>]``: edited files, a new one."""
        tok = self._spec_tokenizer()
        root = Path(self.cfg.cache_dir).expanduser()
        base = f"{source_slug(self.cfg.source, self.cfg.val_source)}-{'char' if tok is None else tok.fingerprint()[:12]}"
        if not is_local_source(self.cfg.source):
            return root / base
        return self.keyed_cache(
            root, base, lambda: corpus.corpus_digest(self.cache_content(), corpus.val_files(self.cfg)), "files"
        )

    def cache_content(self) -> list[Path] | None:
        return corpus.local_files(self.cfg.source) if is_local_source(self.cfg.source) else None

    def cache_expect(self, meta: dict[str, Any], files: list[Path] | None) -> dict[str, Any]:
        expect: dict[str, Any] = {"split": split_spec(self.cfg, files is not None or meta.get("files") is not None)}
        if files is not None:
            expect["files"] = files_signature(files)
        return expect

    def check_cache(self, cache: Path, meta: dict[str, Any]) -> None:
        check_meta(cache, meta, self.cfg, self._spec_tokenizer())

    def build_cache_into(self, build: Build, files: list[Path] | None) -> dict[str, Any]:
        return build_cache(self.cfg, build, self._spec_tokenizer(), files, self.txt_chunk_bytes)

    def check_available(self) -> None:
        """Fail within seconds, before training starts, without a complete token cache, the local files, or a reachable
        (or HF-cached) hub dataset."""
        if self.complete(self.cache_path):
            return
        if is_local_source(self.cfg.source):
            self.cache_content()
        elif not hub_reachable(self.cfg.hf_offline_timeout_s) and not hf_cached(self.cfg.source):
            raise HubUnreachableError(corpus.offline_message(self.cfg.source, self.cache_path))

    def _load_meta(self) -> dict[str, Any]:
        meta = super()._load_meta()
        if self._tokenizer is None:
            self._tokenizer = tokenizer_from_state(meta["tokenizer"]["state"])
        return meta

    def setup(self, stage: str | None = None) -> None:
        meta, cache, cfg, tok = self._load_meta(), self.cache_path, self.cfg, self.tokenizer
        world = rank_world(self.trainer)[1]

        def windows(split: str) -> TokenWindows:
            n = meta["tokens"][split]
            return TokenWindows(cache / f"{split}.bin", meta["dtype"], n, cfg.seq_len, cfg.wrap, tok.bos_id, tok.eos_id)

        n_train, n_val = meta["tokens"]["train"], meta["tokens"]["val"]
        self.train_set = windows("train")
        need = self.train_set.body * world
        if len(self.train_set) < world:
            raise ValueError(
                f"the train split of {cfg.source!r} has {n_train:,} tokens, fewer than the {need:,} needed for one "
                f"sequence of data.seq_len={cfg.seq_len} (wrap={cfg.wrap}) on each of {world} rank(s): "
                "use a longer corpus or lower data.seq_len"
            )
        self.val_set = windows("val") if n_val else None
        if self.val_set is not None and len(self.val_set) < world:
            raise ValueError(
                f"the validation split has {n_val:,} tokens, fewer than the {need:,} needed for one sequence of "
                f"data.seq_len={cfg.seq_len} per rank: raise data.val_fraction (or val_documents), or lower data.seq_len"
            )

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            self._load_meta()
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokenizer_state(self) -> dict[str, Any]:
        return self.tokenizer.state()

    def data_fingerprint(self) -> dict[str, Any]:
        """What the token ids mean (checkpoints keep it; a resume on other data is refused)."""
        tok = self.tokenizer
        out: dict[str, Any] = {"tokenizer": tok.fingerprint(), "vocab_size": tok.vocab_size}
        if isinstance(tok, CharTokenizer):
            out["chars"] = "".join(tok.chars)
        return out

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else ids)
