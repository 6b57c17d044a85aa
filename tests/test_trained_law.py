"""Known-answer check 5 of docs/METHOD.md: a TRAINED network's samples approach the data law.

GGM (each loss in ``glauber.core.loss.LOSS_NAMES``) and the AR and MDLM baselines are trained the same way
(same tiny DDiT, steps, batch, learning rate, fresh draws of the data law) through the project's own
loop: the method's LightningModule (``training_step``, ``configure_optimizers``: AdamW with warm-up and
cosine decay, gradient clipping) fitted by a Lightning Trainer on the CPU. Each then draws ``N``
samples with its own sampler, and the TV distance of their histogram to the exact data law is checked.

The law (L = 6, V = 3, 729 sequences, enumerable): an inhomogeneous Markov chain,
``x_{i+1} = x_i + SHIFTS[i] (mod 3)`` with probability ``STAY`` (else one of the two other tokens), a
skewed law of ``x_0``, and a long-range pair term (``x_0 = x_5`` weighted by ``ENDS``). The
dependencies are strong (independent positions with the right marginals are at TV 0.74) and
position-specific: the rule linking neighbours changes along the sequence and the marginals differ
from position to position, so a model that ignores the context, or cannot tell positions apart, fails.

Position option: ``model.learned_positions = L`` for every method. Rotary attention alone only sees
offsets, so a network whose input is all alike (MDLM's all-masked start) gives the same output at
every position: MDLM with rotary positions only fails here (sampled TV 0.57). GGM gets by without them
only because, for m = 1, the step ``t`` it is told names the hidden position in every visiting order
(rotary-only GGM: exact TV 0.10 against 0.084), a property of the schedule rather than of the network.
``model.condition_on_alpha`` marks positions only indirectly, through the per-position signal levels
(tied among the positions not visited yet), AR and MDLM refuse it, and adding it made GGM worse here
(exact TV 0.106 against 0.084); learned absolute positions give the three methods the same network.

Thresholds. The histogram of ``N`` exact draws is itself at TV ``noise`` from the law: its mean is
computed by simulation below (0.081 at N = 4000, standard deviation 0.005; ``tv_bound``, a
high-probability bound, is 0.147). By the triangle inequality a model whose law is within ``e`` of the
data law draws histograms within about ``noise + e`` of it. GGM's sampler adds its own exact bias from
starting at ``prod u`` rather than ``P_T`` (check 4, computed with the oracle: 2e-3 for K = 3 sweeps).
``MODEL_ALLOWANCE`` is what the training budget leaves: the exact law of GGM's sampler (enumerated
from the trained network) was measured at TV 0.06-0.085 from the data law with the paper's loss over
three seeds, 0.075-0.082 with the other losses but ``single_sample``, and AR's exact law at 0.024
(histograms of N draws, seeds 0-2: GGM 0.11-0.12, AR 0.08-0.09, MDLM 0.15). 0.12 keeps a margin and
the power: the product of the data marginals and the uniform law are more than 0.5 above every
threshold. GGM supervises one position per sequence and step where AR supervises six, hence the batch
of 512: at batch 128 GGM needs about five times AR's steps to reach the same TV.

``single_sample`` (one drawn ``z`` per position) is expected to fail at this budget: its gradient has
the analytic loss's mean but far more variance (a near-clean step shows a noise token at a position
with probability ``1 - Pi_t(phi)`` only, so those steps' classifiers see few negatives). Its exact TV
was 0.26 after these 300 steps and 0.077 after 1500: it needs about five times the budget.
"""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from torch import Tensor

import glauber.core.loss
from glauber.config import load_config
from glauber.core.exact import (
    OracleDenoiser,
    all_states,
    empirical_law,
    product_noise_law,
    sample_law,
    total_variation,
)
from glauber.methods import method_class

V, L = 3, 6
FIRST = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)  # law of x_0 (before the long-range term)
SHIFTS = (1, 0, 2, 2, 0)  # x_{i+1} = x_i + SHIFTS[i] (mod V) with probability STAY
STAY = 0.8
ENDS = 4.0  # x_0 = x_5 is ENDS times as likely
STEPS, BATCH, LR = 300, 512, 5e-3
SWEEPS = 3  # GGM's K: T = 18 sampling steps
N_SAMPLES = 4000
SAMPLE_CHUNK = 2000  # the CPU samples faster in chunks that stay in cache
MODEL_ALLOWANCE = 0.12
LOSS_NAMES = getattr(glauber.core.loss, "LOSS_NAMES", ("analytic", "cross_entropy"))
SLOW_TO_LEARN = {"single_sample": "one drawn z per position: needs about five times these steps (see the docstring)"}
LOSS_CASES = [  # strict: a loss in SLOW_TO_LEARN that passes makes its note stale
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=SLOW_TO_LEARN[name])) if name in SLOW_TO_LEARN else name
    for name in LOSS_NAMES
]


