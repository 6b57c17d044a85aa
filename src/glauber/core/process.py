"""The forward (noising) process: the closed-form draw of ``X_t`` and a slow step-by-step reference.

After its last visit before ``t``, position ``i`` holds its clean token with probability
``alpha_i(t)`` and otherwise a fresh draw from ``u``, independently across positions, so ``X_t`` is
drawn from ``X_0`` for a whole batch of different ``t`` at once.

The public functions check their inputs (shapes, token ids, steps) unless called inside
``schedule.trusted_inputs()``; the training step checks its data where it enters and calls
``make_training_example`` there, where nothing reads a device value back on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glauber.core.noise import NoiseLaw
from glauber.core.schedule import GlauberSchedule, checks_enabled, trusted_inputs


def check_token_ids(x: Tensor, vocab_size: int, name: str = "tokens") -> None:
    """Raise ``ValueError`` unless ``x`` is an integer tensor of ids in ``[0, vocab_size)``.

    Reads ``x``'s extremes on the host (one synchronisation on an accelerator): call it where data
    enters, not per step."""
    if x.dtype not in (torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"{name} must hold integer token ids (got dtype {x.dtype})")
    if x.numel():
        lo, hi = torch.stack(torch.aminmax(x)).tolist()
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{name} holds token ids in [{lo}, {hi}], outside the vocabulary "
                f"[0, {vocab_size}); check the tokenizer and vocab_size agree"
            )


def check_batch(x0: Tensor, schedule: GlauberSchedule, law: NoiseLaw, name: str = "x0") -> None:
    """Raise ``ValueError`` unless ``x0`` is ``[B, L]`` of token ids of ``law``'s vocabulary."""
    if x0.ndim != 2 or x0.shape[1] != schedule.seq_len:
        raise ValueError(f"sequences must have shape [B, L={schedule.seq_len}] (got {tuple(x0.shape)})")
    check_token_ids(x0, law.vocab_size, name)


def noise_to(x0: Tensor, t: Tensor, schedule: GlauberSchedule, law: NoiseLaw, generator: torch.Generator | None = None) -> Tensor:
    """Draw ``X_t`` given ``X_0 = x0`` for each row's own step ``t`` (``0 <= t <= T``), in closed form.
    Checks ``x0`` and ``t`` unless inside ``trusted_inputs()``."""
    t = t.to(x0.device)
    if checks_enabled():
        check_batch(x0, schedule, law)
        schedule.check_steps(t, allow_end=True)
    with trusted_inputs():
        level = schedule.signal_level(t)
    keep = torch.rand(level.shape, dtype=torch.float64, device=x0.device, generator=generator) < level
    noise = law.to(x0.device).sample(tuple(x0.shape), generator)
    return torch.where(keep, x0, noise)


def forward_step(x: Tensor, t: int, schedule: GlauberSchedule, law: NoiseLaw, generator: torch.Generator | None = None) -> Tensor:
    """One step of the chain, ``X_t -> X_{t+1}``: each ``i`` in ``S_t`` keeps its token with prob.
    ``Pi_t(phi)``, else takes ``z ~ u``. Reference implementation (used by tests)."""
    pos = schedule.positions[t].to(x.device)
    pi_phi = schedule.step_pi_phi[t].to(x.device)
    keep = torch.rand((x.shape[0], pos.numel()), dtype=torch.float64, device=x.device, generator=generator) < pi_phi
    z = law.to(x.device).sample((x.shape[0], pos.numel()), generator)
    out = x.clone()
    out[:, pos] = torch.where(keep, x[:, pos], z)
    return out


def simulate_forward(
    x0: Tensor, t: Tensor, schedule: GlauberSchedule, law: NoiseLaw, generator: torch.Generator | None = None
) -> Tensor:
    """``X_t`` by running the chain step by step (slow reference; rows stop at their own ``t``)."""
    check_batch(x0, schedule, law)
    schedule.check_steps(t, allow_end=True)
    x = x0.clone()
    for s in range(int(t.max()) if t.numel() else 0):
        active = t > s
        stepped = forward_step(x, s, schedule, law, generator)
        x = torch.where(active[:, None], stepped, x)
    return x


