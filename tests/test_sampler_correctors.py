"""Corrector sweeps and a sampling-time number of sweeps: exact laws on enumerable problems (L = 4, V = 3)
with the oracle denoiser, the network-call count, and the plumbing through GGMModule and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from stats import tv_bound

from glauber.core.exact import (
    OracleDenoiser,
    empirical_law,
    law_at,
    product_noise_law,
    random_law,
    reverse_law_step,
    sample_law,
    total_variation,
)
from glauber.core.noise import NoiseLaw
from glauber.core.sampler import glauber_correct, glauber_sample, infill
from glauber.core.schedule import GlauberSchedule

L, V = 4, 3
N = 200_000
TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml"


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(4321)


def first_sweep_reverse(Q: torch.Tensor, oracle: OracleDenoiser, clean: torch.Tensor | None = None) -> torch.Tensor:
    """Exact law after the reverse steps ``t = L/m - 1 .. 0`` (clamped positions never redrawn)."""
    sched = oracle.schedule
    for t in range(sched.steps_per_sweep - 1, -1, -1):
        hidden = sorted(i for i in sched.positions[t].tolist() if clean is None or not bool(clean[i]))
        Q = reverse_law_step(Q, oracle.laws[t], hidden, oracle.law)
    return Q


def corrector_law(Q: torch.Tensor, oracle: OracleDenoiser, clean: torch.Tensor | None = None) -> torch.Tensor:
    """Exact law after one corrector sweep: the first forward sweep's noise (``law_at`` applied to ``Q``),
    then its reverse steps."""
    sched = oracle.schedule
    return first_sweep_reverse(law_at(Q, sched, oracle.law, sched.steps_per_sweep, clean), oracle, clean)


def dependent_law() -> torch.Tensor:
    """All positions equal with prob. 0.97 (check 4's law where m = 2 factorisation is visibly biased)."""
    P0 = torch.full((V,) * L, 0.03 / V**L, dtype=torch.float64)
    for v in range(V):
        P0[(v,) * L] += 0.97 / V
    return P0


@pytest.mark.parametrize("clock", ["visit", "sweep"])
@pytest.mark.parametrize("order", ["round_robin", "random"])
def test_a_corrector_sweep_leaves_the_data_law_invariant_for_m1(order, clock, gen):
    """Forward noise of the first sweep then its reverse steps: P_0 -> P_{L/m} -> P_0 exactly. Re-running
    the same steps on the clean X_0 without re-noising (the alternative) moves P_0 (TV 0.024 to 0.044)."""
    law = NoiseLaw.unigram(torch.tensor([5.0, 2.0, 1.0]), smoothing=0.0)
    P0 = random_law(L, V, gen)
    sched = GlauberSchedule(L, sweeps=2, alpha_min=1e-3, order=order, clock=clock, order_seed=2)
    oracle = OracleDenoiser(P0, sched, law)
    assert total_variation(corrector_law(P0, oracle), P0) < 1e-12
    assert total_variation(first_sweep_reverse(P0, oracle), P0) > 1e-2  # out-of-training inputs: biased
    # the implementation is that kernel: exact draws of P_0 stay P_0 after two sweeps
    x = glauber_correct(oracle, sched, law, sample_law(P0, N, gen), 2, generator=gen)
    assert oracle.calls == 2 * sched.steps_per_sweep
    assert total_variation(empirical_law(x, V), P0) < tv_bound(P0, N)


def test_corrector_sweeps_from_noise_get_no_worse_and_cost_L_over_m_calls_each(gen):
    """Check 4's biased start (prod u, m = 1): each sweep contracts the TV to P_0 (data processing)."""
    law = NoiseLaw.uniform(V)
    P0 = random_law(L, V, gen)
    sched = GlauberSchedule(L, sweeps=2, alpha_min=1e-3)
    oracle = OracleDenoiser(P0, sched, law)
    laws = [oracle.sampler_output_law(product_noise_law(law, L))]
    for _ in range(3):
        laws.append(corrector_law(laws[-1], oracle))
    tvs = [total_variation(Q, P0) for Q in laws]
    assert tvs[0] > 5e-5  # the bias of starting from prod u
    assert all(b < a / 2 for a, b in zip(tvs, tvs[1:])), tvs  # measured: 9.3e-5, 2.7e-5, 8.8e-6, 2.9e-6
    x = glauber_sample(oracle, sched, law, num_samples=N, corrector_sweeps=2, generator=gen)
    assert oracle.calls == sched.num_steps + 2 * sched.steps_per_sweep == 16  # (K + C) L / m
    assert total_variation(empirical_law(x, V), laws[2]) < tv_bound(laws[2], N)


@pytest.mark.parametrize("order", ["round_robin", "strided", "random"])
def test_m1_corrector_sweeps_remove_the_factorisation_bias_of_an_m2_run(order, gen):
    """The m = 2 run from the exact P_T is biased (TV 0.32, 0.36 random); m = 1 correctors leave P_0 invariant
    and contract towards it: measured 0.32 -> 1.2e-2 -> 4.6e-4 (round robin). m = 2 correctors are not
    P_0-invariant and only shave the bias (0.32 -> 0.25 -> 0.24)."""
    law = NoiseLaw.uniform(V)
    P0 = dependent_law()
    s2 = GlauberSchedule(L, sweeps=2, positions_per_step=2, order=order, order_seed=1)
    s1 = GlauberSchedule(L, sweeps=2, positions_per_step=1, order=order, order_seed=1)
    o2, o1 = OracleDenoiser(P0, s2, law), OracleDenoiser(P0, s1, law)
    factorised = o2.sampler_output_law(law_at(P0, s2, law, s2.num_steps))
    bias = total_variation(factorised, P0)
    assert bias > 0.2
    corrected = [factorised]
    for _ in range(2):
        corrected.append(corrector_law(corrected[-1], o1))
    tvs = [total_variation(Q, P0) for Q in corrected]
    assert tvs[1] < 0.05 * bias and tvs[2] < 0.05 * tvs[1], tvs
    m2 = corrector_law(corrector_law(factorised, o2), o2)
    assert 0.2 < total_variation(m2, P0) < bias
    # the samplers: the m = 2 run, then two m = 1 corrector sweeps on its output
    x = glauber_sample(o2, s2, law, x_init=sample_law(law_at(P0, s2, law, s2.num_steps), N, gen), generator=gen)
    y = glauber_correct(o1, s1, law, x, 2, generator=gen)
    assert o1.calls == 2 * L
    assert total_variation(empirical_law(y, V), corrected[2]) < tv_bound(corrected[2], N)
    assert total_variation(empirical_law(y, V), P0) < tv_bound(P0, N) + tvs[2]


def test_corrector_sweeps_never_touch_clamped_positions_and_keep_the_conditional_law(gen):
    law = NoiseLaw.unigram(torch.tensor([5.0, 2.0, 1.0]), smoothing=0.0)
    P0 = random_law(L, V, gen)
    sched = GlauberSchedule(L, sweeps=2, alpha_min=1e-2, order="random")
    clamp = {1: 2, 3: 0}
    clean = torch.tensor([i in clamp for i in range(L)])
    queried: list[tuple[int, list[int]]] = []
    oracle = OracleDenoiser(P0, sched, law, clean_mask=clean)

    def denoiser(x_in, hidden, t):
        assert not bool(hidden[:, clean].any())
        queried.append((int(t[0]), hidden[0].nonzero().flatten().tolist()))
        return oracle(x_in, hidden, t)

    idx = [clamp.get(i, slice(None)) for i in range(L)]
    target = torch.zeros_like(P0)
    target[tuple(idx)] = P0[tuple(idx)]
    target /= target.sum()
    assert total_variation(corrector_law(target, oracle, clean), target) < 1e-12  # invariant given the clamp
    template = torch.zeros(N, L, dtype=torch.long)
    template[:, 1], template[:, 3] = 2, 0
    y = infill(denoiser, sched, law, template, clean, corrector_sweeps=3, generator=gen)
    assert (y[:, 1] == 2).all() and (y[:, 3] == 0).all()
    # m = 1: the steps of clamped positions are skipped, in the run and in every corrector sweep
    free_steps = [t for t in range(sched.steps_per_sweep) if not bool(clean[sched.positions[t]].all())]
    assert [t for t, _ in queried[-3 * len(free_steps) :]] == sorted(free_steps, reverse=True) * 3
    assert len(queried) == (sched.sweeps + 3) * (L - len(clamp))
    # from exact draws of the conditional law, three sweeps stay on it
    x = glauber_correct(oracle, sched, law, sample_law(target, N, gen), 3, clamp_mask=clean, generator=gen)
    assert total_variation(empirical_law(x, V), target) < tv_bound(target, N)


def test_corrector_queries_only_trained_step_and_hidden_set_pairs():
    """Every call is a (t, S_t) of the schedule; the corrector's are the first sweep's, t = L/m - 1 .. 0."""
    sched = GlauberSchedule(12, sweeps=3, positions_per_step=3, order="random", order_seed=7)
    law = NoiseLaw.uniform(5)
    seen = []

    def denoiser(x_in, hidden, t):
        seen.append((int(t[0]), sorted(hidden[0].nonzero().flatten().tolist())))
        assert (hidden.sum(1) == 3).all() and (x_in[hidden] == 5).all() and (x_in[~hidden] < 5).all()
        return torch.zeros(int(hidden.sum()), 5)

    glauber_sample(denoiser, sched, law, num_samples=2, corrector_sweeps=2, generator=torch.Generator().manual_seed(0))
    n = sched.steps_per_sweep
    assert len(seen) == sched.num_steps + 2 * n == 20
    assert [t for t, _ in seen] == list(range(sched.num_steps - 1, -1, -1)) + list(range(n - 1, -1, -1)) * 2
    assert all(pos == sorted(sched.positions[t].tolist()) for t, pos in seen)


def test_sampler_options_are_validated_at_entry():
    sched = GlauberSchedule(4, sweeps=1)
    law = NoiseLaw.uniform(3)

    def never(*_):
        raise AssertionError("the network must not be called")

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="corrector_sweeps must be an integer >= 0"):
            glauber_sample(never, sched, law, num_samples=1, corrector_sweeps=bad)
    with pytest.raises(ValueError, match="sweeps must be an integer >= 0"):
        glauber_correct(never, sched, law, torch.zeros(1, 4, dtype=torch.long), -1)


