"""Learning the denoising conditional by binary classification (METHOD.md, "Learning ...").

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

from glauber.noise import NoiseLaw


def log_odds(pi_phi: Tensor) -> Tensor:
    """``logit(Pi_t(phi))``, after checking ``0 < Pi_t(phi) < 1`` (where it is 0 the step carries no
    information; where it is 1 no noise is added)."""
    if bool((pi_phi <= 0).any()) or bool((pi_phi >= 1).any()):
        raise ValueError(
            f"Pi_t(phi) must lie strictly in (0, 1) at every step (got min {float(pi_phi.min())}, "
            f"max {float(pi_phi.max())}); use alpha_min > 0 and a strictly decreasing alpha"
        )
    pi = pi_phi.double()
    return pi.log() - (-pi).log1p()


def classifier_logits(h: Tensor, pi_phi: Tensor) -> Tensor:
    """``s = h + logit(Pi_t(phi))`` for ``h [N, V]`` and ``pi_phi [N]``, in at least float32."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    return h + log_odds(pi_phi).to(h.dtype)[:, None]


def denoising_logits(h: Tensor, law: NoiseLaw) -> Tensor:
    """Logits of ``p_t(.|c)``: ``h + log u`` (a softmax of these is the denoising conditional)."""
    h = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
    return h + law.log_probs.to(device=h.device, dtype=h.dtype)


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


def analytic_loss(h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw) -> Tensor:
    """GGM loss with the noise integrated out analytically, per hidden position ``[N]``:
    ``-Pi(phi) log sigmoid(s_b) - sum_a Pi(a) log sigmoid(-s_a)``."""
    s = classifier_logits(h, pi_phi)
    pi = pi_phi.to(s.dtype)
    u = law.probs.to(device=s.device, dtype=s.dtype)
    s_b = s.gather(1, targets[:, None]).squeeze(1)
    return pi * F.softplus(-s_b) + (1 - pi) * (F.softplus(s) @ u)


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
LOSSES: dict[str, LossFn] = {"analytic": analytic_loss, "cross_entropy": cross_entropy_loss}


def ggm_loss(
    name: str, h: Tensor, targets: Tensor, pi_phi: Tensor, law: NoiseLaw, generator: torch.Generator | None = None
) -> Tensor:
    """Per-position loss by name: ``analytic`` (default), ``single_sample`` or ``cross_entropy``."""
    if name == "single_sample":
        return single_sample_loss(h, targets, pi_phi, law, draw_step_noise(pi_phi, law, generator))
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {('single_sample', *LOSSES)} (got {name!r})")
    return LOSSES[name](h, targets, pi_phi, law)
