"""Judges for generative perplexity and the evaluation of decoded samples: a Hugging Face causal LM (hub name, local
directory or GGUF file) or an AR checkpoint (``ckpt:PATH`` or ``*.ckpt``, own tokenizer), loaded once, in float32."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import Tensor

from data_modules.tokenizers import HubUnreachableError, hub_reachable
from glauber.eval.inference import checkpoint_tokenizer, load_checkpoint
from glauber.eval.metrics import GenerativePerplexity, UnigramEntropy


def _hub_cached(name: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not a hub repository id (e.g. a missing local path)
        return False


class HFJudge:
    """``judge(ids, mask) -> logits`` for a causal LM, with its tokenizer, EOS id and context length."""

    def __init__(
        self, name_or_path: str, device: str | torch.device = "cpu", gguf_file: str | None = None, timeout_s: float = 3.0
    ) -> None:
        if not Path(name_or_path).is_dir() and not _hub_cached(name_or_path) and not hub_reachable(timeout_s):
            raise HubUnreachableError(
                f"judge {name_or_path!r} is not a local directory, not in the Hugging Face cache, and the hub is "
                "unreachable (no internet?). Pass --judge /path/to/a/local/model_dir (save_pretrained of e.g. "
                "gpt2-large, made on a machine with internet), or a GGUF file with --judge-gguf"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        self.name = name_or_path if not gguf_file else f"{name_or_path}:{gguf_file}"
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kw)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32, **kw).to(device).eval()
        self.device = torch.device(device)
        self.eos_id = self.tokenizer.eos_token_id
        n_ctx = getattr(self.model.config, "max_position_embeddings", None) or getattr(self.model.config, "n_positions", 1024)
        self.max_length = min(int(n_ctx), 1024)

    @torch.no_grad()
    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device).long()).logits

    def decode(self, rows: list[list[int]]) -> list[str]:
        """Texts of token id lists, special tokens kept and spaces left as they are."""
        return self.tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def check_covers(self, chars: Iterable[str], what: str) -> None:
        """Nothing to refuse: a Hugging Face tokenizer encodes any text (bytes, or its own unknown token)."""

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded judge token ids, their mask and their ``token_bytes``, each text cut to the judge's context."""
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_length] for t in texts]
        return pad_rows(rows, self.eos_id, self.decode)


def token_bytes(rows: list[list[int]], decode: Callable[[list[list[int]]], list[str]], context: int = 8) -> list[list[int]]:
    """The UTF-8 bytes token ``j`` adds, ``bytes(decode(ids[:j + 1])) - bytes(decode(ids[:j]))`` on ``context`` tokens (exact
    for byte-level BPE, SentencePiece, characters); a sequence is off only where its ends cut a character, by <= 2 bytes."""
    windows = [w for r in rows for j in range(len(r)) for w in (r[max(0, j - context) : j], r[max(0, j - context) : j + 1])]
    sizes = [len(t.encode()) for t in decode(windows)]
    added = iter([after - before for before, after in zip(sizes[0::2], sizes[1::2])])
    return [[next(added) for _ in r] for r in rows]


def pad_rows(
    rows: list[list[int]], eos_id: int | None, decode: Callable[[list[list[int]]], list[str]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids ``[B, N]`` (EOS, or 0 without one), the mask of the real tokens and ``token_bytes`` (0 on padding)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), eos_id if eos_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    nbytes = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, b) in enumerate(zip(rows, token_bytes(rows, decode))):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
        nbytes[i, : len(r)] = torch.tensor(b, dtype=torch.long)
    return ids, mask, nbytes