def data_law() -> Tensor:
    """The law tensor ``(V,) * L`` (float64) described in the module docstring."""
    states = all_states(L, V)
    log_p = FIRST.log()[states[:, 0]] + math.log(ENDS) * (states[:, 0] == states[:, -1])
    for i, shift in enumerate(SHIFTS):
        follows = states[:, i + 1] == (states[:, i] + shift) % V
        log_p = log_p + torch.where(follows, math.log(STAY), math.log((1 - STAY) / (V - 1)))
    p = log_p.exp()
    return (p / p.sum()).reshape((V,) * L)


P0 = data_law()


def marginals(P: Tensor) -> list[Tensor]:
    return [P.sum(dim=tuple(j for j in range(L) if j != i)) for i in range(L)]


def product_law(factors: list[Tensor]) -> Tensor:
    out = factors[0]
    for f in factors[1:]:
        out = out[..., None] * f
    return out


def noise_level(P: Tensor, n: int, repeats: int = 50, seed: int = 0) -> float:
    """Mean TV between ``P`` and the histogram of ``n`` exact draws from it (by simulation)."""
    gen = torch.Generator().manual_seed(seed)
    return sum(total_variation(empirical_law(sample_law(P, n, gen), V), P) for _ in range(repeats)) / repeats


def train(method: str, *extra: str, seed: int = 0):
    """Fit ``method`` on ``STEPS * BATCH`` fresh draws of the law (one epoch) with a Lightning Trainer."""
    overrides = [f"method={method}", f"data.seq_len={L}", "model.width=32", "model.blocks=2", "model.heads=2"]
    overrides += ["model.cond_dim=32", "model.mlp_ratio=2", "model.dropout=0.0", f"model.learned_positions={L}"]
    overrides += [f"optim.lr={LR}", "optim.warmup_steps=20", "optim.lr_schedule=cosine", "optim.min_lr_ratio=0.0"]
    overrides += ["optim.ema=0", f"schedule.sweeps={SWEEPS}", f"train.max_steps={STEPS}", f"train.seed={seed}", *extra]
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)  # the initial weights
    module = method_class(method)(cfg, V)
    data = sample_law(P0, STEPS * BATCH, torch.Generator().manual_seed(seed + 1))
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=STEPS,
        gradient_clip_val=cfg.optim.grad_clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))
    assert trainer.global_step == STEPS
    return module.eval()


def sampled_tv(module, seed: int = 2, **options) -> float:
    """TV between the data law and the histogram of ``N_SAMPLES`` draws of the module's sampler."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([module.sample(SAMPLE_CHUNK, generator=gen, **options) for _ in range(N_SAMPLES // SAMPLE_CHUNK)])
    return total_variation(empirical_law(x, V), P0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def noise() -> float:
    return noise_level(P0, N_SAMPLES)


def test_the_law_needs_context_and_positions(noise):
    assert float(P0.sum()) == pytest.approx(1.0) and noise == pytest.approx(0.081, abs=0.005)
    ms = marginals(P0)
    assert total_variation(ms[0], ms[1]) > 0.4 and total_variation(ms[1], ms[5]) > 0.2  # positions differ
    threshold = noise + MODEL_ALLOWANCE
    assert total_variation(product_law(ms), P0) > threshold + 0.5  # ignoring the context fails
    assert total_variation(torch.full_like(P0, V**-L), P0) > threshold + 0.5


@pytest.mark.parametrize("loss", LOSS_CASES)
def test_trained_ggm_samples_approach_the_data_law(loss, noise):
    module = train("ggm", f"process.loss={loss}")
    law = module.law
    start_bias = total_variation(OracleDenoiser(P0, module.schedule(), law).sampler_output_law(product_noise_law(law, L)), P0)
    assert start_bias < 0.005  # starting from prod u instead of P_T: small next to the noise
    tv = sampled_tv(module)
    threshold = noise + start_bias + MODEL_ALLOWANCE
    print(f"GGM ({loss}): TV {tv:.3f} (noise {noise:.3f}, threshold {threshold:.3f})")
    assert tv < threshold


@pytest.mark.parametrize("method", ["ar", "mdlm"])
def test_trained_baselines_sample_the_data_law_too(method, noise):
    module = train(method)
    tv = sampled_tv(module, steps=8 * L)  # MDLM: 8 L steps make its factorisation error small; AR ignores it
    print(f"{method.upper()}: TV {tv:.3f} (noise {noise:.3f}, threshold {noise + MODEL_ALLOWANCE:.3f})")
    assert tv < noise + MODEL_ALLOWANCE
