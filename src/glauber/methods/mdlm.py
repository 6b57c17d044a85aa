"""The MDLM baseline: masked diffusion on the DDiT backbone. Each token is masked (row ``V``) with probability
``1 - alpha(t)``, ``alpha(t) = 1 - (1 - eps) t``; SUBS: the network predicts clean tokens at masked positions only.
The NELBO ``E_t [alpha'(t) / (1 - alpha(t)) sum_{masked i} log p(x_i | x_t)]`` has weight ``-1/t`` here, so the loss
of a sequence is ``(1/t) sum_{masked i} CE_i``, reported per token."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from glauber.core.sampler import clamped_start, draw_categorical
from glauber.methods.base import GenerativeModule

CACHE_NEEDS_NO_TIME = (
    "mdlm.sampler=cache reuses network outputs across steps, valid only for a time-independent network "
    "(without time conditioning): set mdlm.time_conditioning=false or mdlm.sampler=ancestral"
)


class MDLMModule(GenerativeModule):
    """MDLM with an ancestral or caching sampler. ``val/loss``, the NELBO per token in nats, bounds the AR baseline's
    per-token NLL up to the terms MDLM also leaves out (``t < eps``, and the prior term: ``alpha(1) = eps``, not 0)."""

    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still unmasked at time ``t``."""
        return 1 - (1 - self.cfg.mdlm.eps) * t

    def network(self, x_in: Tensor, hidden: Tensor, t: Tensor) -> Tensor:
        """``h [N, V]`` at the masked positions; time input ``t`` or a constant 0 without time conditioning."""
        time = t.float() if self.cfg.mdlm.time_conditioning else torch.zeros(x_in.shape[0], device=x_in.device)
        return self.model(x_in, hidden, time)

    def draw_times(self, B: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """``t`` in ``[eps, 1]`` from ``(u + i / B) mod 1``, one uniform ``u``: evenly spread, for a lower variance."""
        u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
        s = (u + torch.arange(B, device=device, dtype=torch.float64) / B) % 1
        eps = self.cfg.mdlm.eps
        return (eps + (1 - eps) * s).float()

    def compute_loss(self, batch: Tensor, generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        B, L = batch.shape
        t = self.draw_times(B, generator, batch.device)
        masked = torch.rand((B, L), generator=generator, device=batch.device) < (1 - self.alpha(t))[:, None]
        h = self.network(batch.masked_fill(masked, self.vocab_size), masked, t)
        ce = F.cross_entropy(h.float(), batch[masked], reduction="none")
        per_row_ce = torch.zeros(B, device=batch.device, dtype=ce.dtype).index_add(0, masked.nonzero(as_tuple=True)[0], ce)
        per_row = per_row_ce / t / L  # weight -alpha'(t) / (1 - alpha(t)) = 1/t; per token
        return per_row.mean(), {"per_row": per_row, "time": t, "masked": masked.sum(1)}

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        steps: int | None = None,
        template: Tensor | None = None,
        clamp_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        float64: bool = True,
        progress: bool = False,
        sampler: str | None = None,
        **ignored: Any,
    ) -> Tensor:
        """``[num_samples, L]`` from all-masked in ``steps`` steps (default ``mdlm.steps`` or ``L``) unmasking each position
        w.p. ``(alpha(s) - alpha(t)) / (1 - alpha(t))``; sampler ``cache`` reruns only changed rows (the same samples)."""
        sampler = sampler or self.cfg.mdlm.sampler
        if sampler not in ("ancestral", "cache"):
            raise ValueError(f"mdlm.sampler must be 'ancestral' or 'cache' (got {sampler!r})")
        if sampler == "cache" and self.cfg.mdlm.time_conditioning:
            raise ValueError(CACHE_NEEDS_NO_TIME)
        steps = steps or self.cfg.mdlm.steps or self.cfg.data.seq_len
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (got {steps})")
        L, B, V = self.cfg.data.seq_len, num_samples, self.vocab_size
        x, _ = clamped_start(torch.full((B, L), V, dtype=torch.long, device=self.device), template, clamp_mask)
        calls, row_evals = 0, 0
        h_cache: Tensor | None = None
        changed = torch.ones(B, dtype=torch.bool, device=self.device)  # rows whose cached output is stale
        with self.eval_weights():
            for k in tqdm(range(steps, 0, -1), desc="sampling", disable=not progress, leave=False):
                masked = x == V
                if not bool(masked.any()):
                    break
                t = torch.full((B,), k / steps, dtype=torch.float64, device=self.device)
                if sampler == "ancestral" or h_cache is None or bool(changed.all()):
                    h = self.network(x, masked, t)
                    calls, row_evals = calls + 1, row_evals + B
                elif bool(changed.any()):  # fresh outputs for the changed rows, cached ones (row-major) elsewhere
                    h = h_cache.clone()
                    h[changed[masked.nonzero(as_tuple=True)[0]]] = self.network(x[changed], masked[changed], t[changed])
                    calls, row_evals = calls + 1, row_evals + int(changed.sum())
                else:
                    h = h_cache
                # (alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t = 1 / k
                unmask = torch.rand(h.shape[0], generator=generator, device=self.device, dtype=torch.float64) < 1.0 / k
                tokens = draw_categorical(h[unmask], temperature, top_p, generator, float64)
                pos = masked.nonzero(as_tuple=True)
                x[pos[0][unmask], pos[1][unmask]] = tokens
                changed = torch.zeros(B, dtype=torch.bool, device=self.device).index_fill_(0, pos[0][unmask], True)
                changed &= (x == V).any(1)  # a row with nothing left to unmask is never evaluated again
                if sampler == "cache":
                    h_cache = h[~unmask]  # the outputs at the positions still masked, in row-major order
        self.last_sample_nfe = row_evals / B
        self.last_sample_stats = dict(steps=steps, network_calls=calls, row_evaluations=row_evals, nfe_per_sequence=row_evals / B)
        return x