STEP_WEIGHTINGS = ("uniform", "inverse_noise")


def step_probs(schedule: GlauberSchedule, weighting: str = "uniform") -> Tensor:
    """The training law of ``t`` over ``0..T-1`` (float64): uniform (the paper), or in proportion to the
    mean over ``S_t`` of ``1 / (1 - Pi_t(phi))`` (``inverse_noise``). A near-clean step adds noise
    with probability ``1 - Pi_t(phi)`` only, so the binary classifier sees few negatives there and learns
    slowly; ``inverse_noise`` visits those steps more often. The minimiser is unchanged."""
    pi = schedule.step_pi_phi.double()
    if weighting == "uniform":
        w = torch.ones(schedule.num_steps, dtype=torch.float64)
    elif weighting == "inverse_noise":
        w = (1 / (1 - pi)).mean(1)
    else:
        raise ValueError(f"step weighting must be one of {STEP_WEIGHTINGS} (got {weighting!r})")
    return w / w.sum()


@dataclass
class TrainingExample:
    """One batch of denoising problems at random steps.

    x_in: ``X_t`` with the positions of ``S_t`` replaced by ``hidden_id`` ``[B, L]``.
    hidden_mask: ``S_t`` as a boolean mask ``[B, L]``.
    positions: ``S_t`` as indices ``[B, m]`` (sorted), targets ``X_t^i`` there ``[B, m]``.
    t: the steps ``[B]``; pi_phi: ``Pi_t(phi)`` at each hidden position ``[B, m]`` (float64).
    """

    x_in: Tensor
    hidden_mask: Tensor
    positions: Tensor
    targets: Tensor
    t: Tensor
    pi_phi: Tensor


def make_training_example(
    x0: Tensor,
    schedule: GlauberSchedule,
    law: NoiseLaw,
    hidden_id: int,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    t_probs: Tensor | None = None,
) -> TrainingExample:
    """Draw ``t`` per row (unless given: ``U{0..T-1}``, or ``t_probs`` from ``step_probs``), ``X_t`` in
    closed form, and hide ``S_t``.

    Checks ``x0`` (shape, token ids), a given ``t`` and ``t_probs`` unless inside ``trusted_inputs()``;
    there it makes no host-device synchronisation (``t_probs`` is drawn by inverse CDF on the device)."""
    B = x0.shape[0]
    if checks_enabled():
        check_batch(x0, schedule, law)
        if t is not None:
            schedule.check_steps(t)
        if t_probs is not None:
            _check_step_probs(t_probs, schedule)
    if t is None and t_probs is None:
        t = torch.randint(0, schedule.num_steps, (B,), device=x0.device, generator=generator)
    elif t is None:
        cdf = t_probs.to(device=x0.device, dtype=torch.float64).cumsum(0)
        r = torch.rand(B, dtype=torch.float64, device=x0.device, generator=generator) * cdf[-1]
        t = torch.searchsorted(cdf, r, right=True).clamp_(max=schedule.num_steps - 1)
    else:
        t = t.to(x0.device)
    with trusted_inputs():
        xt = noise_to(x0, t, schedule, law, generator)
        pos, pi = schedule.hidden_set(t)
        mask = schedule.hidden_mask(t)
    x_in = xt.masked_fill(mask, hidden_id)
    return TrainingExample(x_in, mask, pos, xt.gather(1, pos), t, pi)


def _check_step_probs(t_probs: Tensor, schedule: GlauberSchedule) -> None:
    if t_probs.shape != (schedule.num_steps,):
        raise ValueError(f"t_probs must have shape [T={schedule.num_steps}] (got {tuple(t_probs.shape)})")
    if not bool((torch.isfinite(t_probs) & (t_probs >= 0)).all() & (t_probs.sum() > 0)):
        raise ValueError("t_probs must be finite, >= 0 and not all zero (see step_probs)")