class CheckpointJudge:
    """An AR checkpoint as a judge (``HFJudge``'s interface, its own tokenizer, EMA weights): ``judge(ids, mask)[:, j]`` is
    its distribution of ``ids[:, j + 1]``, so ``metrics.token_nll`` reads its exact conditionals."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.module = load_checkpoint(path, device)
        if self.module.cfg.method != "ar":
            raise ValueError(
                f"judge {path}: a checkpoint judge must be an autoregressive model (method: ar), "
                f"not method {self.module.cfg.method!r}"
            )
        self.module.float()
        self.tokenizer = checkpoint_tokenizer(self.module)
        self.name = f"ckpt:{path}"
        self.device = torch.device(device)
        self.eos_id = self.tokenizer.eos_id
        self.max_length = int(self.module.cfg.data.seq_len)

    @torch.no_grad()
    def __call__(self, ids: Tensor, mask: Tensor) -> Tensor:
        # Right padding never reaches the real tokens: the attention is causal.
        logits = self.module.logits(ids[:, : self.max_length].to(self.device))
        return torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)

    def decode(self, rows: list[list[int]]) -> list[str]:
        """Texts of token id lists (the checkpoint's tokenizer keeps special tokens)."""
        return [self.tokenizer.decode(r) for r in rows]

    def check_covers(self, chars: Iterable[str], what: str) -> None:
        """Refuse, naming them, the characters of ``what`` that this judge's character vocabulary lacks."""
        vocab = getattr(self.tokenizer, "chars", None)
        missing = sorted(set(chars) - set(vocab)) if vocab is not None else []
        if missing:
            shown = ", ".join(repr(c) for c in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise ValueError(
                f"judge {self.name} cannot score {what}: its {len(vocab)}-character vocabulary lacks {shown}. Use a judge "
                "whose vocabulary holds them: an AR checkpoint trained on the same corpus, or a byte-level judge such as "
                "gpt2-large"
            )

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``pad_rows`` of the texts in the checkpoint's tokenizer, cut to ``max_length`` (uncovered characters refused)."""
        self.check_covers("".join(texts), "these texts")
        return pad_rows([self.tokenizer.encode(t)[: self.max_length] for t in texts], self.eos_id, self.decode)


Judge = HFJudge | CheckpointJudge


@functools.lru_cache(maxsize=4)
def load_judge(name_or_path: str, device: str = "cpu", gguf_file: str | None = None) -> Judge:
    """The judge, loaded once per process: a checkpoint judge for ``ckpt:PATH`` or ``*.ckpt``, else a Hugging Face LM."""
    if name_or_path.startswith("ckpt:") or name_or_path.endswith(".ckpt"):
        path = name_or_path.removeprefix("ckpt:")
        if gguf_file:
            raise ValueError("--judge-gguf applies to Hugging Face judges, not to a checkpoint judge")
        if not Path(path).is_file():
            raise FileNotFoundError(f"judge checkpoint {path} not found")
        return CheckpointJudge(path, device)
    return HFJudge(name_or_path, device, gguf_file)


def evaluate_texts(
    texts: list[str],
    judge: Judge,
    sample_ids: Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    num_samples: int | None = None,
) -> dict[str, float]:
    """``GenerativePerplexity`` of decoded samples under ``judge``, and the unigram entropy of ``sample_ids`` (else the
    judge's tokens). Under DDP each rank passes its share: states live on ``device``, results cover all ``num_samples``."""
    ppl = GenerativePerplexity(judge, judge.eos_id, judge.max_length).to(device)
    entropy = UnigramEntropy().to(device)
    for start in range(0, len(texts), batch_size):
        ids, mask, nbytes = judge.encode(texts[start : start + batch_size])
        ppl.update(ids.to(device), mask.to(device), token_bytes=nbytes.to(device))
        if sample_ids is None:
            for row, m in zip(ids, mask):
                entropy.update(row[m][None])
    if sample_ids is not None:
        entropy.update(sample_ids)
    res = {k: int(v) if k.startswith("scored_") else float(v) for k, v in ppl.compute().items()}
    num_samples = len(texts) if num_samples is None else num_samples
    return {**res, "unigram_entropy": float(entropy.compute()), "num_samples": num_samples, "judge": judge.name}
