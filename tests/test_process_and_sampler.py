"""Unit behaviour of the training batch, the losses' numerics and the categorical draw."""

from pathlib import Path

import pytest
import torch
from stats import tv_bound

from glauber.core.loss import analytic_loss, cross_entropy_loss, draw_step_noise, ggm_loss, single_sample_loss
from glauber.core.noise import NoiseLaw
from glauber.core.process import make_training_example, step_probs
from glauber.core.sampler import draw_categorical, glauber_sample
from glauber.core.schedule import GlauberSchedule


def test_training_example_hides_exactly_S_t_and_targets_are_X_t():
    gen = torch.Generator().manual_seed(0)
    sched = GlauberSchedule(12, sweeps=3, positions_per_step=3, order="random")
    law = NoiseLaw.uniform(7)
    x0 = torch.randint(0, 7, (64, 12), generator=gen)
    ex = make_training_example(x0, sched, law, hidden_id=7, generator=gen)
    assert ex.hidden_mask.sum(1).eq(3).all()
    assert (ex.x_in[ex.hidden_mask] == 7).all() and (ex.x_in[~ex.hidden_mask] < 7).all()
    assert torch.equal(ex.hidden_mask.nonzero()[:, 1].reshape(64, 3), ex.positions)
    for b in range(64):
        assert set(ex.positions[b].tolist()) == set(sched.positions[ex.t[b]].tolist())
        lookup = dict(zip(sched.positions[ex.t[b]].tolist(), sched.step_pi_phi[ex.t[b]].tolist()))
        assert ex.pi_phi[b].tolist() == [lookup[p] for p in ex.positions[b].tolist()]
    # at t = 0 nothing has been noised yet, so hidden targets are the clean tokens
    ex0 = make_training_example(x0, sched, law, 7, gen, t=torch.zeros(64, dtype=torch.long))
    assert torch.equal(ex0.targets, x0.gather(1, ex0.positions))
    assert torch.equal(ex0.x_in[~ex0.hidden_mask], x0[~ex0.hidden_mask])


@pytest.mark.parametrize("clock", ["visit", "sweep"])
def test_inverse_noise_step_law_follows_one_over_noise_rate_and_is_drawn(clock):
    sched = GlauberSchedule(8, sweeps=2, positions_per_step=2, order="random", clock=clock, alpha_min=0.01)
    assert torch.equal(step_probs(sched, "uniform"), torch.full((sched.num_steps,), 1 / sched.num_steps, dtype=torch.float64))
    p = step_probs(sched, "inverse_noise")
    w = (1 / (1 - sched.step_pi_phi.double())).mean(1)
    assert abs(float(p.sum()) - 1) < 1e-12 and (p > 0).all()
    assert torch.allclose(p, w / w.sum(), rtol=1e-12, atol=0)
    # near-clean steps (Pi_t(phi) close to 1) are drawn more often than the noisiest ones
    assert p[0] > p[-1]
    gen = torch.Generator().manual_seed(5)
    n = 200_000
    x0 = torch.randint(0, 4, (n, 8), generator=gen)
    ex = make_training_example(x0, sched, NoiseLaw.uniform(4), 4, gen, t_probs=p)
    freq = torch.bincount(ex.t, minlength=sched.num_steps).double() / n
    assert 0.5 * float((freq - p).abs().sum()) < tv_bound(p, n)
    with pytest.raises(ValueError, match="step weighting must be one of"):
        step_probs(sched, "fisher")


def test_training_targets_are_noised_tokens_with_the_right_signal_level():
    gen = torch.Generator().manual_seed(3)
    sched = GlauberSchedule(4, sweeps=3, alpha="cosine", alpha_min=0.05)
    law = NoiseLaw.unigram(torch.tensor([6.0, 3.0, 1.0]))
    n = 100_000
    x0 = torch.randint(0, 3, (n, 4), generator=gen)
    for step in (5, sched.num_steps - 1):
        t = torch.full((n,), step)
        ex = make_training_example(x0, sched, law, 3, gen, t=t)
        pos = ex.positions[:, 0]
        level = sched.signal_level(t)[0, pos[0]]  # X_t's level where S_t is hidden
        clean = x0.gather(1, ex.positions)[:, 0]
        expected = float((level + (1 - level) * law.probs[clean]).mean())
        observed = float((ex.targets[:, 0] == clean).double().mean())
        assert abs(observed - expected) < 6 * (expected * (1 - expected) / n) ** 0.5


def test_single_sample_loss_is_unbiased_for_analytic_loss():
    gen = torch.Generator().manual_seed(1)
    law = NoiseLaw.unigram(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    h = torch.randn(1, 4, generator=gen, dtype=torch.float64).expand(200_000, 4)
    targets = torch.full((200_000,), 2)
    pi = torch.full((200_000,), 0.3, dtype=torch.float64)
    z = draw_step_noise(pi, law, gen)
    assert abs(float((z == -1).double().mean()) - 0.3) < 5e-3
    samples = single_sample_loss(h, targets, pi, law, z)
    exact = analytic_loss(h[:1], targets[:1], pi[:1], law)
    assert abs(float(samples.mean() - exact)) < 5 * float(samples.std()) / 200_000**0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["analytic", "single_sample", "cross_entropy"])
