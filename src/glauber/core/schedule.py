"""The time-dependent Glauber noising schedule: who is visited when, and how much signal survives.

Everything here is derived from a handful of numbers (sequence length ``L``, sweeps ``K``,
positions per step ``m``, the signal curve and clock, the visiting order), so that nothing is
configured twice: ``T = K * L / m`` steps, the positions ``S_t`` of every step, each position's
visit times, ``Pi_t(phi)`` of every visit and each position's signal level ``alpha_i(t)``.
See docs/METHOD.md, "Forward (noising) process".

Input checks and the hot path. Every check of a tensor's values (steps in range, token ids in the
vocabulary, ``0 < Pi_t(phi) < 1``) reads a device value back on the host: on an accelerator, a
synchronisation that stalls the queue, several per training or sampling step. So values are checked
where they enter (config load, the DataModule's token cache, the noise law's and the schedule's
construction, the public functions when a user calls them), and code that has already checked its
inputs runs its per-step work inside ``trusted_inputs()``, where those per-call checks are skipped
(``checks_enabled()`` is False). The explicit checks (``check_steps``, ``process.check_token_ids``)
always run when called. The schedule's tables are copied to a device once and cached there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from glauber.schema import choice, option

AlphaFn = Callable[[Tensor, float], Tensor]


def alpha_linear(s: Tensor, alpha_min: float) -> Tensor:
    """``alpha(s) = 1 - (1 - alpha_min) s``."""
    return 1.0 - (1.0 - alpha_min) * s


def alpha_cosine(s: Tensor, alpha_min: float) -> Tensor:
    """``alpha(s) = alpha_min + (1 - alpha_min) cos(pi s / 2)``."""
    return alpha_min + (1.0 - alpha_min) * torch.cos(0.5 * math.pi * s)


def alpha_geometric(s: Tensor, alpha_min: float) -> Tensor:
    """``alpha(s) = alpha_min ** s``: every equal stretch of time keeps the same fraction of signal."""
    return torch.exp(s * math.log(alpha_min))


ALPHA_CURVES: dict[str, AlphaFn] = {
    "linear": alpha_linear,
    "cosine": alpha_cosine,
    "geometric": alpha_geometric,
}
CLOCKS = ("visit", "sweep")
ORDERS = ("round_robin", "strided", "random")

_TRUSTED: ContextVar[bool] = ContextVar("glauber_trusted_inputs", default=False)


def checks_enabled() -> bool:
    """Whether the per-call input checks of the public functions run: yes, except inside
    ``trusted_inputs()`` and while ``torch.compile`` traces (where reading a value breaks the graph)."""
    return not _TRUSTED.get() and not torch.compiler.is_compiling()


@contextmanager
def trusted_inputs() -> Iterator[None]:
    """Skip the per-call input checks (each a host-device synchronisation) inside the block.

    For loops whose inputs were checked where they entered: the training step (batches from a
    validated token cache, the first one checked again), the sampler (its entry checks ``x_init``,
    the steps come from the schedule). Nested use and threads are safe (a context variable)."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


Alpha = choice("Alpha", ALPHA_CURVES, __name__)
Clock = choice("Clock", CLOCKS, __name__)
Order = choice("Order", ORDERS, __name__)


@dataclass
class ScheduleConfig:
    """Typed schedule options (the sequence length comes from the data)."""

    alpha: Alpha = option(Alpha.linear, "signal curve alpha(s): linear, cosine or geometric")
    alpha_min: float = option(1e-3, "signal left at the end, 0 < alpha_min < 1; Pi_t(phi) > 0 needs it positive")
    clock: Clock = option(Clock.visit, "visit (g(tau) = (tau+1)/T) or sweep (g = (k+1)/K for sweep k)")
    sweeps: int = option(4, "K, the number of passes over the sequence; T = K * L / m sampling steps")
    positions_per_step: int = option(1, "m, the size of every visited set S_t; must divide L (data.seq_len)")
    order: Order = option(
        Order.round_robin,
        "round_robin (contiguous blocks, S_t = {t mod L} for m = 1), strided ({j + r L/m}), or random "
        "(a fixed random permutation per sweep)",
    )
    order_seed: int = option(0, "seed of the random order")


