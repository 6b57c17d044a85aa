"""Exact laws of tiny problems (every state enumerated) and the oracle denoiser.

For ``V ** L`` small, the law of ``X_t`` is a tensor of shape ``(V,) * L``. This module gives the
closed-form and step-by-step laws, the exact conditionals ``P(X_t^i | X_t^{-S})`` wrapped as a
denoiser (the "oracle"), and the exact law of the sampler's output, so that the known-answer
checks of docs/METHOD.md can be run to machine precision. Not for real vocabularies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glauber.core.loss import bayes_h
from glauber.core.noise import NoiseLaw
from glauber.core.schedule import GlauberSchedule


def all_states(L: int, V: int) -> Tensor:
    """Every sequence in ``X^L`` as rows ``[V**L, L]``, in the order of ``state_codes``."""
    grids = torch.meshgrid(*[torch.arange(V)] * L, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def state_codes(x: Tensor, V: int) -> Tensor:
    """Mixed-radix code of each row (position 0 most significant), the flat index into a law tensor."""
    weights = V ** torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)
    return (x.long() * weights).sum(-1)


def random_law(L: int, V: int, generator: torch.Generator) -> Tensor:
    """A flat-Dirichlet random joint law (full support almost surely), shape ``(V,) * L``, float64."""
    p = -torch.rand(V**L, dtype=torch.float64, generator=generator).log()
    return (p / p.sum()).reshape((V,) * L)


def empirical_law(x: Tensor, V: int) -> Tensor:
    """Histogram of the rows of ``x`` as a law tensor ``(V,) * L``."""
    L = x.shape[1]
    counts = torch.bincount(state_codes(x, V), minlength=V**L).double()
    return (counts / counts.sum()).reshape((V,) * L)


def total_variation(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


def _apply_channel(P: Tensor, dim: int, keep: float, law: NoiseLaw) -> Tensor:
    """Position ``dim`` keeps its token with prob. ``keep``, else redraws it from ``u``."""
    V = P.shape[dim]
    M = keep * torch.eye(V, dtype=P.dtype) + (1 - keep) * law.probs.to(P.dtype)[None, :]
    return torch.movedim(torch.tensordot(P, M, dims=([dim], [0])), -1, dim)


def law_at(P0: Tensor, schedule: GlauberSchedule, law: NoiseLaw, t: int, clean_mask: Tensor | None = None) -> Tensor:
    """Law of ``X_t`` from the closed form (per-position signal levels ``alpha_i(t)``).
    ``clean_mask [L]`` marks positions that are never noised (infilling's clamped positions)."""
    level = schedule.signal_level(torch.tensor([t]))[0]
    P = P0
    for i in range(schedule.seq_len):
        if clean_mask is None or not bool(clean_mask[i]):
            P = _apply_channel(P, i, float(level[i]), law)
    return P


def forward_law_step(P: Tensor, schedule: GlauberSchedule, law: NoiseLaw, t: int) -> Tensor:
    """Law of ``X_{t+1}`` from the law of ``X_t`` by one step of the chain (no closed form used)."""
    for i, pi in zip(schedule.positions[t].tolist(), schedule.step_pi_phi[t].tolist()):
        P = _apply_channel(P, i, pi, law)
    return P


def marginal_conditionals(P: Tensor, hidden: list[int], law: NoiseLaw) -> list[Tensor]:
    """For each ``j`` in ``hidden``: ``P(X^j | X^{-hidden})`` as a tensor broadcastable to ``P``
    (size ``V`` along ``j``, 1 along the other hidden dims). Contexts of zero mass get ``u``."""
    V = P.shape[0]
    denom = P.sum(dim=hidden, keepdim=True)
    out = []
    for j in hidden:
        others = [d for d in hidden if d != j]
        num = P.sum(dim=others, keepdim=True) if others else P
        cond = num / denom
        shape = [1] * P.ndim
        shape[j] = V
        fallback = law.probs.to(P.dtype).reshape(shape).expand_as(cond)
        out.append(torch.where(denom.expand_as(cond) > 0, cond, fallback))
    return out


def reverse_law_step(Q: Tensor, P_t: Tensor, hidden: list[int], law: NoiseLaw) -> Tensor:
    """Law after one sampler step at ``t``: keep ``x^{-H}`` from ``Q`` and redraw each ``j`` in ``H``
    independently from ``P_t(X^j | x^{-H})`` (exact for ``|H| = 1``)."""
    if not hidden:
        return Q
    out = Q.sum(dim=hidden, keepdim=True)
    for cond in marginal_conditionals(P_t, hidden, law):
        out = out * cond
    return out


class OracleDenoiser:
    """The exact denoiser of a tiny problem: ``h = log P(X_t^i = . | X_t^{-S}) - log u``.

    Hidden sets are read from ``hidden_mask`` row by row, so it serves ``m >= 1`` and infilling.
    ``clean_mask [L]``: positions the oracle treats as never noised (infilling's clamped ones).
    Counts its calls in ``calls``.
    """

    def __init__(self, P0: Tensor, schedule: GlauberSchedule, law: NoiseLaw, clean_mask: Tensor | None = None) -> None:
        self.schedule, self.law, self.V, self.L = schedule, law, P0.shape[0], P0.ndim
        self.laws = [law_at(P0, schedule, law, t, clean_mask) for t in range(schedule.num_steps)]
        self.calls = 0

    def __call__(self, x_in: Tensor, hidden_mask: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        V, L = self.V, self.L
        h = torch.empty(int(hidden_mask.sum()), V, dtype=torch.float64)
        index = torch.full(hidden_mask.shape, -1, dtype=torch.long)
        index[hidden_mask] = torch.arange(h.shape[0])  # row of h for each hidden (row, position)
        patterns, which = torch.unique(torch.cat([t[:, None], hidden_mask.long()], dim=1), dim=0, return_inverse=True)
        for p_idx, pattern in enumerate(patterns):
            step, hidden = int(pattern[0]), pattern[1:].nonzero().flatten().tolist()
            if not hidden:
                continue
            rows = (which == p_idx).nonzero().flatten()
            base = x_in[rows].clone()
            base[:, hidden] = 0
            code0 = state_codes(base, V)
            for j, cond in zip(hidden, marginal_conditionals(self.laws[step], hidden, self.law)):
                flat = cond.expand((V,) * L).reshape(-1)
                codes = code0[:, None] + torch.arange(V)[None, :] * V ** (L - 1 - j)
                h[index[rows, j]] = bayes_h(flat[codes], self.law)
        return h

    def sampler_output_law(self, Q_start: Tensor, clean_mask: Tensor | None = None) -> Tensor:
        """Exact law of ``glauber_sample``'s output when started from the law ``Q_start``."""
        Q = Q_start
        for t in range(self.schedule.num_steps - 1, -1, -1):
            hidden = [i for i in self.schedule.positions[t].tolist() if clean_mask is None or not bool(clean_mask[i])]
            Q = reverse_law_step(Q, self.laws[t], sorted(hidden), self.law)
        return Q


def product_noise_law(law: NoiseLaw, L: int) -> Tensor:
    """``prod_i u`` as a law tensor."""
    P = law.probs
    for _ in range(L - 1):
        P = torch.tensordot(P, law.probs, dims=0)
    return P


def sample_law(P: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` exact draws from a law tensor, as rows ``[n, L]``."""
    V, L = P.shape[0], P.ndim
    codes = torch.multinomial(P.reshape(-1), n, replacement=True, generator=generator)
    return all_states(L, V)[codes]
