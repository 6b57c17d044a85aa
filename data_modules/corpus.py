"""Text corpora: the documents of a text source. A local ``.txt`` file is ONE document, read in chunks cut only
where GPT-2's pre-tokenizer cannot merge across (ids equal a one-shot tokenisation, memory stays bounded); each
row of a ``.jsonl``/``.json``/``.parquet`` file or hub dataset is one. An unreadable file is refused by file and line."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_modules.fingerprint import file_sha256, json_digest
from data_modules.hub import load_hub_dataset
from data_modules.paths import candidates, find_path
from data_modules.token_cache import token_dtype
from data_modules.tokenizers import CharTokenizer, TextTokenizer

TXT_CHUNK_BYTES = 1 << 20
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def is_local_source(source: str) -> bool:
    """Local when it has a corpus extension, glob characters, a path prefix, or exists; else a hub name."""
    return (
        any(c in source for c in "*?[")
        or Path(source).suffix in BUILDERS
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or find_path(source) is not None
    )


def _files_under(base: Path) -> list[Path]:
    if any(c in str(base) for c in "*?["):
        return [Path(f) for f in sorted(glob.glob(str(base), recursive=True)) if Path(f).is_file()]
    if base.is_dir():
        return sorted(f for f in base.rglob("*") if f.is_file())
    return [base] if base.is_file() else []


def local_files(source: str) -> list[Path]:
    """The corpus files a local source names (a file, the supported files under a directory, or a glob)."""
    looked = candidates(source)
    for base in looked:
        found = [f for f in _files_under(base) if f.suffix in BUILDERS]
        if found:
            kinds = {BUILDERS[f.suffix] for f in found}
            if len(kinds) > 1:
                raise ValueError(f"data source {source!r} mixes file kinds {sorted(kinds)}: point it at files of one kind")
            return found
    raise FileNotFoundError(
        f"data source {source!r}: no {'/'.join(BUILDERS)} files found; looked for {' and '.join(map(str, looked))}. "
        "Pass data.source=/path/to/file.txt (or a directory, or a glob like '/data/*.jsonl'), or a hub dataset name"
    )


def names_of(files: list[Path]) -> str:
    return ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")


def corpus_digest(files: list[Path], val_files: list[Path] | None = None) -> str:
    return json_digest({"train": [file_sha256(f) for f in files], "val": [file_sha256(f) for f in val_files or []]})


def val_files(cfg: Any) -> list[Path] | None:
    """The local files of ``cfg.val_source`` (None when there is none or it is a hub dataset)."""
    if cfg.val_source is None or not is_local_source(cfg.val_source):
        return None
    return local_files(cfg.val_source)


def offline_message(name: str, cache: Path) -> str:
    return (
        f"hub dataset {name!r} is needed but huggingface.co is unreachable (no internet?) and neither the HF cache "
        f"nor the token cache {cache} has it. Pass data.source=/path/to/local/files (.txt/.jsonl/.parquet), or "
        f"build the cache on a machine with internet (start the same config there once: the cache is built before "
        f"training) and copy {cache} to the same path here"
    )


def load_hub(name: str, timeout_s: float, cache: Path) -> Any:
    return load_hub_dataset(name, timeout_s, offline_message(name, cache))


class BadCorpusError(ValueError):
    """A corpus file that cannot be read as text: the message names the file, where, and what to do."""


def _binary(path: Path, offset: int) -> BadCorpusError:
    return BadCorpusError(
        f"corpus file {path} looks binary, not text (a NUL byte at byte offset {offset}): point data.source at "
        "UTF-8 text (.txt), JSON lines (.jsonl) or parquet files"
    )


def _decode(path: Path, data: bytes, line0: int, offset0: int) -> str:
    """``data`` (bytes of ``path`` from ``offset0``, after ``line0`` lines) as text."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise _binary(path, offset0 + nul)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        err = e
    line = line0 + data[: err.start].count(b"\n") + 1
    raise BadCorpusError(
        f"corpus file {path} is not UTF-8 text: byte 0x{data[err.start : err.start + 1].hex()} at line {line} (byte offset "
        f"{offset0 + err.start}) is not valid UTF-8 (a latin-1 or other legacy encoding?). Convert it, e.g. "
        f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}`, and point data.source at the result"
    )


def diagnose_json_files(files: list[Path], field: str | None = None) -> None:
    """Raise ``BadCorpusError`` naming the first unreadable file and line of JSON-lines corpus files, or the empty corpus."""
    rows, example = 0, f'{{"{field or "text"}": "..."}}'
    for path in files:
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
                rows += 1
                continue  # a single JSON document (an array of rows)
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass  # maybe JSON lines
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
                        f"(each line of a .jsonl file is one JSON object, e.g. {example})"
                    ) from None
                if not isinstance(row, dict):
                    raise BadCorpusError(
                        f"line {n} of {path} is a JSON {type(row).__name__}, not an object: each line must be one object "
                        f"like {example}"
                    )
                rows += 1
    if rows == 0:
        raise BadCorpusError(f"the corpus is empty: {names_of(files)} hold no JSON rows; point data.source at non-empty files")


def load_local(files: list[Path], workdir: Path) -> Any:
    """A ``Dataset`` of local .jsonl/.json/.parquet files (arrow copy in ``workdir``); an unreadable one is named, not traced."""
    from datasets import load_dataset

    builder = BUILDERS[files[0].suffix]
    try:
        return load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=str(workdir / "hf"))
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; find the culprit ourselves
        error = e
    if builder == "json":  # outside the except block: no chained traceback
        diagnose_json_files(files)
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    raise BadCorpusError(f"cannot read the {builder} corpus files {names_of(files)}: {type(error).__name__}: {first}")


def _safe_cut(buf: bytes, lo: int = 0) -> int:
    """The last place at or after ``lo`` where ``buf`` may be split without changing GPT-2's pre-tokens: just
    before a newline followed by printable ASCII (before its ``\\r`` for ``\\r\\n``); 0 when there is none."""
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
    """Local ``.txt`` files, each one document, read and tokenised ``chunk_bytes`` at a time (a file without
    a safe cut, e.g. one long line, is read whole). Newlines are translated as in Python's text mode."""

    def __init__(self, files: list[Path], chunk_bytes: int = TXT_CHUNK_BYTES):
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1 (got {chunk_bytes})")
        self.files, self.chunk_bytes = files, chunk_bytes

    def __len__(self) -> int:
        return len(self.files)

    def chunks(self, path: Path) -> Iterator[str]:
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
                    continue
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
    """The documents of a ``datasets.Dataset`` (one per row of column ``field``), tokenised with ``datasets.map``;
    ``files``: the local files the rows come from (named when one turns out unreadable)."""

    def __init__(self, ds: Any, field: str, num_proc: int, work: Path, tag: str, files: list[Path] | None = None):
        self.ds, self.field, self.num_proc, self.work, self.tag, self.files = ds, field, num_proc, work, tag, files

    def __len__(self) -> int:
        return len(self.ds)

    def texts(self) -> Iterator[str]:
        yield from self._guarded(text or "" for batch in self.ds.iter(batch_size=1024) for text in batch[self.field])

    def token_blocks(self, tokenizer: TextTokenizer) -> Iterator[np.ndarray]:
        """Token ids of the rows (EOS appended), mapped by ``datasets`` into ``work``."""
        import pyarrow.compute as pc
        from datasets import Features, List, Value

        dtype = token_dtype(tokenizer.vocab_size)
        tok_ds = self.ds.map(
            _Tokenise(tokenizer, self.field),
            batched=True,
            batch_size=256,
            num_proc=self.num_proc if self.num_proc > 1 else None,
            remove_columns=self.ds.column_names,
            features=Features({"ids": List(Value(dtype.name)), "n": Value("int64")}),
            cache_file_name=str(self.work / f"{self.tag}.arrow"),
            new_fingerprint=hashlib.sha256(f"{self.tag}-{tokenizer.fingerprint()}".encode()).hexdigest()[:16],
            desc=f"tokenising {self.tag}",
        )
        tables = tok_ds.with_format("arrow").iter(batch_size=1024)
        yield from self._guarded(pc.list_flatten(table.column("ids")).to_numpy() for table in tables)

    def _guarded(self, it: Iterator[Any]) -> Iterator[Any]:
        """``it``, with a decoding failure of a local file (``datasets`` reads latin-1 JSON lines, then fails
        on the text) turned into one message naming the file and line."""
        try:
            yield from it
            return
        except UnicodeDecodeError as e:
            if self.files is None:
                raise
            error = e
        if BUILDERS[self.files[0].suffix] == "json":  # outside the except block: no chained traceback
            diagnose_json_files(self.files, self.field)
        raise BadCorpusError(f"cannot read the corpus files {names_of(self.files)}: {error}")


def text_column(ds: Any, field: str, source: str, files: list[Path] | None = None) -> str:
    names = ds.column_names
    if field in names:
        return field
    if names == ["text"]:
        return "text"
    where = f" ({names_of(files)})" if files else ""
    raise ValueError(
        f"data source {source!r}{where} has no field {field!r} (its fields: {names}): set data.text_field to the "
        "one holding the text, e.g. data.text_field=" + (names[0] if names else "text")
    )


class _Tokenise:
    """Batched map function: token ids of each document, EOS appended (picklable for ``num_proc``)."""

    def __init__(self, tokenizer: TextTokenizer, field: str):
        self.tokenizer, self.field = tokenizer, field

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[self.field]]
        eos = [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]
        ids = [x + eos if t else [] for t, x in zip(texts, self.tokenizer.encode_batch(texts))]
        return {"ids": ids, "n": [len(x) for x in ids]}


def _local_docs(files: list[Path], source: str, cfg: Any, work: Path, tag: str, chunk_bytes: int) -> Any:
    if BUILDERS[files[0].suffix] == "text":
        return TextFiles(files, chunk_bytes)
    ds = load_local(files, work)
    return DatasetDocs(ds, text_column(ds, cfg.text_field, source, files), cfg.num_proc, work, tag, files)


def documents(cfg: Any, cache: Path, files: list[Path] | None, work: Path, chunk_bytes: int = TXT_CHUNK_BYTES) -> tuple:
    """Train and validation documents (val None: cut the token stream by ``val_fraction``) and the split rule used."""
    val, rule = None, f"last {cfg.val_fraction} of the token stream"
    if files is not None:
        train = _local_docs(files, cfg.source, cfg, work, "train", chunk_bytes)
    else:
        dd = load_hub(cfg.source, cfg.hf_offline_timeout_s, cache)
        if "train" not in dd:
            raise ValueError(f"hub dataset {cfg.source!r} has no train split (splits: {list(dd)})")
        ds, val_ds = dd["train"], dd.get("validation")
        field = text_column(ds, cfg.text_field, cfg.source)
        if cfg.val_source is None:
            n, k = len(ds), cfg.val_documents
            if val_ds is not None:
                rule = "hub validation split"
            elif not 0 < k < n:
                raise ValueError(f"data.val_documents={k} must be in (0, {n}) for {cfg.source!r}: lower it")
            else:
                ds, val_ds, rule = ds.select(range(n - k)), ds.select(range(n - k, n)), f"last {k} train documents"
            val = DatasetDocs(val_ds, text_column(val_ds, cfg.text_field, cfg.source), cfg.num_proc, work, "val")
        train = DatasetDocs(ds, field, cfg.num_proc, work, "train")
    if cfg.val_source is not None:
        vfiles = val_files(cfg)
        if vfiles is not None:
            val = _local_docs(vfiles, cfg.val_source, cfg, work, "val", chunk_bytes)
        else:
            vd = load_hub(cfg.val_source, cfg.hf_offline_timeout_s, cache)
            vd = vd["validation"] if "validation" in vd else vd["train"]
            val = DatasetDocs(vd, text_column(vd, cfg.text_field, cfg.val_source), cfg.num_proc, work, "val")
        rule = f"val_source {cfg.val_source}"
    return train, val, rule


def char_vocabulary(train: Any, val: Any, where: str) -> CharTokenizer:
    chars: set[str] = set()
    for docs in (train, val):
        if docs is not None:
            for text in docs.texts():
                chars.update(text)
    if not chars:
        raise ValueError(f"the corpus is empty (no characters in {where}): point data.source at non-empty text")
    return CharTokenizer(sorted(chars))
