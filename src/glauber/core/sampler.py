"""Reverse Glauber (heat-bath) dynamics: sampling, corrector sweeps and infilling with any denoiser.

A denoiser is a callable ``f(x_in, hidden_mask, t) -> h``: ``x_in [B, L]`` holds tokens with the
hidden positions set to ``hidden_id``, ``hidden_mask [B, L]`` marks them, ``t [B]`` is the step;
it returns ``h [N, V]`` for the ``N`` hidden positions in ``hidden_mask.nonzero()`` order (row-major),
so the vocabulary head is computed only where a token is drawn. ``p_t(.|c) = softmax(h + log u)``.

A denoiser whose attribute ``takes_positions`` is true (the GGM network's adapter) is instead given
``S_t`` as sorted positions ``[B, m]`` (``GlauberSchedule.hidden_set``) and returns ``h [B * m, V]``
in that order: static shapes, so neither the sampler nor the network reads a count or an index set
back on the host. Under infilling the clamped positions of ``S_t`` are among them, shown with their
tokens in ``x_in`` (not ``hidden_id``); their rows of ``h`` are ignored.

Host-device synchronisations: the entry points check their inputs once (``x_init``'s token ids);
the steps then run inside ``schedule.trusted_inputs()`` and make none, except under infilling:
one per reverse pass (the sampling run, each corrector sweep) to find the steps whose hidden set is
wholly clamped (skipped), and for a denoiser that takes masks, the count of free hidden positions
and the masked write at every step (the network's adapter takes positions: none per step).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from glauber.core.loss import denoising_logits
from glauber.core.noise import NoiseLaw
from glauber.core.process import check_token_ids, noise_to
from glauber.core.schedule import GlauberSchedule, check_count, checks_enabled, trusted_inputs

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]


def draw_categorical(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    float64: bool = True,
) -> Tensor:
    """One draw per row of ``softmax(logits / temperature)``, restricted to the top-``p`` nucleus.

    The draw is an inverse-CDF lookup in float64 by default: float32 Gumbel tricks lower the
    effective temperature and flatter generative perplexity."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")
    if not (0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (got {top_p})")
    dtype = torch.float64 if float64 else torch.float32
    probs = torch.softmax(logits.to(dtype) / temperature, dim=-1)
    if top_p < 1:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each entry
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    cdf = probs.cumsum(-1)
    r = torch.rand((probs.shape[0], 1), dtype=dtype, device=probs.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, r, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def glauber_sample(
    denoiser: Denoiser,
    schedule: GlauberSchedule,
    law: NoiseLaw,
    num_samples: int | None = None,
    *,
    x_init: Tensor | None = None,
    clamp_mask: Tensor | None = None,
    corrector_sweeps: int = 0,
    hidden_id: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    float64: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Tensor:
    """Run ``t = T-1 .. 0``: hide ``S_t`` (minus clamped positions), call the denoiser once, redraw;
    then ``corrector_sweeps`` corrector sweeps (see ``glauber_correct``).

    Starts from ``x_init`` when given (e.g. an exact draw of ``X_T``), else from ``prod_i u``.
    ``clamp_mask`` (``[L]`` or ``[B, L]``) marks positions that are never updated; their values come
    from ``x_init``. Network calls: ``T + corrector_sweeps * L / m`` (steps whose hidden set is all
    clamped are skipped). Returns the final ``X_0`` draw ``[B, L]``.
    """
    check_count("corrector_sweeps", corrector_sweeps, 0)
    V, L = law.vocab_size, schedule.seq_len
    if x_init is None:
        if num_samples is None or num_samples < 1:
            raise ValueError("give num_samples >= 1 or an x_init to start from")
        if clamp_mask is not None:
            raise ValueError("clamp_mask needs x_init holding the clamped tokens (see infill())")
        x = law.to(device or "cpu").sample((num_samples, L), generator)
    else:
        _check_tokens(x_init, L, V, "x_init")
        x = x_init.to(device or x_init.device, torch.long).clone()
    clamp = _broadcast_clamp(clamp_mask, x.shape[0], L, x.device)
    draw = dict(hidden_id=V if hidden_id is None else hidden_id, temperature=temperature, top_p=top_p, float64=float64)
    steps = range(schedule.num_steps - 1, -1, -1)
    _reverse_steps(denoiser, schedule, law, x, clamp, steps, generator, progress, "sampling", **draw)
    with trusted_inputs():  # x is the sampler's own draw
        return glauber_correct(
            denoiser, schedule, law, x, corrector_sweeps, clamp_mask=clamp, generator=generator, progress=progress, **draw
        )


@torch.no_grad()
def glauber_correct(
    denoiser: Denoiser,
    schedule: GlauberSchedule,
    law: NoiseLaw,
    x: Tensor,
    sweeps: int = 1,
    *,
    clamp_mask: Tensor | None = None,
    hidden_id: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    float64: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """``sweeps`` corrector sweeps on a draw ``x [B, L]`` of ``X_0``, ``L / m`` network calls each.

    A sweep re-noises every free position once as the first forward sweep does (``X_0 -> X_{L/m}``
    in closed form, no network call), then re-runs the reverse steps ``t = L/m - 1 .. 0``.

    Why these hidden sets: step ``t`` redraws ``S_t`` from ``P(X_t^{S_t} | X_t^{-S_t})``, a heat-bath
    update that leaves the law of ``X_t`` invariant, so repeating step 0 would be a Gibbs sampler on
    the data conditionals; but the network learned a clean-context conditional only for ``S_0``.
    It knows position ``i`` at the step ``tau_i < L/m`` of its first forward visit, whose context
    is noised at the positions visited before ``tau_i``. Re-running those steps on the clean
    ``X_0`` would show it inputs it never saw in training, and is biased even with the exact
    conditionals (TV 8e-3 to 4e-2 away from the data law itself in the tests). Re-noising first
    gives every call the inputs of training and makes the sweep a forward-backward kernel: the
    noise maps ``P_0`` to ``P_{L/m}`` and the steps map it back, so for ``m = 1`` the (learned)
    data law is invariant and, by data processing, no sweep increases the TV to it. For ``m > 1``
    the steps are factorised, as in sampling. The price: a sweep moves position ``i`` only as much
    as its first-visit noise ``1 - alpha_i(L/m)`` allows, little when ``K`` is large on the visit
    clock.
    ``clamp_mask`` positions are never noised nor redrawn.
    """
    check_count("sweeps", sweeps, 0)
    V, L = law.vocab_size, schedule.seq_len
    _check_tokens(x, L, V, "x")
    clamp = _broadcast_clamp(clamp_mask, x.shape[0], L, x.device)
    draw = dict(hidden_id=V if hidden_id is None else hidden_id, temperature=temperature, top_p=top_p, float64=float64)
    n = schedule.steps_per_sweep
    first_sweep_done = torch.full((x.shape[0],), n, dtype=torch.long, device=x.device)
    for _ in range(sweeps):
        with trusted_inputs():
            noised = noise_to(x, first_sweep_done, schedule, law, generator)
        x = noised if clamp is None else torch.where(clamp, x, noised)
        _reverse_steps(denoiser, schedule, law, x, clamp, range(n - 1, -1, -1), generator, progress, "correcting", **draw)
    return x


def _reverse_steps(
    denoiser: Denoiser,
    schedule: GlauberSchedule,
    law: NoiseLaw,
    x: Tensor,
    clamp: Tensor | None,
    steps: range,
    generator: torch.Generator | None,
    progress: bool,
    desc: str,
    hidden_id: int,
    temperature: float,
    top_p: float,
    float64: bool,
) -> None:
    """The heat-bath steps ``t`` in ``steps`` on ``x`` in place, one denoiser call each.

    Runs inside ``trusted_inputs()`` (the callers checked ``x``; the steps are the schedule's). Without
    a clamp every row hides exactly ``m`` positions, so a step makes no host-device synchronisation:
    the hidden set comes from the schedule's cached table, ``h`` has ``B * m`` rows and the draws are
    scattered back to those positions. With a clamp (infilling), one synchronisation per call finds
    the steps whose hidden set is wholly clamped (skipped); a denoiser that takes positions is still
    synchronisation-free per step (the draws at clamped positions are discarded), one that takes a
    mask needs the count of free positions and a masked write at each step."""
    B, V, m = x.shape[0], law.vocab_size, schedule.m
    law = law.to(x.device)
    by_positions = bool(getattr(denoiser, "takes_positions", False))
    with trusted_inputs():
        skip = None
        if clamp is not None:  # steps whose hidden set is clamped in every row: one transfer per call
            free = (~clamp)[:, schedule.table_on("positions", x.device)]  # (B, T, m)
            skip = (~free.any(dim=2).any(dim=0)).tolist()
        for t in tqdm(steps, desc=desc, disable=not progress, leave=False):
            if skip is not None and skip[t]:
                continue
            t_vec = torch.full((B,), t, dtype=torch.long, device=x.device)
            pos, _ = schedule.hidden_set(t_vec)  # (B, m), the row-major order of `hidden`
            hidden = schedule.hidden_mask(t_vec)
            if clamp is not None:
                hidden &= ~clamp
            x_in = x.masked_fill(hidden, hidden_id)
            if by_positions or clamp is None:
                rows = B * m
                h = denoiser(x_in, pos, t_vec) if by_positions else denoiser(x_in, hidden, t_vec)
            else:  # a mask denoiser under infilling: as many rows as free hidden positions
                rows = int(hidden.sum())
                h = denoiser(x_in, hidden, t_vec)
            if h.shape != (rows, V):
                raise ValueError(f"denoiser returned shape {tuple(h.shape)}, expected [{rows}, {V}] (hidden positions x vocab)")
            drawn = draw_categorical(denoising_logits(h, law), temperature, top_p, generator, float64)
            if by_positions or clamp is None:
                drawn = drawn.view(B, m)
                if clamp is not None:
                    drawn = torch.where(clamp.gather(1, pos), x.gather(1, pos), drawn)
                x.scatter_(1, pos, drawn)
            else:
                x[hidden] = drawn


def infill(
    denoiser: Denoiser,
    schedule: GlauberSchedule,
    law: NoiseLaw,
    template: Tensor,
    clamp_mask: Tensor,
    generator: torch.Generator | None = None,
    **kwargs,
) -> Tensor:
    """Zero-shot infilling: keep ``template`` where ``clamp_mask`` is true, start the free positions
    from ``u`` and run the reverse dynamics on them only."""
    if template.ndim != 2 or template.shape[1] != schedule.seq_len:
        raise ValueError(f"template must have shape [B, L={schedule.seq_len}] (got {tuple(template.shape)})")
    clamp = _broadcast_clamp(clamp_mask, template.shape[0], schedule.seq_len, template.device)
    noise = law.to(template.device).sample(tuple(template.shape), generator)
    x_init = torch.where(clamp, template.long(), noise)
    return glauber_sample(denoiser, schedule, law, x_init=x_init, clamp_mask=clamp, generator=generator, **kwargs)


def clamped_start(x: Tensor, template: Tensor | None, clamp_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The start of an infilling sampler: ``x [B, L]`` with ``template``'s tokens written at the clamped
    positions, and the clamp as ``[B, L]`` (``x`` and None without a template)."""
    if template is None:
        return x, None
    if clamp_mask is None:
        raise ValueError("a template needs its clamp_mask")
    B, L = x.shape
    clamp = _broadcast_clamp(clamp_mask, B, L, x.device)
    return torch.where(clamp, template.to(x.device).long().expand(B, L), x), clamp


def _broadcast_clamp(clamp_mask: Tensor | None, B: int, L: int, device: torch.device) -> Tensor | None:
    if clamp_mask is None:
        return None
    if clamp_mask.dtype != torch.bool:
        raise ValueError(f"clamp_mask must be a boolean tensor (got {clamp_mask.dtype})")
    if clamp_mask.shape not in ((L,), (B, L)):
        raise ValueError(f"clamp_mask must have shape [L={L}] or [B={B}, L={L}] (got {tuple(clamp_mask.shape)})")
    return clamp_mask.to(device).expand(B, L).clone()


def _check_tokens(x: Tensor, L: int, V: int, name: str) -> None:
    """Shape (always: no synchronisation) and token ids (unless inside ``trusted_inputs()``)."""
    if x.ndim != 2 or x.shape[1] != L:
        raise ValueError(f"{name} must have shape [B, L={L}] (got {tuple(x.shape)})")
    if checks_enabled():
        check_token_ids(x, V, name)
