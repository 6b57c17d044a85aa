"""Sample-quality metrics: generative perplexity under a judge LM, and unigram entropy.

Protocol (DUO's): samples are decoded, retokenised with the judge's tokenizer and cut to
its context; each token ``y_j`` with ``j >= 1`` is scored by ``CE(logits_{j-1}, y_j)`` (the first token
never is); EOS tokens after the first one in a sequence are not scored. ``gen_ppl`` is the
micro-average ``exp(sum nll / scored tokens)`` over all samples (synchronised across processes);
``gen_ppl_per_seq`` is SEDD's mean of per-sequence perplexities (larger on the same samples).
Always report the unigram entropy beside it: degenerate, repetitive samples score a low perplexity.

Per token, a perplexity depends on the judge's tokenizer: text it splits into many short tokens (near-random
characters) scores well per token however unlikely it is per character. ``nll_per_byte`` divides the same
sum of nll by the UTF-8 bytes of text the same scored tokens cover: the decoded text past the first token,
within the judge's context, less any later EOS (``token_bytes``, what each token adds to the decoded text:
``judges.token_bytes``). Micro-averaged like ``gen_ppl``, so ``nll_per_byte * scored_bytes`` is the total
nll; ``bits_per_byte = nll_per_byte / ln 2``, ``ppl_per_byte = exp(nll_per_byte)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

CausalLogits = Callable[[Tensor, Tensor], Tensor]  # (ids [B, N], attention mask [B, N]) -> logits [B, N, V]


def scored_mask(ids: Tensor, attention_mask: Tensor, eos_id: int | None) -> Tensor:
    """Which target positions count: ``j >= 1``, inside the sequence, and not an EOS after the first."""
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    if eos_id is not None:
        is_eos = ids == eos_id
        later_eos = is_eos & (is_eos.long().cumsum(1) > 1)
        mask &= ~later_eos
    return mask


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """``nll[:, j] = CE(logits[:, j-1], ids[:, j])`` for ``j >= 1`` (column 0 is zero), in float32 or wider."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return F.pad(nll, (1, 0))


class GenerativePerplexity(Metric):
    """Generative perplexity of judge-tokenised samples (both averages) and the nll per byte, DDP-synchronised."""

    full_state_update = False

    def __init__(self, judge: CausalLogits, eos_id: int | None, max_length: int = 1024) -> None:
        super().__init__()
        self.judge, self.eos_id, self.max_length = judge, eos_id, max_length
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seq_ppl_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("seqs", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, ids: Tensor, attention_mask: Tensor | None = None, *, token_bytes: Tensor) -> None:
        """``ids [B, N]``: samples in the judge's tokens (right-padded; ``attention_mask`` marks real ones);
        ``token_bytes [B, N]``: the UTF-8 bytes each token adds to the decoded text."""
        ids = ids[:, : self.max_length]
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask[:, : self.max_length].bool()
        nll = token_nll(self.judge(ids, mask), ids).double()
        scored = scored_mask(ids, mask, self.eos_id)
        per_seq_nll = (nll * scored).sum(1)
        per_seq_tokens = scored.sum(1)
        keep = per_seq_tokens > 0
        self.nll_sum += per_seq_nll.sum()
        self.tokens += per_seq_tokens.sum()
        self.bytes += (token_bytes[:, : self.max_length].to(scored.device).double() * scored).sum()
        self.seq_ppl_sum += torch.exp(per_seq_nll[keep] / per_seq_tokens[keep]).sum()
        self.seqs += keep.sum()

    def compute(self) -> dict[str, Tensor]:
        nll_per_byte = self.nll_sum / self.bytes
        return {
            "gen_ppl": torch.exp(self.nll_sum / self.tokens),
            "gen_ppl_per_seq": self.seq_ppl_sum / self.seqs,
            "scored_tokens": self.tokens,
            "nll_per_byte": nll_per_byte,
            "bits_per_byte": nll_per_byte / math.log(2),
            "ppl_per_byte": torch.exp(nll_per_byte),
            "scored_bytes": self.bytes,
        }


def unigram_entropy(ids: Tensor) -> Tensor:
    """Per sample ``H = -sum_v p_v ln p_v`` of its token counts (nats; ``ln N`` is the ceiling)."""
    out = torch.empty(ids.shape[0], dtype=torch.float64)
    for i, row in enumerate(ids):
        p = torch.unique(row, return_counts=True)[1].double() / row.numel()
        out[i] = -(p * p.log()).sum()
    return out


class UnigramEntropy(Metric):
    """Mean unigram entropy of samples, DDP-synchronised."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, ids: Tensor) -> None:
        h = unigram_entropy(ids.cpu())
        self.total += h.sum().to(self.total.device)
        self.count += h.numel()

    def compute(self) -> Tensor:
        return self.total / self.count
