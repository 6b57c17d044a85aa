"""glauber: the Glauber Generative Model (discrete diffusion learned by binary classification)."""

from glauber.core.loss import analytic_loss, cross_entropy_loss, ggm_loss, single_sample_loss
from glauber.core.noise import NoiseLaw
from glauber.core.process import make_training_example, noise_to
from glauber.core.sampler import glauber_sample, infill
from glauber.core.schedule import GlauberSchedule, ScheduleConfig

__version__ = "0.1.0"
__all__ = [
    "GlauberSchedule",
    "NoiseLaw",
    "ScheduleConfig",
    "analytic_loss",
    "cross_entropy_loss",
    "ggm_loss",
    "glauber_sample",
    "infill",
    "make_training_example",
    "noise_to",
    "single_sample_loss",
]
