"""The Glauber Generative Model as a LightningModule: the method code stays in the pure modules
(``schedule``, ``process``, ``loss``, ``sampler``); this class wires them to the network."""

from __future__ import annotations

import random
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from glauber.core.loss import cross_entropy_loss, ggm_loss, uses_normalized_classifier
from glauber.core.noise import NoiseLaw
from glauber.core.process import check_batch, make_training_example, step_probs
from glauber.core.sampler import Denoiser, glauber_sample, infill
from glauber.core.schedule import GlauberSchedule, check_count, trusted_inputs
from glauber.methods.base import GenerativeModule


class GGMModule(GenerativeModule):
    """GGM training (binary-classification loss at hidden positions) and Glauber sampling."""

    def data_info(self, dm: Any) -> dict:
        info = super().data_info(dm)
        if self.cfg.process.noise == "unigram":
            info["token_counts"] = dm.token_counts().tolist()
        return info

    def build_method(self, data_info: dict) -> None:
        p = self.cfg.process
        counts = data_info.get("token_counts")
        self.law = NoiseLaw.from_name(p.noise, self.vocab_size, torch.tensor(counts) if counts else None, p.unigram_smoothing)
        self.train_ms = sorted(set(p.positions_per_step) or {self.cfg.schedule.positions_per_step})
        self._schedules: dict[tuple[int, int], GlauberSchedule] = {}
        self._t_probs: dict[tuple[int, torch.device], Tensor] = {}
        self._laws: dict[torch.device, NoiseLaw] = {}

    def schedule(self, m: int | None = None, sweeps: int | None = None) -> GlauberSchedule:
        """The schedule with ``m`` positions per step and ``sweeps`` sweeps (default: the configured ones), cached; another
        ``K`` changes the signal levels, so only a network that reads them (``model.condition_on_alpha``) can sample it."""
        m = m or self.cfg.schedule.positions_per_step
        trained = self.cfg.schedule.sweeps
        K = trained if sweeps is None else sweeps
        check_count("sweeps", K, 1)
        if K != trained and self.model.alpha_embed is None:
            raise ValueError(
                f"sweeps={K} differs from the trained schedule.sweeps={trained}, and this network reads only the "
                "time fraction (model.condition_on_alpha=false), so it cannot know the per-position signal levels "
                f"of another schedule: sample with sweeps={trained}, or train with model.condition_on_alpha=true"
            )
        if (m, K) not in self._schedules:
            sc = OmegaConf.merge(self.cfg.schedule, {"positions_per_step": m, "sweeps": K})
            self._schedules[m, K] = GlauberSchedule.from_config(sc, self.cfg.data.seq_len)
        return self._schedules[m, K]

    def train_step_probs(self, m: int, device: torch.device) -> Tensor | None:
        """The training law of ``t`` for hidden sets of size ``m`` (None: uniform), cached per device."""
        if self.cfg.process.step_weighting == "uniform":
            return None
        if (m, device) not in self._t_probs:
            self._t_probs[m, device] = step_probs(self.schedule(m), self.cfg.process.step_weighting).to(device)
        return self._t_probs[m, device]

    def law_on(self, device: torch.device) -> NoiseLaw:
        """The noise law on ``device``, moved once and reused at every step."""
        if device not in self._laws:
            self._laws[device] = self.law.to(device)
        return self._laws[device]

    def denoiser(self, schedule: GlauberSchedule, clean_mask: Tensor | None = None) -> Denoiser:
        """The network as the sampler's ``f(x_in, hidden, t) -> h``; positions in ``clean_mask`` get signal level 1."""
        clean = None if clean_mask is None else clean_mask.to(self.device)

        def f(x_in: Tensor, hidden: Tensor, t: Tensor) -> Tensor:
            alpha = self.signal_levels(schedule, t)
            if alpha is not None and clean is not None:
                alpha = alpha.masked_fill(clean.expand_as(alpha), 1.0)
            return self.model(x_in, hidden, (t.float() + 1) / schedule.num_steps, alpha)

        f.takes_positions = True  # type: ignore[attr-defined]
        return f

    def signal_levels(self, schedule: GlauberSchedule, t: Tensor) -> Tensor | None:
        """``alpha_i(t)`` for the network, only when it was built to read them."""
        return schedule.signal_level(t).float() if self.model.alpha_embed is not None else None

    def compute_loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean GGM loss at random steps and per-row extras, without host-device sync after the first batch (checked here). A
        training batch's ``m`` comes from the generator's seed: the same on a resumed run and for one reused generator."""
        if not getattr(self, "_batch_checked", False):
            check_batch(batch, self.schedule(), self.law, "batch")
            self._batch_checked = True
        if self.training:
            m = self.train_ms[0]
            if len(self.train_ms) > 1:
                m = random.Random(f"train_m/{generator.initial_seed()}").choice(self.train_ms)
            sched = self.schedule(m)
            t_probs = self.train_step_probs(sched.m, batch.device)
        else:  # validation measures the conditionals the sampler uses: the schedule's m, uniform t
            sched, t_probs = self.schedule(), None
        law = self.law_on(batch.device)
        p = self.cfg.process
        normalized = uses_normalized_classifier(p.loss, p.normalized_classifier)
        with trusted_inputs():
            ex = make_training_example(batch, sched, law, hidden_id=self.vocab_size, generator=generator, t_probs=t_probs)
            h = self.model(ex.x_in, ex.positions, (ex.t.float() + 1) / sched.num_steps, self.signal_levels(sched, ex.t))
            per = ggm_loss(p.loss, h, ex.targets.reshape(-1), ex.pi_phi.reshape(-1), law, generator, normalized)
            per_row = per.view(batch.shape[0], -1).mean(1)
            extra = {"per_row": per_row, "time": ex.t.float() / sched.num_steps}
            if not self.training:  # comparable across losses: -log p_t(X_t^i | context) of the implied conditional
                nll = cross_entropy_loss(h, ex.targets.reshape(-1), ex.pi_phi.reshape(-1), law)
                extra["nll_per_row"] = nll.view(batch.shape[0], -1).mean(1)
        return per_row.mean(), extra

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        positions_per_step: int | None = None,
        template: Tensor | None = None,
        clamp_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        sweeps: int | None = None,
        corrector_sweeps: int = 0,
        **options: Any,
    ) -> Tensor:
        """Samples, or infilling given ``template`` and ``clamp_mask``; ``sweeps``: the sampling ``K`` (``schedule``)."""
        sched = self.schedule(positions_per_step, sweeps)
        law = self.law_on(self.device)
        common = dict(corrector_sweeps=corrector_sweeps, generator=generator, progress=progress, **options)
        with self.eval_weights():
            if template is None:
                return glauber_sample(self.denoiser(sched), sched, law, num_samples, device=self.device, **common)
            clamp = clamp_mask.to(self.device)
            return infill(self.denoiser(sched, clamp), sched, law, template.to(self.device), clamp, **common)

    def network_calls(
        self, positions_per_step: int | None = None, sweeps: int | None = None, corrector_sweeps: int = 0, **options: Any
    ) -> float:
        """``(K + corrector_sweeps) L / m``: one network call per step (infilling skips the steps it clamps whole)."""
        check_count("corrector_sweeps", corrector_sweeps, 0)
        sched = self.schedule(positions_per_step, sweeps)
        return float(sched.num_steps + corrector_sweeps * sched.steps_per_sweep)

    def method_state(self) -> dict:
        return {**super().method_state(), "noise_probs": self.law.probs.tolist()}
