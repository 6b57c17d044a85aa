"""Sample-quality metrics (DUO's protocol): generative perplexity of judge-retokenised samples, each token ``j >= 1`` but
later EOS scored by ``CE(logits_{j-1}, y_j)``, per token and per UTF-8 byte (not rewarding text the judge splits finely);
and the unigram entropy to report beside it, since repetitive samples score a low perplexity."""

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
        mask &= ~(is_eos & (is_eos.long().cumsum(1) > 1))
    return mask


def token_nll(logits: Tensor, ids: Tensor) -> Tensor:
    """``nll[:, j] = CE(logits[:, j-1], ids[:, j])`` for ``j >= 1`` (column 0 is zero), in float32 or wider."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return F.pad(nll, (1, 0))


class GenerativePerplexity(Metric):
    """DDP-synchronised micro-averages ``gen_ppl``, ``nll_per_byte`` (and derived), and SEDD's per-sequence mean."""

    full_state_update = False

    def __init__(self, judge: CausalLogits, eos_id: int | None, max_length: int = 1024) -> None:
        super().__init__()
        self.judge, self.eos_id, self.max_length = judge, eos_id, max_length
        for name in ("nll_sum", "tokens", "bytes", "seq_ppl_sum", "seqs"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, ids: Tensor, attention_mask: Tensor | None = None, *, token_bytes: Tensor) -> None:
        """``ids [B, N]``: right-padded judge tokens (``attention_mask``: the real ones), ``token_bytes [B, N]`` their bytes."""
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
            "ppl_per_byte": torch.exp(nll_per_byte),
            "nll_per_byte": nll_per_byte,
            "bits_per_byte": nll_per_byte / math.log(2),
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
