"""The five known-answer checks of docs/METHOD.md on enumerable problems (L = 4, V = 3)."""

from __future__ import annotations

import itertools

import pytest
import torch
from stats import tv_bound

from glauber.core.exact import (
    OracleDenoiser,
    all_states,
    empirical_law,
    forward_law_step,
    law_at,
    marginal_conditionals,
    product_noise_law,
    random_law,
    sample_law,
    total_variation,
)
from glauber.core.loss import (
    LOSS_NAMES,
    bayes_classifier,
    bayes_h,
    classifier_logits,
    conditional_from_classifier,
    denoising_logits,
    explicit_weighted_loss,
    ggm_loss,
    normalize_h,
    single_sample_loss,
)
from glauber.core.noise import NoiseLaw
from glauber.core.process import noise_to, simulate_forward
from glauber.core.sampler import glauber_sample, infill
from glauber.core.schedule import GlauberSchedule

L, V = 4, 3
N = 200_000


def make_law(kind: str, gen: torch.Generator) -> NoiseLaw:
    if kind == "uniform":
        return NoiseLaw.uniform(V)
    return NoiseLaw.unigram(torch.tensor([5.0, 2.0, 1.0]), smoothing=0.0)


SCHEDULE_OPTIONS = [
    dict(alpha=a, clock=c, order=o, positions_per_step=m)
    for a, c, o, m in itertools.product(
        ("linear", "cosine", "geometric"), ("visit", "sweep"), ("round_robin", "strided", "random"), (1, 2)
    )
    if not (m == 1 and o == "strided")  # identical to round_robin for m = 1
]


def option_id(opt: dict) -> str:
    return "-".join(str(v) for v in opt.values())


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# 1. closed form == step-by-step == exact law -----------------------------------------------------------


@pytest.mark.parametrize("noise", ["uniform", "unigram"])
@pytest.mark.parametrize("opt", SCHEDULE_OPTIONS, ids=option_id)
def test_closed_form_law_equals_step_by_step_propagation(opt, noise, gen):
    sched = GlauberSchedule(L, sweeps=2, alpha_min=1e-3, order_seed=3, **opt)
    law = make_law(noise, gen)
    P0 = random_law(L, V, gen)
    P = P0
    for t in range(sched.num_steps + 1):
        assert torch.allclose(law_at(P0, sched, law, t), P, atol=1e-14, rtol=0), f"t={t}"
        if t < sched.num_steps:
            P = forward_law_step(P, sched, law, t)
    if opt["clock"] == "sweep":  # every position ends at alpha_min, so X_T is nearly prod u
        assert total_variation(P, product_noise_law(law, L)) <= L * 1e-3


@pytest.mark.parametrize("order", ["round_robin", "random"])
def test_closed_form_draws_match_simulation_and_exact_law(order, gen):
    sched = GlauberSchedule(L, sweeps=2, positions_per_step=1, order=order, alpha="cosine")
    law = make_law("unigram", gen)
    P0 = random_law(L, V, gen)
    x0 = sample_law(P0, N, gen)
    t = torch.randint(0, sched.num_steps + 1, (N,), generator=gen)
    closed = noise_to(x0, t, sched, law, gen)
    slow = simulate_forward(x0, t, sched, law, gen)
    delta = 1e-6 / (2 * (sched.num_steps + 1))
    for step in range(sched.num_steps + 1):
        rows = t == step
        exact = law_at(P0, sched, law, step)
        bound = tv_bound(exact, int(rows.sum()), delta)
        assert total_variation(empirical_law(closed[rows], V), exact) < bound, f"closed form, t={step}"
        assert total_variation(empirical_law(slow[rows], V), exact) < bound, f"simulation, t={step}"
        # sharper, per position: P(X_t^i = X_0^i) = alpha_i(t) + (1 - alpha_i(t)) u(X_0^i), 6 sigma
        level = sched.signal_level(torch.tensor([step]))[0]
        expected = (level + (1 - level) * law.probs[x0[rows]]).mean(0)
        sigma = (expected * (1 - expected) / int(rows.sum())).sqrt()
        for draws in (closed, slow):
            observed = (draws[rows] == x0[rows]).double().mean(0)
            assert ((observed - expected).abs() <= 6 * sigma + 1e-12).all(), f"t={step}"


