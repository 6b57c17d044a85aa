"""Text tokenizers behind one small interface: GPT-2 byte-level BPE and a character vocabulary. ``fingerprint()``
hashes exactly what maps text to ids (it keys the token caches); ``state()`` is JSON that ``tokenizer_from_state``
turns back into the same tokenizer, so caches and checkpoints need no corpus."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from data_modules.hub import HubUnreachableError, hub_reachable  # also imported from here by glauber.eval.judges

GPT2_EOS = "<|endoftext|>"


def bundled_gpt2_path() -> Path:
    return Path(str(files("glauber") / "assets/gpt2/tokenizer.json"))


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class TextTokenizer(ABC):
    """Maps text to token ids in ``[0, vocab_size)`` and back."""

    name: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens kept, so document boundaries stay visible)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable hex hash of the exact id mapping."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON that ``tokenizer_from_state`` turns back into this tokenizer."""


class GPT2Tokenizer(TextTokenizer):
    """GPT-2 byte-level BPE (V = 50257); ``<|endoftext|>`` (50256) serves as both BOS and EOS. ``source``: ``"bundled"``
    (shipped with glauber), ``"hub"`` (the hub's ``gpt2`` or its local HF cache) or a path to any ``tokenizer.json``;
    ``text``: that file's content, when it is not at hand."""

    def __init__(self, source: str = "bundled", timeout_s: float = 3.0, text: str | None = None):
        from tokenizers import Tokenizer

        if text is not None:
            self._tok, self.name = Tokenizer.from_str(text), f"json:{Path(source).name}"
        elif source == "bundled":
            self._tok, self.name = Tokenizer.from_file(str(bundled_gpt2_path())), "gpt2"
        elif source == "hub":
            self._tok, self.name = Tokenizer.from_file(str(_hub_gpt2_file(timeout_s))), "gpt2-hub"
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"data.tokenizer={source}: tokenizer file {path} not found: use data.tokenizer=gpt2 or a path to a "
                    "tokenizer.json"
                )
            self._tok, self.name = _tokenizer_file(path, source), f"json:{path.name}"
        self.source = source
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.eos_id = self._tok.token_to_id(GPT2_EOS)
        self._fingerprint: str | None = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        # only what decides the ids, normalised so the bundled and hub copies and all `tokenizers` versions agree
        if self._fingerprint is None:
            d = json.loads(self._tok.to_str())
            model = d["model"]
            merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
            added = sorted((t["id"], t["content"]) for t in d.get("added_tokens", []))
            self._fingerprint = _sha256({"type": model["type"], "vocab": model["vocab"], "merges": merges, "added": added})
        return self._fingerprint

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": "gpt2", "source": self.source, "fingerprint": self.fingerprint()}
        if self.source not in ("bundled", "hub"):
            state["json"] = self._tok.to_str()  # a custom file travels with the state
        return state


def _tokenizer_file(path: Path, source: str) -> Any:
    """A ``tokenizers.Tokenizer`` read from ``path``, or one line naming the file when it is not a tokenizer.json."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ValueError(
            f"data.tokenizer={source}: {path} is not a Hugging Face tokenizer.json ({reason}); point data.tokenizer at a "
            "tokenizer.json saved by the tokenizers library (Tokenizer.save), or use data.tokenizer=gpt2 or char"
        ) from None


def _hub_gpt2_file(timeout_s: float) -> Path:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache("gpt2", "tokenizer.json")
    if isinstance(cached, str):
        return Path(cached)
    if not hub_reachable(timeout_s):
        raise HubUnreachableError(
            "data.tokenizer=gpt2-hub: huggingface.co is unreachable (no internet) and the HF cache has no gpt2 "
            "tokenizer; use data.tokenizer=gpt2, the identical copy bundled with glauber"
        )
    try:
        return Path(hf_hub_download("gpt2", "tokenizer.json"))
    except Exception as e:  # network errors come in many types
        raise HubUnreachableError(f"data.tokenizer=gpt2-hub: download failed ({e}); use data.tokenizer=gpt2 (bundled)") from e


class CharTokenizer(TextTokenizer):
    """One token per character; the vocabulary is the sorted set of a corpus's characters. No BOS/EOS."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("a character vocabulary needs at least one character (the corpus is empty)")
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("a character vocabulary must be distinct single characters")
        self.chars, self.vocab_size, self.name = chars, len(chars), "char"
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - self._index.keys())
            shown = ", ".join(repr(c) for c in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise ValueError(
                f"character{'s' if len(missing) > 1 else ''} {shown} not in the {self.vocab_size}-character vocabulary of "
                "this corpus; remove them from the text or rebuild the vocabulary from a corpus that contains them"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def fingerprint(self) -> str:
        return _sha256({"type": "char", "chars": "".join(self.chars)})

    def state(self) -> dict[str, Any]:
        return {"kind": "char", "chars": "".join(self.chars)}

    to_dict = state

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharTokenizer:
        return cls(list(d["chars"]))


def tokenizer_from_state(state: dict[str, Any]) -> TextTokenizer:
    """Rebuild a tokenizer from ``TextTokenizer.state()`` (as stored in cache metadata and checkpoints)."""
    kind = state.get("kind")
    if kind == "char":
        return CharTokenizer.from_dict(state)
    if kind != "gpt2":
        raise ValueError(f"unknown tokenizer state kind {kind!r} (expected 'gpt2' or 'char')")
    source, want = state.get("source", "bundled"), state.get("fingerprint")
    if "json" in state:
        tok = GPT2Tokenizer(source, text=state["json"])
    else:
        tok = GPT2Tokenizer("bundled")  # the hub copy has the same fingerprint; no network needed
        if want is not None and tok.fingerprint() != want:
            tok = GPT2Tokenizer(source)
    if want is not None and tok.fingerprint() != want:
        raise ValueError(
            f"tokenizer fingerprint {tok.fingerprint()[:12]} differs from the recorded {want[:12]}: "
            "the ids would mean other tokens; supply the original tokenizer.json"
        )
    return tok


def load_tokenizer(spec: str, corpus_text: str | None = None, path: str | None = None, timeout_s: float = 3.0) -> TextTokenizer:
    """A tokenizer from a config spec: ``gpt2`` (bundled), ``gpt2-hub`` (the hub's copy), ``char`` (the
    characters of ``corpus_text`` or of the text file at ``path``), else a path to a ``tokenizer.json``."""
    if spec == "gpt2":
        return GPT2Tokenizer("bundled")
    if spec == "gpt2-hub":
        return GPT2Tokenizer("hub", timeout_s=timeout_s)
    if spec == "char":
        if corpus_text is None and path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"char tokenizer: corpus file {path} not found; pass corpus_text or an existing path")
            corpus_text = Path(path).read_text(encoding="utf-8")
        if corpus_text is None:
            raise ValueError("the char tokenizer needs its corpus: pass corpus_text (or path to a text file)")
        return CharTokenizer.from_text(corpus_text)
    p = Path(spec).expanduser()
    if p.suffix == ".json" or p.exists():
        return GPT2Tokenizer(str(p))
    raise ValueError(f"unknown tokenizer {spec!r}: use gpt2, gpt2-hub, char or a path to a tokenizer.json")