class GlauberSchedule:
    """All schedule quantities for one sequence length, as small precomputed tensors.

    Time convention: ``X_0`` is data; step ``t`` (``0 <= t < T``) turns ``X_t`` into ``X_{t+1}``
    by visiting the positions ``S_t = positions[t]``.

    The tables live on the CPU; the lookups (``signal_level``, ``step_positions``, ``pi_phi``,
    ``hidden_set``, ``hidden_mask``) read copies on the device of ``t``, made once per device and
    cached. They check ``t`` (integer steps in range) unless inside ``trusted_inputs()``.
    """

    def __init__(
        self,
        seq_len: int,
        sweeps: int = 4,
        positions_per_step: int = 1,
        alpha: str | AlphaFn = "linear",
        alpha_min: float = 1e-3,
        clock: str = "visit",
        order: str = "round_robin",
        order_seed: int = 0,
    ) -> None:
        check_count("seq_len", seq_len, 1)
        check_count("sweeps", sweeps, 1)
        check_count("positions_per_step", positions_per_step, 1)
        if seq_len % positions_per_step:
            raise ValueError(
                f"positions_per_step (m={positions_per_step}) must divide seq_len (L={seq_len}); "
                f"choose m among the divisors of {seq_len}"
            )
        if not (0.0 < alpha_min < 1.0):
            raise ValueError(
                f"alpha_min must satisfy 0 < alpha_min < 1 (got {alpha_min}); Pi_t(phi) > 0 at every "
                "step needs alpha_min > 0: use e.g. 1e-3"
            )
        if clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS} (got {clock!r})")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS} (got {order!r})")
        if isinstance(alpha, str):
            if alpha not in ALPHA_CURVES:
                raise ValueError(f"alpha must be one of {tuple(ALPHA_CURVES)} or a callable (got {alpha!r})")
            alpha_fn = ALPHA_CURVES[alpha]
        else:
            alpha_fn = alpha

        self.seq_len, self.sweeps, self.m = seq_len, sweeps, positions_per_step
        self.alpha_name = alpha if isinstance(alpha, str) else getattr(alpha, "__name__", "custom")
        self.alpha_min, self.clock, self.order, self.order_seed = alpha_min, clock, order, order_seed
        self.steps_per_sweep = seq_len // positions_per_step
        self.num_steps = sweeps * self.steps_per_sweep

        self.positions = _visiting_order(seq_len, sweeps, positions_per_step, order, order_seed)
        n, steps = self.steps_per_sweep, torch.arange(self.num_steps)
        visit_step = torch.empty(sweeps, seq_len, dtype=torch.long)
        for k in range(sweeps):
            block = self.positions[k * n : (k + 1) * n]
            visit_step[k, block.reshape(-1)] = steps[k * n : (k + 1) * n].repeat_interleave(positions_per_step)
        self.visit_step = visit_step

        if clock == "visit":
            g = (visit_step.double() + 1.0) / self.num_steps
        else:
            g = (torch.arange(sweeps, dtype=torch.float64)[:, None] + 1.0).expand(sweeps, seq_len) / sweeps
        levels = alpha_fn(g, alpha_min).to(torch.float64)
        at_zero = float(alpha_fn(torch.zeros(1, dtype=torch.float64), alpha_min)[0])
        if abs(at_zero - 1.0) > 1e-9:
            raise ValueError(f"alpha(0) must be 1 (got {at_zero}); the clean data holds all its signal")
        before = torch.cat([torch.ones(1, seq_len, dtype=torch.float64), levels[:-1]], dim=0)
        if not bool((levels < before).all()) or not bool((levels > 0).all()):
            raise ValueError(
                "alpha must be strictly decreasing and positive over the visit times "
                f"(alpha={self.alpha_name!r}, alpha_min={alpha_min}); a flat or rising alpha gives "
                "Pi_t(phi) >= 1 where no noise is added"
            )
        self.alpha_after_visit = levels  # (K, L): alpha(g(tau)) for the visit of i in sweep k
        self.pi_phi_visit = levels / before  # (K, L): Pi_tau(phi) of that visit
        # (K+1, L): signal level of position i after c completed visits (row 0: never visited).
        self._level_table = torch.cat([torch.ones(1, seq_len, dtype=torch.float64), levels], dim=0)
        sweep_of_step = steps // n
        self.step_pi_phi = self.pi_phi_visit[sweep_of_step[:, None], self.positions]  # (T, m)
        pi = self.step_pi_phi
        if not bool(((pi > 0) & (pi < 1)).all()):  # float64 rounding of levels / before
            raise ValueError(
                f"Pi_t(phi) must lie strictly in (0, 1) at every step (got {float(pi.min())}..{float(pi.max())}): "
                f"alpha={self.alpha_name!r} with alpha_min={alpha_min} falls too slowly between visits for float64"
            )
        # S_t in increasing order (the row-major order of a hidden mask) and Pi_t(phi) there, (T, m)
        order = self.positions.argsort(dim=1)
        self.sorted_positions = self.positions.gather(1, order)
        self.sorted_pi_phi = self.step_pi_phi.gather(1, order)
        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, seq_len: int) -> GlauberSchedule:
        return cls(
            seq_len,
            sweeps=cfg.sweeps,
            positions_per_step=cfg.positions_per_step,
            alpha=cfg.alpha,
            alpha_min=cfg.alpha_min,
            clock=cfg.clock,
            order=cfg.order,
            order_seed=cfg.order_seed,
        )

    def check_steps(self, t: Tensor, allow_end: bool = False) -> None:
        """Raise ``ValueError`` unless ``t`` holds integer steps in ``[0, T)`` (``[0, T]`` with allow_end).

        Reads ``t``'s extremes on the host (one synchronisation on an accelerator): the lookups call
        it only outside ``trusted_inputs()``."""
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"steps t must be integer tensors (got {t.dtype})")
        top = self.num_steps + int(allow_end)
        if t.numel():
            lo, hi = torch.stack(torch.aminmax(t)).tolist()
            if lo < 0 or hi >= top:
                raise ValueError(f"steps t must lie in [0, {top}) with T={self.num_steps} (got {lo}..{hi})")

    def table_on(self, name: str, device: torch.device) -> Tensor:
        """The table ``name`` (``positions``, ``sorted_positions``, ``step_pi_phi``, ``sorted_pi_phi``,
        ``visit_step``, ...) on ``device``: copied there once, then cached (a copy per call would be a
        host-to-device transfer, synchronising, at every step)."""
        key = (name, device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = getattr(self, name).to(device)
        return table

    def signal_level(self, t: Tensor) -> Tensor:
        """``alpha_i(t)`` for every position: the chance that ``X_t^i`` is still its clean token
        (else a draw from the noise law). ``t``: integer tensor ``[B]`` -> float64 ``[B, L]``."""
        if checks_enabled():
            self.check_steps(t, allow_end=True)
        vs = self.table_on("visit_step", t.device)
        completed = (vs[None, :, :] < t[:, None, None]).sum(dim=1)  # (B, L)
        return self.table_on("_level_table", t.device).gather(0, completed)

    def step_positions(self, t: Tensor) -> Tensor:
        """``S_t`` for each entry of ``t [B]`` -> long ``[B, m]``."""
        if checks_enabled():
            self.check_steps(t)
        return self.table_on("positions", t.device)[t]

    def pi_phi(self, t: Tensor) -> Tensor:
        """``Pi_t(phi)`` of each position of ``S_t`` -> float64 ``[B, m]``."""
        if checks_enabled():
            self.check_steps(t)
        return self.table_on("step_pi_phi", t.device)[t]

    def hidden_set(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``S_t`` in increasing order, long ``[B, m]``, and ``Pi_t(phi)`` there, float64 ``[B, m]``:
        the row-major order of ``hidden_mask(t)``, so row ``b * m + j`` of a network output at these
        positions belongs to ``(b, sorted_positions[t_b, j])``."""
        if checks_enabled():
            self.check_steps(t)
        return self.table_on("sorted_positions", t.device)[t], self.table_on("sorted_pi_phi", t.device)[t]

    def hidden_mask(self, t: Tensor) -> Tensor:
        """Boolean ``[B, L]`` mask of ``S_t``."""
        if checks_enabled():
            self.check_steps(t)
        pos = self.table_on("positions", t.device)[t]
        mask = torch.zeros(t.shape[0], self.seq_len, dtype=torch.bool, device=t.device)
        return mask.scatter_(1, pos, True)

    def describe(self) -> str:
        return (
            f"GlauberSchedule(L={self.seq_len}, K={self.sweeps}, m={self.m}, T={self.num_steps}, "
            f"alpha={self.alpha_name}, alpha_min={self.alpha_min}, clock={self.clock}, order={self.order})"
        )

    __repr__ = describe


def check_count(name: str, value: int, minimum: int) -> None:
    """Raise ``ValueError`` naming the option unless ``value`` is an integer ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (got {value!r})")


def _visiting_order(L: int, K: int, m: int, order: str, seed: int) -> Tensor:
    """``[T, m]`` table of the positions visited at each step; every sweep visits each position once."""
    n = L // m
    if order == "round_robin":
        sweep = torch.arange(L).reshape(n, m)
        return sweep.repeat(K, 1)
    if order == "strided":
        sweep = torch.arange(L).reshape(m, n).T.contiguous()
        return sweep.repeat(K, 1)
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(L, generator=gen).reshape(n, m) for _ in range(K)], dim=0)