def test_pi_phi_matches_the_definition_for_the_papers_setting():
    """Round robin, m = 1, per-visit clock: Pi_t(phi) = alpha((t+1)/T) / alpha((t+1-L)/T)."""
    Lb, K, amin = 5, 3, 0.01
    sched = GlauberSchedule(Lb, sweeps=K, alpha="linear", alpha_min=amin)
    T = K * Lb
    alpha = lambda s: 1 - (1 - amin) * s  # noqa: E731
    for t in range(T):
        assert sched.positions[t].tolist() == [t % Lb]
        expected = alpha((t + 1) / T) / (alpha((t + 1 - Lb) / T) if t >= Lb else 1.0)
        assert sched.step_pi_phi[t, 0].item() == pytest.approx(expected, rel=1e-12)
    level = sched.signal_level(torch.tensor([T]))[0]
    assert torch.allclose(level, torch.tensor([alpha((T - Lb + i + 1) / T) for i in range(Lb)], dtype=torch.float64))
    sweep = GlauberSchedule(Lb, sweeps=K, clock="sweep", alpha_min=amin)
    assert torch.allclose(sweep.signal_level(torch.tensor([T]))[0], torch.full((Lb,), amin, dtype=torch.float64))


# 2. identity: conditional -> classifier -> conditional ---------------------------------------------------


@pytest.mark.parametrize("noise", ["uniform", "unigram"])
def test_classifier_identity_float64(noise, gen):
    law = make_law(noise, gen)
    cond = -torch.rand(500, V, dtype=torch.float64, generator=gen).log()
    cond = cond / cond.sum(1, keepdim=True)
    pi = torch.rand(500, dtype=torch.float64, generator=gen).clamp(1e-6, 1 - 1e-6)
    y = bayes_classifier(cond, pi, law)
    assert (conditional_from_classifier(y, pi, law) - cond).abs().max() < 1e-9
    h = bayes_h(cond, law)
    assert (torch.sigmoid(classifier_logits(h, pi)) - y).abs().max() < 1e-12
    assert (torch.softmax(denoising_logits(h, law), -1) - cond).abs().max() < 1e-12


# 3. the loss minimiser is the Bayes classifier -----------------------------------------------------------


def exact_training_problems(sched: GlauberSchedule, law: NoiseLaw, P0: torch.Tensor):
    """Every (t, i in S_t, context) with its exact conditional and Pi_t(phi), as flat tensors."""
    conds, pis = [], []
    for t in range(sched.num_steps):
        hidden = sorted(sched.positions[t].tolist())
        Pt = law_at(P0, sched, law, t)
        pi_of = dict(zip(sched.positions[t].tolist(), sched.step_pi_phi[t].tolist()))
        for j, c in zip(hidden, marginal_conditionals(Pt, hidden, law)):
            c = torch.movedim(c.expand((V,) * L), j, -1)
            c = c.reshape(-1, V) if len(hidden) == 1 else c.flatten(0, -2)
            c = torch.unique(c, dim=0)  # one row per distinct context
            conds.append(c)
            pis.append(torch.full((c.shape[0],), pi_of[j], dtype=torch.float64))
    return torch.cat(conds), torch.cat(pis)


def expected_loss(
    loss_name: str, h: torch.Tensor, cond: torch.Tensor, pi: torch.Tensor, law: NoiseLaw, normalized: bool = False
) -> torch.Tensor:
    """Loss averaged exactly over the target b ~ cond (and over z ~ Pi_t for the single-sample form)."""
    total = h.new_zeros(())
    if normalized and loss_name == "single_sample":
        h = normalize_h(h, law)
    for b in range(V):
        tb = torch.full((h.shape[0],), b, dtype=torch.long)
        if loss_name == "explicit_weighted":
            per = explicit_weighted_loss(h, tb, pi, law)
        elif loss_name != "single_sample":
            per = ggm_loss(loss_name, h, tb, pi, law, normalized=normalized)
        else:  # enumerate z in {phi} u X with weights Pi_t(z)
            per = pi * single_sample_loss(h, tb, pi, law, torch.full_like(tb, -1))
            for a in range(V):
                per = per + (1 - pi) * law.probs[a] * single_sample_loss(h, tb, pi, law, torch.full_like(tb, a))
        total = total + (cond[:, b] * per).sum()
    return total


