"""Learning the denoising conditional by binary classification (docs/METHOD.md, "Learning ...").

Parameterisation: the network outputs ``h`` (one value per vocabulary entry at each hidden
position); the classifier logit of "token ``a`` seen here is signal" is
``s_a = h_a + logit(Pi_t(phi))``; the Bayes ``h`` is ``log p_t(a|c) - log u(a)`` and the denoising
conditional is ``softmax(h + log u)``. All losses return one value per hidden position and are
computed in float32 or wider with log-sigmoids (never ``log(1 - sigmoid)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from glauber.core.noise import NoiseLaw
from glauber.core.schedule import checks_enabled


def log_odds(pi_phi: Tensor) -> Tensor:
    """``logit(Pi_t(phi))``, after checking ``0 < Pi_t(phi) < 1`` (where it is 0 the step carries no
    information; where it is 1 no noise is added). The check (a host-device synchronisation) is
    skipped inside ``schedule.trusted_inputs()``: the training step's ``Pi_t(phi)`` come from the
    schedule's table, checked when the schedule was built."""
    if checks_enabled() and pi_phi.numel():
        lo, hi = torch.stack(torch.aminmax(pi_phi)).tolist()
        if not (lo > 0 and hi < 1):
            raise ValueError(
                f"Pi_t(phi) must lie strictly in (0, 1) at every step (got min {lo}, "
                f"max {hi}); use alpha_min > 0 and a strictly decreasing alpha"
            )
    pi = pi_phi.double()
    return pi.log() - (-pi).log1p()


def classifier_logits(h: Tensor, pi_phi: Tensor) -> Tensor:
    """``s = h + logit(Pi_t(phi))`` for ``h [N, V]`` and ``pi_phi [N]``, in at least float32."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    return h + log_odds(pi_phi).to(h.dtype)[:, None]


def denoising_logits(h: Tensor, law: NoiseLaw) -> Tensor:
    """Logits of ``p_t(.|c)``: ``h + log u`` (a softmax of these is the denoising conditional).
    ``law.to`` caches the law on ``h``'s device: no transfer per call."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    return h + law.to(h.device).log_probs.to(h.dtype)