def tiny_module(condition_on_alpha: bool):
    from glauber.config import load_config
    from glauber.methods.ggm import GGMModule

    cfg = load_config(TINY, [f"model.condition_on_alpha={str(condition_on_alpha).lower()}"])
    return GGMModule(cfg, vocab_size=6).eval()


def test_ggm_module_counts_calls_and_refuses_another_K_without_signal_levels():
    module = tiny_module(condition_on_alpha=False)
    K, Lt, m = module.cfg.schedule.sweeps, module.cfg.data.seq_len, module.cfg.schedule.positions_per_step
    assert module.network_calls() == K * Lt / m
    assert module.network_calls(corrector_sweeps=3) == (K + 3) * Lt / m
    assert module.network_calls(positions_per_step=4, sweeps=K, corrector_sweeps=1) == (K + 1) * Lt / 4
    with pytest.raises(ValueError, match="model.condition_on_alpha"):
        module.sample(1, sweeps=K + 1)
    with pytest.raises(ValueError, match="model.condition_on_alpha"):
        module.network_calls(sweeps=K + 1)
    with pytest.raises(ValueError, match="sweeps must be an integer >= 1"):
        module.sample(1, sweeps=0)
    with pytest.raises(ValueError, match="corrector_sweeps must be an integer >= 0"):
        module.network_calls(corrector_sweeps=-1)

    calls = []
    module.model.register_forward_hook(lambda *_: calls.append(1))
    gen = torch.Generator().manual_seed(0)
    template = torch.arange(Lt) % 6
    clamp = torch.zeros(Lt, dtype=torch.bool)
    clamp[:5] = True
    ids = module.sample(2, template=template.expand(2, -1), clamp_mask=clamp, generator=gen, corrector_sweeps=2)
    assert torch.equal(ids[:, :5], template[:5].expand(2, -1))
    # tiny.yaml: strided m = 2 hidden sets {j, j + L/2}, none wholly clamped, so no step is skipped
    assert len(calls) == module.network_calls(corrector_sweeps=2) == (K + 2) * Lt / m