@pytest.mark.parametrize("loss_name", [n for n in LOSS_NAMES if n != "cross_entropy"])
def test_minimising_the_loss_with_free_logits_recovers_bayes(loss_name, gen):
    sched = GlauberSchedule(L, sweeps=2, alpha="cosine")
    law = make_law("unigram", gen)
    cond, pi = exact_training_problems(sched, law, random_law(L, V, gen))
    # The expected loss is a sum of 1-D convex terms, one per (problem, token): damped Newton with
    # autograd derivatives minimises it to machine precision from h = 0. (Token-weighted losses take
    # their weights without gradient: the weight cancels in the Newton step, and any positive weight
    # leaves each token's logistic problem with the same minimiser. ``weighted`` trains through a closed
    # form of its gradient, which has no curvature; Newton runs on its definition, the explicitly
    # weighted loss, whose gradient the closed form equals: test_loss_options.py.)
    name = "explicit_weighted" if loss_name == "weighted" else loss_name
    h = torch.zeros_like(cond, requires_grad=True)
    for _ in range(60):
        (g,) = torch.autograd.grad(expected_loss(name, h, cond, pi, law), h, create_graph=True)
        (curv,) = torch.autograd.grad(g.sum(), h)
        with torch.no_grad():
            h -= (g / curv).clamp(-1, 1)
    assert g.abs().max() < 1e-14
    y_learned = torch.sigmoid(classifier_logits(h.detach(), pi))
    assert (y_learned - bayes_classifier(cond, pi, law)).abs().max() < 1e-10
    assert (torch.softmax(denoising_logits(h.detach(), law), -1) - cond).abs().max() < 1e-9


@pytest.mark.parametrize("normalized", [False, True], ids=["free", "normalized"])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("noise", ["uniform", "unigram"])
@pytest.mark.parametrize("opt", SCHEDULE_OPTIONS, ids=option_id)
def test_bayes_h_is_a_stationary_minimum_for_every_option(opt, noise, loss_name, normalized, gen):
    """Every loss option (and the normalised classifier) has the Bayes h as a stationary minimum. With
    ``normalized`` the network's output is projected onto classifiers whose conditional sums to one: the
    Bayes h lies in that set (projection leaves it unchanged), so the restricted minimiser is the
    unrestricted one, which the free-logit test above shows is Bayes."""
    sched = GlauberSchedule(L, sweeps=2, order_seed=5, **opt)
    law = make_law(noise, gen)
    cond, pi = exact_training_problems(sched, law, random_law(L, V, gen))
    h = bayes_h(cond, law).requires_grad_(True)
    if normalized:
        assert (normalize_h(h.detach(), law) - h.detach()).abs().max() < 1e-12
    loss = expected_loss(loss_name, h, cond, pi, law, normalized)
    (grad,) = torch.autograd.grad(loss, h)
    assert grad.abs().max() < 1e-12
    # and it is a minimum: any perturbation raises the expected loss (the loss is convex in h; the
    # normalised one is invariant to adding a constant per row, so the bump moves off that direction)
    bump = 0.05 * torch.randn(h.shape, dtype=torch.float64, generator=gen)
    bumped = h.detach() + (bump - bump.mean(1, keepdim=True) if normalized else bump)
    assert expected_loss(loss_name, bumped, cond, pi, law, normalized) > loss.detach()


# 4. the sampler with the oracle --------------------------------------------------------------------------


def test_oracle_sampler_from_exact_PT_reproduces_data_law(gen):
    sched = GlauberSchedule(L, sweeps=2, alpha="linear", alpha_min=1e-2)
    law = make_law("unigram", gen)
    P0 = random_law(L, V, gen)
    oracle = OracleDenoiser(P0, sched, law)
    PT = law_at(P0, sched, law, sched.num_steps)
    assert total_variation(oracle.sampler_output_law(PT), P0) < 1e-12  # exact reverse, no sampling
    x = glauber_sample(oracle, sched, law, x_init=sample_law(PT, N, gen), generator=gen)
    assert oracle.calls == sched.num_steps  # one network call per step
    tv = total_variation(empirical_law(x, V), P0)
    assert tv < tv_bound(P0, N)


