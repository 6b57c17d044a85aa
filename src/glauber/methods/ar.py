"""The autoregressive baseline: the same DDiT backbone with causal attention, trained by next-token
cross-entropy and sampled left to right (one network call per position, on a key/value cache).

Input of a sequence ``x [B, L]``: ``[BOS, x_0, ..., x_{L-2}]`` where BOS is the network's extra
embedding row ``V`` (the hidden-input row of the diffusion methods), so position ``i`` predicts
``x_i`` from ``x_{<i}`` and all ``L`` tokens are scored, the first one included. The network gets a
constant time input (0): there is no noise level.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from glauber.core.sampler import clamped_start, draw_categorical
from glauber.methods.base import GenerativeModule


class ARModule(GenerativeModule):
    """Next-token prediction with the DDiT backbone (``model.causal`` is forced to true).

    ``val/loss`` is the per-token negative log-likelihood in nats (exact, not a bound), comparable with
    MDLM's per-token NELBO; ``log_likelihood`` gives per-sequence NLLs, which makes a checkpoint a judge.
    """

    def __init__(self, cfg: dict | DictConfig, vocab_size: int | None = None) -> None:
        super().__init__(OmegaConf.merge(cfg, {"model": {"causal": True}}), vocab_size)

    def logits(self, ids: Tensor) -> Tensor:
        """``[B, N, V]``: row ``i`` is the model's distribution of ``ids[:, i]`` given ``ids[:, :i]``."""
        B, N = ids.shape
        bos = torch.full_like(ids[:, :1], self.vocab_size)
        time = torch.zeros(B, device=ids.device)
        return self.model(torch.cat([bos, ids[:, :-1]], dim=1), None, time).view(B, N, self.vocab_size)

    def token_nll(self, ids: Tensor) -> Tensor:
        """``[B, N]`` negative log-likelihood (nats) of each token given the ones before it."""
        return F.cross_entropy(self.logits(ids).float().transpose(1, 2), ids, reduction="none")

    @torch.no_grad()
    def log_likelihood(self, ids: Tensor) -> Tensor:
        """Per-sequence ``-log p(x)`` in nats ``[B]`` (float64 sum) with the EMA weights in eval mode;
        sequences may be shorter than ``data.seq_len``."""
        with self.eval_weights():
            return self.token_nll(ids.to(self.device)).double().sum(1)

    def compute_loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        per_row = self.token_nll(batch).mean(1)
        return per_row.mean(), {"per_row": per_row}

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        template: Tensor | None = None,
        clamp_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        float64: bool = True,
        progress: bool = False,
        **ignored: Any,
    ) -> Tensor:
        """``[num_samples, L]`` drawn left to right, one position per network call on a key/value cache.
        Clamped positions (``template``, ``clamp_mask``) are forced instead of drawn: a clamped prefix is a
        prompt; a clamped suffix cannot steer the tokens before it. ``ignored``: other methods' options."""
        L, B = self.cfg.data.seq_len, num_samples
        x, clamp = clamped_start(torch.zeros(B, L, dtype=torch.long, device=self.device), template, clamp_mask)
        self.last_sample_nfe = L
        with self.eval_weights():
            cache = self.model.new_cache(B, L)
            time = torch.zeros(B, device=self.device)
            token = torch.full((B,), self.vocab_size, dtype=torch.long, device=self.device)  # BOS
            for i in tqdm(range(L), desc="sampling", disable=not progress, leave=False):
                logits = self.model.decode_step(token, i, time, cache)
                drawn = draw_categorical(logits, temperature, top_p, generator, float64)
                x[:, i] = drawn if clamp is None else torch.where(clamp[:, i], x[:, i], drawn)
                token = x[:, i]
        return x