def test_losses_are_finite_for_extreme_logits_in_low_precision(dtype, name):
    law = NoiseLaw.uniform(50)
    h = torch.tensor([[-1e4, 1e4] + [0.0] * 48, [80.0] * 50, [-80.0] * 50], dtype=dtype).requires_grad_(True)
    targets = torch.tensor([0, 1, 2])
    pi = torch.tensor([1e-9, 1 - 1e-9, 0.5], dtype=torch.float64)
    loss = ggm_loss(name, h, targets, pi, law, torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(h.grad.float()).all()


def test_cross_entropy_is_the_softmax_of_h_plus_log_u():
    law = NoiseLaw.unigram(torch.tensor([1.0, 2.0, 5.0]))
    h = torch.tensor([[0.1, -0.3, 0.7]], dtype=torch.float64)
    p = torch.softmax(h + law.probs.log(), -1)
    got = cross_entropy_loss(h, torch.tensor([2]), torch.tensor([0.5]), law)
    assert torch.allclose(got, -p[:, 2].log())


def test_draw_categorical_law_temperature_and_top_p():
    gen = torch.Generator().manual_seed(2)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    n = 200_000
    logits = p.log().expand(n, 4)

    def law_of(draws):
        return torch.bincount(draws, minlength=4).double() / n

    assert 0.5 * (law_of(draw_categorical(logits, generator=gen)) - p).abs().sum() < tv_bound(p, n)
    hot = torch.softmax(p.log() / 2.0, -1)
    assert 0.5 * (law_of(draw_categorical(logits, temperature=2.0, generator=gen)) - hot).abs().sum() < tv_bound(hot, n)
    nucleus = torch.tensor([0.5, 0.3, 0.0, 0.0], dtype=torch.float64) / 0.8  # smallest set with mass >= 0.75
    got = law_of(draw_categorical(logits, top_p=0.75, generator=gen))
    assert got[2:].sum() == 0 and 0.5 * (got - nucleus).abs().sum() < tv_bound(nucleus, n)
    a = draw_categorical(logits[:100], generator=torch.Generator().manual_seed(9))
    b = draw_categorical(logits[:100], generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_sampler_queries_only_the_hidden_positions_once_per_step():
    sched = GlauberSchedule(6, sweeps=2, positions_per_step=2, order="strided")
    law = NoiseLaw.uniform(5)
    seen = []

    def denoiser(x_in, hidden, t):
        seen.append((int(t[0]), hidden[0].nonzero().flatten().tolist()))
        assert (x_in[hidden] == 5).all() and (x_in[~hidden] < 5).all()
        return torch.zeros(int(hidden.sum()), 5)

    glauber_sample(denoiser, sched, law, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert [s for s, _ in seen] == list(range(5, -1, -1))
    assert all(sorted(pos) == sorted(sched.positions[s].tolist()) for s, pos in seen)


def test_ggm_module_trains_on_weighted_steps_and_validates_the_sampler_conditionals():
    from glauber.config import load_config
    from glauber.methods.ggm import GGMModule

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml",
        [
            "process.loss=cross_entropy",
            "process.step_weighting=inverse_noise",
            "schedule.positions_per_step=1",
            "process.positions_per_step=[2]",
        ],
    )
    module = GGMModule(cfg, vocab_size=6)
    batch = torch.randint(0, 6, (4096, cfg.data.seq_len), generator=torch.Generator().manual_seed(0))
    sched = module.schedule(2)
    module.train()
    _, extra = module.compute_loss(batch, torch.Generator().manual_seed(1))
    assert "nll_per_row" not in extra  # training computes only its loss
    early = float((extra["time"] < 0.25).double().mean())  # near-clean steps, over-drawn by inverse_noise
    p = step_probs(sched, "inverse_noise")
    expected = float(p[torch.arange(sched.num_steps) / sched.num_steps < 0.25].sum())
    assert abs(early - expected) < 5 * (expected * (1 - expected) / 4096) ** 0.5 and expected > 0.3
    module.eval()
    with torch.no_grad():
        _, extra = module.compute_loss(batch, torch.Generator().manual_seed(1))
    assert abs(float((extra["time"] < 0.25).double().mean()) - 0.25) < 0.03  # validation stays uniform
    # ... over the steps of the sampler's schedule (m = 1, T = 64), not the training sets (m = 2, T = 32)
    steps = extra["time"] * module.schedule().num_steps
    assert module.schedule().num_steps == 2 * sched.num_steps and bool((steps.round() % 2 == 1).any())
    # with the cross-entropy loss the loss-independent validation NLL is the loss itself
    assert torch.allclose(extra["nll_per_row"], extra["per_row"], rtol=1e-6)


def test_learning_rate_warms_up_linearly_then_follows_the_cosine_to_its_floor():
    from glauber.nn.optim import lr_factor

    assert [lr_factor(s, 4, "cosine", 104, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, "cosine", 104, 0.1) == 1.0  # the cosine starts at the peak
    assert abs(lr_factor(54, 4, "cosine", 104, 0.1) - 0.55) < 1e-12  # half way: (1 + 0.1) / 2
    assert abs(lr_factor(104, 4, "cosine", 104, 0.1) - 0.1) < 1e-12 and lr_factor(500, 4, "cosine", 104, 0.1) == 0.1
    assert lr_factor(0, 0, "constant", 10, 0.1) == 1.0 and lr_factor(9, 0, "constant", 10, 0.1) == 1.0
