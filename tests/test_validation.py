"""Bad input fails early with a ValueError that names the field."""

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from glauber.core.exact import OracleDenoiser, random_law
from glauber.core.loss import analytic_loss, ggm_loss, log_odds
from glauber.core.noise import NoiseLaw
from glauber.core.process import make_training_example, noise_to
from glauber.core.sampler import draw_categorical, glauber_sample, infill
from glauber.core.schedule import GlauberSchedule, ScheduleConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seq_len=6, positions_per_step=4), "positions_per_step"),
        (dict(seq_len=6, alpha_min=0.0), "alpha_min"),
        (dict(seq_len=6, alpha_min=-1e-3), "alpha_min"),
        (dict(seq_len=6, alpha_min=1.0), "alpha_min"),
        (dict(seq_len=6, clock="hour"), "clock"),
        (dict(seq_len=6, order="zigzag"), "order"),
        (dict(seq_len=6, alpha="sigmoidal"), "alpha"),
        (dict(seq_len=6, alpha=lambda s, amin: 1 + 0 * s), "strictly decreasing"),
        (dict(seq_len=6, alpha=lambda s, amin: 1 - 0.5 * s + 0.4 * s * s), "strictly decreasing"),
        (dict(seq_len=6, alpha=lambda s, amin: 0.9 - 0.5 * s), "alpha(0)"),
        (dict(seq_len=0), "seq_len"),
        (dict(seq_len=6, sweeps=0), "sweeps"),
    ],
)
def test_schedule_rejects_bad_options(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
        GlauberSchedule(**kwargs)


def test_schedule_choices_are_checked_where_the_config_is_built():
    """A typed schedule config refuses a value outside a choice, naming the choices; its members are the strings."""
    with pytest.raises(ValidationError, match=r"zigzag.*round_robin, strided, random"):
        OmegaConf.merge(OmegaConf.structured(ScheduleConfig), {"order": "zigzag"})
    cfg = OmegaConf.merge(OmegaConf.structured(ScheduleConfig), {"order": "strided", "clock": "sweep", "alpha": "cosine"})
    assert (cfg.order, cfg.clock, cfg.alpha) == ("strided", "sweep", "cosine")
    s = GlauberSchedule.from_config(cfg, seq_len=6)
    assert repr(s) == GlauberSchedule(6, 4, 1, alpha="cosine", clock="sweep", order="strided").__repr__()


def test_schedule_from_config_derives_T():
    s = GlauberSchedule.from_config(ScheduleConfig(sweeps=4, positions_per_step=2), seq_len=8)
    assert s.num_steps == 16 and s.positions.shape == (16, 2)
    assert torch.equal(s.positions.sort(1).values.reshape(4, -1).sort(1).values, torch.arange(8).repeat(4, 1))


def test_token_ids_out_of_range_are_rejected():
    sched, law = GlauberSchedule(4, 2), NoiseLaw.uniform(3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        noise_to(torch.tensor([[0, 1, 3, 0]]), torch.tensor([1]), sched, law)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_training_example(torch.tensor([[0, -1, 2, 0]]), sched, law, hidden_id=3)
    with pytest.raises(ValueError, match=r"shape \[B, L=4\]"):
        noise_to(torch.zeros(2, 5, dtype=torch.long), torch.tensor([1, 1]), sched, law)
    with pytest.raises(ValueError, match="steps t"):
        noise_to(torch.zeros(1, 4, dtype=torch.long), torch.tensor([9]), sched, law)


def test_noise_law_must_be_positive():
    with pytest.raises(ValueError, match="unigram_smoothing"):
        NoiseLaw.unigram(torch.tensor([3.0, 0.0, 1.0]), smoothing=0.0)
    assert NoiseLaw.unigram(torch.tensor([3.0, 0.0, 1.0]), smoothing=1.0).probs[1] > 0
    with pytest.raises(ValueError, match="noise"):
        NoiseLaw.from_name("gaussian", 3)


def test_pi_phi_must_be_strictly_inside_unit_interval():
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="Pi_t"):
            log_odds(torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match="loss must be one of"):
        ggm_loss("hinge", torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), torch.tensor([0.5]), NoiseLaw.uniform(3))
    with pytest.raises(ValueError, match="Pi_t"):
        analytic_loss(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), torch.tensor([0.0]), NoiseLaw.uniform(3))


def test_sampler_rejects_bad_infilling_masks_and_options():
    gen = torch.Generator().manual_seed(0)
    sched, law = GlauberSchedule(4, 2), NoiseLaw.uniform(3)
    oracle = OracleDenoiser(random_law(4, 3, gen), sched, law)
    template = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="clamp_mask must have shape"):
        infill(oracle, sched, law, template, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="clamp_mask must be a boolean"):
        infill(oracle, sched, law, template, torch.ones(4))
    with pytest.raises(ValueError, match="template must have shape"):
        infill(oracle, sched, law, torch.zeros(2, 5, dtype=torch.long), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        glauber_sample(oracle, sched, law, x_init=torch.full((1, 4), 7))
    with pytest.raises(ValueError, match="num_samples"):
        glauber_sample(oracle, sched, law)
    with pytest.raises(ValueError, match="temperature"):
        draw_categorical(torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        draw_categorical(torch.zeros(2, 3), top_p=1.5)
    with pytest.raises(ValueError, match="denoiser returned shape"):
        glauber_sample(lambda x, m, t: torch.zeros(1, 2), sched, law, num_samples=2)
