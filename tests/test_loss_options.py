"""The binary-classification loss options beyond the paper: what their gradients are, that their values
stay comparable, and that the loss is computed in float32 or wider under bf16 autocast.

(That each option's minimiser is the Bayes classifier is known-answer check 3 in test_known_answers.py.)
"""

import pytest
import torch

from glauber.core.loss import (
    LOSS_NAMES,
    analytic_loss,
    cross_entropy_loss,
    explicit_weighted_loss,
    ggm_loss,
    normalize_h,
    time_weighted_loss,
    weighted_loss,
)
from glauber.core.noise import NoiseLaw

V, N = 7, 64


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, V, dtype=torch.float64, generator=g) * 2
    targets = torch.randint(V, (N,), generator=g)
    pi = torch.rand(N, dtype=torch.float64, generator=g).clamp(0.01, 0.99)
    law = NoiseLaw.unigram(torch.arange(1.0, V + 1), smoothing=0.0)
    return h, targets, pi, law


def grad_of(fn, h, *args, **kwargs):
    h = h.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(h, *args, **kwargs).sum(), h)
    return g


def test_weighted_loss_gradient_is_q_minus_onehot(problem):
    """w_a = exp(h_a)/(1-Pi) + 1/Pi turns each sample's gradient into q - onehot(b), q_a = u(a) exp(h_a)."""
    h, targets, pi, law = problem
    q = law.probs.double() * h.exp()
    expected = q - torch.nn.functional.one_hot(targets, V).double()
    assert (grad_of(weighted_loss, h, targets, pi, law) - expected).abs().max() < 1e-10


def test_weighted_loss_closed_form_equals_its_definition(problem):
    """The training form computes the gradient of the explicitly token-weighted analytic loss."""
    h, targets, pi, law = problem
    explicit = grad_of(explicit_weighted_loss, h, targets, pi, law)
    assert (grad_of(weighted_loss, h, targets, pi, law) - explicit).abs().max() < 1e-10
    assert torch.allclose(explicit_weighted_loss(h, targets, pi, law), weighted_loss(h, targets, pi, law), rtol=1e-12, atol=0)


def test_weighted_loss_gradient_is_exact_in_float32_where_the_explicit_form_cancels():
    """Confident, nearly clean positions: the explicit form multiplies weights ~V/(1-Pi) by classifier
    terms ~(1-Pi)/V, losing digits; the closed form keeps float32 precision."""
    g = torch.Generator().manual_seed(2)
    V = 4096
    law = NoiseLaw.uniform(V)
    h = torch.randn(256, V, dtype=torch.float64, generator=g)
    targets = torch.randint(V, (256,), generator=g)
    h[torch.arange(256), targets] += 12.0  # confident
    h = normalize_h(h, law)
    pi = torch.full((256,), 1 - 1e-3, dtype=torch.float64)
    exact = grad_of(weighted_loss, h, targets, pi, law)
    err_closed = (grad_of(weighted_loss, h.float(), targets, pi, law).double() - exact).abs().max()
    err_explicit = (grad_of(explicit_weighted_loss, h.float(), targets, pi, law).double() - exact).abs().max()
    assert err_closed < 1e-6 < err_explicit


def test_analytic_loss_gradient_matches_the_closed_form_that_motivates_the_weights(problem):
    """The expected gradient of the paper's loss: Pi(1-Pi) u (q - p) / (Pi q + (1-Pi) u)."""
    h, _, pi, law = problem
    p = torch.softmax(torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), -1)
    expected_grad = sum(p[:, b : b + 1] * grad_of(analytic_loss, h, torch.full((N,), b), pi, law) for b in range(V))
    u, q, P = law.probs.double(), law.probs.double() * h.exp(), pi[:, None]
    closed = P * (1 - P) * u * (q - p) / (P * q + (1 - P) * u)
    assert (expected_grad - closed).abs().max() < 1e-12


def test_weighted_loss_on_a_normalised_classifier_has_the_cross_entropy_gradient(problem):
    h, targets, pi, law = problem
    g_weighted = grad_of(lambda x: ggm_loss("weighted", x, targets, pi, law, normalized=True), h)
    g_ce = grad_of(cross_entropy_loss, h, targets, pi, law)
    assert (g_weighted - g_ce).abs().max() < 1e-10
    # ... while without the normalisation it does not (q is unnormalised)
    assert (grad_of(weighted_loss, h, targets, pi, law) - g_ce).abs().max() > 1e-3


def test_time_weighted_gradient_is_the_analytic_one_over_pi_one_minus_pi(problem):
    h, targets, pi, law = problem
    ratio = grad_of(time_weighted_loss, h, targets, pi, law) / grad_of(analytic_loss, h, targets, pi, law)
    assert (ratio - 1 / (pi * (1 - pi))[:, None]).abs().max() < 1e-8


@pytest.mark.parametrize("name", ["weighted", "time_weighted"])
def test_token_weighted_losses_report_the_papers_loss_value(problem, name):
    """The weights shape only the gradient: val/loss and best.ckpt stay comparable with the paper's loss."""
    h, targets, pi, law = problem
    assert torch.allclose(ggm_loss(name, h, targets, pi, law), analytic_loss(h, targets, pi, law), atol=0, rtol=1e-12)


def test_normalize_h_makes_the_implied_conditional_sum_to_one_and_keeps_sampling(problem):
    h, _, _, law = problem
    hn = normalize_h(h, law)
    assert ((law.probs.double() * hn.exp()).sum(-1) - 1).abs().max() < 1e-12
    assert torch.allclose(torch.softmax(hn + law.log_probs.double(), -1), torch.softmax(h + law.log_probs.double(), -1))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_losses_are_float32_or_wider_under_bf16_autocast(problem, name):
    """Under autocast a matmul would run in bf16 and bias p_t by up to ~0.4% with unigram noise."""
    h, targets, pi, law = problem
    exact = ggm_loss(name, h, targets, pi, law, torch.Generator().manual_seed(3))
    law32 = NoiseLaw.unigram(torch.arange(1.0, V + 1), smoothing=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ggm_loss(name, h.float(), targets, pi.float(), law32, torch.Generator().manual_seed(3))
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() < 1e-5 * (1 + exact.abs().max())


def test_unknown_loss_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="weighted"):
        ggm_loss("hinge", torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), torch.tensor([0.5]), NoiseLaw.uniform(3))
