"""The autoregressive baseline: the causal DDiT, sampled on a key/value cache. The input of ``x [B, L]`` is ``[BOS, x_0,
..., x_{L-2}]`` (BOS: the extra embedding row ``V``, time 0), so position ``i`` predicts ``x_i`` from ``x_{<i}``."""

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
    """Next-token prediction (``model.causal`` forced); ``val/loss``: the exact per-token NLL, to compare with MDLM's NELBO."""

    def __init__(self, cfg: dict | DictConfig, vocab_size: int | None = None) -> None:
        super().__init__(OmegaConf.merge(cfg, {"model": {"causal": True}}), vocab_size)

    def logits(self, ids: Tensor) -> Tensor:
        """``[B, N, V]``: row ``i`` is the model's distribution of ``ids[:, i]`` given ``ids[:, :i]``."""
        B, N = ids.shape
        x_in = torch.cat([torch.full_like(ids[:, :1], self.vocab_size), ids[:, :-1]], dim=1)  # BOS first
        return self.model(x_in, None, torch.zeros(B, device=ids.device)).view(B, N, self.vocab_size)

    def token_nll(self, ids: Tensor) -> Tensor:
        """``[B, N]`` negative log-likelihood (nats) of each token given the ones before it."""
        return F.cross_entropy(self.logits(ids).float().transpose(1, 2), ids, reduction="none")

    @torch.no_grad()
    def log_likelihood(self, ids: Tensor) -> Tensor:
        """Per-sequence ``-log p(x)`` in nats ``[B]`` (float64 sum), EMA weights, eval mode; any length up to ``data.seq_len``."""
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
        """``[num_samples, L]`` left to right; clamped positions are forced (a prefix prompts, a suffix cannot steer)."""
        L, B = self.cfg.data.seq_len, num_samples
        x, clamp = clamped_start(torch.zeros(B, L, dtype=torch.long, device=self.device), template, clamp_mask)
        self.last_sample_nfe = L
        with self.eval_weights():
            cache, time = self.model.new_cache(B, L), torch.zeros(B, device=self.device)
            token = torch.full((B,), self.vocab_size, dtype=torch.long, device=self.device)  # BOS
            for i in tqdm(range(L), desc="sampling", disable=not progress, leave=False):
                drawn = draw_categorical(self.model.decode_step(token, i, time, cache), temperature, top_p, generator, float64)
                x[:, i] = drawn if clamp is None else torch.where(clamp[:, i], x[:, i], drawn)
                token = x[:, i]
        return x