def test_oracle_sampler_from_noise_has_small_bias_shrinking_with_alpha_min(gen):
    law = make_law("uniform", gen)
    P0 = random_law(L, V, gen)
    biases = []
    for amin in (1e-1, 1e-2, 1e-3):
        sched = GlauberSchedule(L, sweeps=2, alpha_min=amin)
        oracle = OracleDenoiser(P0, sched, law)
        biases.append(total_variation(oracle.sampler_output_law(product_noise_law(law, L)), P0))
    assert biases[0] > biases[1] > biases[2]
    assert biases[2] < 1e-3
    # the sampler itself, from prod u, lands within sampling noise of its exact output law
    x = glauber_sample(oracle, sched, law, num_samples=N, generator=gen)
    assert total_variation(empirical_law(x, V), P0) < tv_bound(P0, N) + biases[2]


@pytest.mark.parametrize("order", ["round_robin", "strided", "random"])
def test_factorised_sampler_m2_has_measurable_bias_on_dependent_law(order, gen):
    """All positions equal with prob. 0.97: redrawing two of them independently breaks the copies."""
    P0 = torch.full((V,) * L, 0.03 / V**L, dtype=torch.float64)
    for v in range(V):
        P0[(v,) * L] += 0.97 / V
    law = make_law("uniform", gen)
    sched = GlauberSchedule(L, sweeps=2, positions_per_step=2, order=order, order_seed=1)
    oracle = OracleDenoiser(P0, sched, law)
    PT = law_at(P0, sched, law, sched.num_steps)
    factorised = oracle.sampler_output_law(PT)
    bias = total_variation(factorised, P0)
    assert bias > 0.05
    x = glauber_sample(oracle, sched, law, x_init=sample_law(PT, N, gen), generator=gen)
    assert oracle.calls == sched.num_steps == 4
    emp = empirical_law(x, V)
    assert total_variation(emp, factorised) < tv_bound(factorised, N)  # the sampler is the factorised chain
    assert total_variation(emp, P0) > bias - tv_bound(factorised, N)  # whose bias is visible in samples


# 5. infilling -----------------------------------------------------------------------------------------


def conditional_on_clamp(P: torch.Tensor, clamp: dict[int, int]) -> torch.Tensor:
    idx = [clamp.get(i, slice(None)) for i in range(L)]
    Q = torch.zeros_like(P)
    Q[tuple(idx)] = P[tuple(idx)]
    return Q / Q.sum()


def test_infilling_with_oracle_reproduces_exact_conditional_law(gen):
    sched = GlauberSchedule(L, sweeps=2, alpha_min=1e-2, order="random")
    law = make_law("unigram", gen)
    P0 = random_law(L, V, gen)
    clamp = {1: 2, 3: 0}
    clean = torch.tensor([i in clamp for i in range(L)])
    oracle = OracleDenoiser(P0, sched, law, clean_mask=clean)
    target = conditional_on_clamp(P0, clamp)
    PT = conditional_on_clamp(law_at(P0, sched, law, sched.num_steps, clean), clamp)
    assert total_variation(oracle.sampler_output_law(PT, clean), target) < 1e-12
    x_init = sample_law(PT, N, gen)
    x = glauber_sample(oracle, sched, law, x_init=x_init, clamp_mask=clean, generator=gen)
    assert (x[:, clean] == x_init[:, clean]).all()  # clamped positions never change
    assert total_variation(empirical_law(x, V), target) < tv_bound(target, N)
    # zero-shot from noise on the free positions: a small bias only
    template = torch.zeros(N, L, dtype=torch.long)
    template[:, 1], template[:, 3] = 2, 0
    y = infill(oracle, sched, law, template, clean, generator=gen)
    assert (y[:, 1] == 2).all() and (y[:, 3] == 0).all()
    start = conditional_on_clamp(product_noise_law(law, L), clamp)
    bias = total_variation(oracle.sampler_output_law(start, clean), target)
    assert bias < 1e-2
    assert total_variation(empirical_law(y, V), target) < tv_bound(target, N) + bias


def test_states_enumeration_matches_codes():
    from glauber.core.exact import state_codes

    s = all_states(L, V)
    assert torch.equal(state_codes(s, V), torch.arange(V**L))