def test_another_K_runs_the_network_on_that_schedules_signal_levels():
    module = tiny_module(condition_on_alpha=True)
    Lt, m = module.cfg.data.seq_len, module.cfg.schedule.positions_per_step
    K = module.cfg.schedule.sweeps + 3
    sched = module.schedule(None, K)
    assert sched.sweeps == K and module.schedule(None, K) is sched and module.schedule() is not sched
    seen = []
    module.model.register_forward_hook(lambda _mod, args, _out: seen.append((args[2].clone(), args[3].clone())))
    ids = module.sample(3, sweeps=K, corrector_sweeps=1, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (3, Lt)
    assert len(seen) == module.network_calls(sweeps=K, corrector_sweeps=1) == (K + 1) * Lt / m
    steps = list(range(sched.num_steps - 1, -1, -1)) + list(range(sched.steps_per_sweep - 1, -1, -1))
    for t, (time, alpha) in zip(steps, seen):
        t_vec = torch.full((3,), t)
        assert torch.allclose(time, (t_vec.float() + 1) / sched.num_steps)
        assert torch.equal(alpha, sched.signal_level(t_vec).float())


def test_cli_sweep_options_are_documented_and_validated(capsys):
    from glauber.commands.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["sample", "x.ckpt", "--sweeps", "8", "--corrector-sweeps", "2"])
    assert (args.sweeps, args.corrector_sweeps) == (8, 2)
    args = parser.parse_args(["sample", "x.ckpt"])
    assert (args.sweeps, args.corrector_sweeps) == (None, 0)
    for argv, message in (
        (["--sweeps", "0"], "argument --sweeps: must be an integer >= 1 (got 0)"),
        (["--corrector-sweeps", "-1"], "argument --corrector-sweeps: must be an integer >= 0 (got -1)"),
        (["--corrector-sweeps", "two"], "argument --corrector-sweeps: must be an integer >= 0 (got 'two')"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["sample", "x.ckpt", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sweeps SWEEPS" in text and "model.condition_on_alpha=true" in text
    assert "--corrector-sweeps CORRECTOR_SWEEPS" in text and "L / m more network calls each" in text