def bayes_classifier(cond: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """``y_a = Pi(phi) p(a|c) / (Pi(phi) p(a|c) + Pi(a))`` with ``Pi(a) = (1 - Pi(phi)) u(a)``."""
    pi = pi_phi.to(cond.dtype)[:, None]
    u = law.probs.to(device=cond.device, dtype=cond.dtype)
    signal = pi * cond
    return signal / (signal + (1 - pi) * u)


def conditional_from_classifier(y: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """Invert ``bayes_classifier``: ``p(a|c) = (Pi(a) / Pi(phi)) * y / (1 - y)``."""
    pi = pi_phi.to(y.dtype)[:, None]
    u = law.probs.to(device=y.device, dtype=y.dtype)
    return (1 - pi) * u / pi * y / (1 - y)


def bayes_h(cond: Tensor, law: NoiseLaw) -> Tensor:
    """The ``h`` a perfect network outputs: ``log p(a|c) - log u(a)``."""
    return cond.log() - law.log_probs.to(device=cond.device, dtype=cond.dtype)


def _softplus_sum_u(s: Tensor, u: Tensor, weights: Tensor | None = None) -> Tensor:
    """``sum_a w_a u(a) softplus(s_a)`` as an elementwise product and a sum: a matmul would run in bf16
    under autocast and bias ``p_t`` (the loss promises float32 or wider)."""
    terms = F.softplus(s) * u
    return (terms if weights is None else terms * weights).sum(-1)


def analytic_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """GGM loss with the noise integrated out analytically, per hidden position ``[N]``:
    ``-Pi(phi) log sigmoid(s_b) - sum_a Pi(a) log sigmoid(-s_a)``."""
    s = classifier_logits(h, pi_phi)
    pi = pi_phi.to(s.dtype)
    u = law.probs.to(device=s.device, dtype=s.dtype)
    s_b = s.gather(1, targets[:, None]).squeeze(1)
    return pi * F.softplus(-s_b) + (1 - pi) * _softplus_sum_u(s, u)


def _token_weighted_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw, log_w: Tensor) -> Tensor:
    """The analytic loss with token ``a``'s two terms (its positive and its negative) multiplied by
    ``w_a = exp(log_w[:, a])``, taken without gradient. Each token's logistic problem is separate and
    keeps its class balance, so the minimiser is still the Bayes classifier. The returned VALUE is the
    unweighted analytic loss (comparable across weightings, e.g. for ``val/loss`` and ``best.ckpt``);
    only the gradient is weighted."""
    s = classifier_logits(h, pi_phi)
    pi = pi_phi.to(s.dtype)
    u = law.probs.to(device=s.device, dtype=s.dtype)
    w = log_w.detach().to(s.dtype).clamp(max=60.0).exp()  # any positive weight keeps the minimiser
    s_b = s.gather(1, targets[:, None]).squeeze(1)
    w_b = w.gather(1, targets[:, None]).squeeze(1)
    weighted = w_b * pi * F.softplus(-s_b) + (1 - pi) * _softplus_sum_u(s, u, w)
    plain = pi * F.softplus(-s_b) + (1 - pi) * _softplus_sum_u(s, u)
    return plain.detach() + (weighted - weighted.detach())


def weight_logits(h: Tensor, pi_phi: Tensor) -> Tensor:
    """``log w_a`` of the weighted loss: ``w_a = sg[(Pi q_a + (1-Pi) u(a)) / (Pi (1-Pi) u(a))]`` with
    ``q_a = u(a) exp(h_a)``, i.e. ``w_a = exp(h_a) / (1-Pi) + 1 / Pi``."""
    pi = pi_phi.to(torch.float64)[:, None]
    h32 = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    return torch.logaddexp(h32.detach() - (-pi).log1p().to(h32.dtype), -pi.log().to(h32.dtype))


def explicit_weighted_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """The weighted loss as its definition: the analytic loss with token ``a``'s terms times ``w_a``
    (``weight_logits``). The reference for ``weighted_loss``; in float32 its gradient loses up to ~1e-3
    of its size to cancellation (large weights times small classifier terms), so training uses the
    closed form."""
    return _token_weighted_loss(h, targets, pi_phi, law, weight_logits(h, pi_phi))


def weighted_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """Analytic loss with per-token weights ``w_a = sg[exp(h_a) / (1-Pi) + 1 / Pi]`` (``weight_logits``).

    The analytic loss's expected gradient in ``h_a`` is ``Pi(1-Pi) u(a) (q_a-p_a) / (Pi q_a + (1-Pi) u(a))``,
    ``q_a = u(a) exp(h_a)``: about ``Pi`` for unlikely tokens but about ``(1-Pi) u(a) / q_a`` (~1/V) for
    likely ones, so it spends its effort pushing impossible tokens down. With these weights token ``a``'s
    per-sample gradient is exactly ``q_a - [a = b]``; each token's logistic problem keeps its class
    balance, so the minimiser is the Bayes classifier. That gradient is computed here in this closed form
    (equal to ``explicit_weighted_loss``'s, tested in float64, and free of its float32 cancellation);
    the returned value is the paper's loss, comparable across loss options."""
    plain = analytic_loss(h, targets, pi_phi, law)
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    q = (h.detach() + law.log_probs.to(device=h.device, dtype=h.dtype)).exp()
    surrogate = (q * h).sum(-1) - h.gather(1, targets[:, None]).squeeze(1)
    return plain.detach() + (surrogate - surrogate.detach())


def time_weighted_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """Analytic loss with every term of a position weighted by ``1 / (Pi (1-Pi))``: the paper's loss
    vanishes like ``Pi (1-Pi)`` at both ends of the schedule; this evens the effort across steps."""
    pi = pi_phi.to(torch.float64)
    log_w = -(pi.log() + (-pi).log1p())
    return _token_weighted_loss(h, targets, pi_phi, law, log_w[:, None].expand(h.shape))


def balanced_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """Binary classification with the two classes re-balanced: ``-log sigmoid(h_b) - sum_a u(a) log
    sigmoid(-h_a)`` (the analytic loss with positives weighted ``1/Pi``, negatives ``1/(1-Pi)`` and
    the prior offset ``logit Pi`` dropped from the logit to match). Its minimiser is again
    ``h_a = log p_t(a|c) - log u(a)``; unlike ``weighted`` its value is its own."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    u = law.probs.to(device=h.device, dtype=h.dtype)
    h_b = h.gather(1, targets[:, None]).squeeze(1)
    return F.softplus(-h_b) + _softplus_sum_u(h, u)


def normalize_h(h: Tensor, law: NoiseLaw) -> Tensor:
    """Project ``h`` onto classifiers whose implied conditional sums to one:
    ``h' = log_softmax(h + log u) - log u``, so ``sum_a u(a) exp(h'_a) = 1``. The Bayes ``h`` already
    satisfies this, so every binary-classification loss keeps its minimiser, and the network no longer
    has to learn each context's normalisation through V separate classifiers. Sampling is unchanged
    (``softmax(h' + log u) = softmax(h + log u)``)."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    log_u = law.log_probs.to(device=h.device, dtype=h.dtype)
    return torch.log_softmax(h + log_u, dim=-1) - log_u


def draw_step_noise(pi_phi: Tensor, law: NoiseLaw, generator: torch.Generator | None = None) -> Tensor:
    """``z ~ Pi_t`` per position: ``-1`` stands for ``phi`` (signal kept), else a token id."""
    keep = torch.rand(pi_phi.shape, dtype=torch.float64, device=pi_phi.device, generator=generator) < pi_phi
    z = law.to(pi_phi.device).sample(tuple(pi_phi.shape), generator)
    return torch.where(keep, torch.full_like(z, -1), z)


def single_sample_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw, z: Tensor) -> Tensor:
    """GGM loss with one drawn ``z`` per position: the token seen is ``b`` (label signal) when
    ``z = phi`` (``-1``) and ``z`` (label noise) otherwise. Its mean over ``z ~ Pi_t`` is
    ``analytic_loss``; it reads one logit per position."""
    s = classifier_logits(h, pi_phi)
    signal = z < 0
    seen = torch.where(signal, targets, z)
    s_seen = s.gather(1, seen[:, None]).squeeze(1)
    return torch.where(signal, F.softplus(-s_seen), F.softplus(s_seen))


def cross_entropy_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """Ablation (not GGM): softmax cross-entropy of ``p_t = softmax(h + log u)`` on the target."""
    return F.cross_entropy(denoising_logits(h, law), targets, reduction="none")


LossFn = Callable[[Tensor, Tensor, Tensor, NoiseLaw], Tensor]
LOSSES: dict[str, LossFn] = {
    "analytic": analytic_loss,
    "weighted": weighted_loss,
    "time_weighted": time_weighted_loss,
    "balanced": balanced_loss,
    "cross_entropy": cross_entropy_loss,
}
LOSS_NAMES = ("analytic", "single_sample", "weighted", "time_weighted", "balanced", "cross_entropy")


def ggm_loss(
    name: str,
    h: Tensor,
    targets: Tensor,
    pi_phi: Tensor,
    law: NoiseLaw,
    generator: torch.Generator | None = None,
    normalized: bool = False,
) -> Tensor:
    """Per-position loss by name (one of ``LOSS_NAMES``); ``normalized`` applies ``normalize_h`` first."""
    if name not in LOSS_NAMES:
        raise ValueError(f"loss must be one of {LOSS_NAMES} (got {name!r})")
    if normalized:
        h = normalize_h(h, law)
    if name == "single_sample":
        return single_sample_loss(h, targets, pi_phi, law, draw_step_noise(pi_phi, law, generator))
    return LOSSES[name](h, targets, pi_phi, law)


def uses_normalized_classifier(name: str, option: bool | None) -> bool:
    """``process.normalized_classifier`` resolved: None means on for ``weighted`` (whose weights assume a
    normalised ``q``) and off otherwise, so ``process.loss=analytic`` alone is the paper's setting."""
    return name == "weighted" if option is None else option
