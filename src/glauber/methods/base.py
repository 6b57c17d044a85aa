"""What every method shares: the backbone, AdamW with warm-up, EMA, step-seeded randomness,
validation with EMA weights, and the run state saved in checkpoints."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics import MeanMetric

from glauber.nn.ddit import DDiT, ModelConfig
from glauber.nn.ema import EMA
from glauber.nn.optim import adamw_with_schedule

NUM_BUCKETS = 10  # validation loss is also reported per tenth of the noise time, when a method has one


class GenerativeModule(L.LightningModule):
    """Base of every method (``compute_loss``, ``sample``); built in ``configure_model`` when the data gives ``vocab_size``."""

    def __init__(self, cfg: dict | DictConfig, vocab_size: int | None = None) -> None:
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig) else cfg
        self.save_hyperparameters({"cfg": cfg, "vocab_size": vocab_size})
        self.cfg = OmegaConf.create(cfg)
        self.model: DDiT | None = None
        self.ema: EMA | None = None
        self.micro_batches_seen = 0  # drives per-batch seeds and the data position on resume
        if vocab_size is not None:
            self.build(vocab_size)

    def build(self, vocab_size: int, data_info: dict | None = None) -> None:
        """Create the network (and method state) once the vocabulary is known."""
        if self.model is not None:
            return
        self.hparams["vocab_size"] = vocab_size
        self.vocab_size = vocab_size
        self.data_info_ = data_info or {}
        self.model = DDiT(ModelConfig(**self.cfg.model), vocab_size)
        if self.cfg.train.compile:
            self.model.compile()  # in place: parameter names (and checkpoints) stay the same
        if self.cfg.optim.ema > 0:
            self.ema = EMA(self.model, self.cfg.optim.ema)
        self.val_loss, self.val_nll = MeanMetric(), MeanMetric()
        self.val_buckets = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_BUCKETS))
        self.build_method(self.data_info_)

    def build_method(self, data_info: dict) -> None:  # noqa: B027 - optional hook
        """Method-specific state built after the network (noise law, schedules...)."""

    def configure_model(self) -> None:
        if self.model is None:
            dm = self.trainer.datamodule
            if dm is None:
                raise ValueError("vocab_size unknown: pass it to the module or fit with a DataModule")
            self.build(dm.vocab_size, self.data_info(dm))

    def data_info(self, dm: Any) -> dict:
        """What checkpoints keep of the data: the tokenizer (samples decode without the corpus), plus what a method needs."""
        return {"tokenizer": dm.tokenizer_state()} if hasattr(dm, "tokenizer_state") else {}

    def configure_optimizers(self):
        return adamw_with_schedule(self.model.parameters(), self.cfg.optim, self.cfg.train.max_steps)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.model)

    def step_generator(self, salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, micro-batch counter, rank): a resumed run draws the same noise."""
        seed = (self.cfg.train.seed * 1_000_003 + self.micro_batches_seen * 7919 + self.global_rank * 104_729 + salt) % 2**63
        return torch.Generator(device=self.device).manual_seed(seed)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Counted at the start, so a checkpoint written at this batch's end records it as consumed.
        self.micro_batches_seen += 1
        torch.manual_seed(self.cfg.train.seed * 65_537 + self.micro_batches_seen * 31 + self.global_rank)  # dropout

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, _ = self.compute_loss(batch, self.step_generator())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch.shape[0])
        return loss

    def ema_scope(self) -> AbstractContextManager:
        """The EMA weights in the live network for a ``with`` block (restored on exit, also on an exception)."""
        return self.ema.scope(self.model) if self.ema is not None else nullcontext()

    @contextmanager
    def eval_weights(self) -> Iterator[None]:
        """EMA weights and eval mode for the duration of a ``with`` block (sampling, likelihoods)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.ema_scope():
                yield
        finally:
            self.model.train(was_training)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        """``val/loss`` with EMA weights, also per tenth of ``time``; bucket means weigh their rows 1, others 0 (no host sync)."""
        gen = torch.Generator(device=self.device).manual_seed(10_007 * batch_idx + self.global_rank + 17)
        with self.ema_scope():
            _, extra = self.compute_loss(batch, gen)
        per_row = extra["per_row"].float()
        self.val_loss.update(per_row)
        if "nll_per_row" in extra:
            self.val_nll.update(extra["nll_per_row"].float())
        if "time" in extra:
            bucket = (extra["time"] * NUM_BUCKETS).long().clamp(max=NUM_BUCKETS - 1)
            for k, metric in enumerate(self.val_buckets):
                metric.update(per_row, weight=(bucket == k).float())

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.val_loss.reset()
        if self.val_nll.update_count:
            self.log("val/nll", self.val_nll.compute(), sync_dist=False)
            self.val_nll.reset()
        for k, metric in enumerate(self.val_buckets):
            if metric.update_count:  # every rank updates every bucket (weight 0 for rows elsewhere)
                value = metric.compute()  # a DDP collective; NaN when no rank saw this tenth of the time
                if not torch.isnan(value):
                    self.log(f"val/loss_t{k}", value)
            metric.reset()

    @abstractmethod
    def compute_loss(self, batch: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean loss of a batch of clean sequences and per-row extras (e.g. the noise level)."""

    @abstractmethod
    def sample(self, num_samples: int, **kwargs: Any) -> Tensor:
        """Draw ``[num_samples, L]`` token ids."""

    def network_calls(self, **options: Any) -> float:
        """Network evaluations per sample of the last ``sample(**options)`` call (``last_sample_nfe``)."""
        if (nfe := getattr(self, "last_sample_nfe", None)) is None:
            raise ValueError("no sample drawn yet")
        return float(nfe)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["glauber"] = {
            "config": OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True),
            "vocab_size": self.vocab_size,
            "micro_batches_seen": self.micro_batches_seen,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "extra": self.method_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("glauber")
        if state is None:
            raise ValueError("not a glauber checkpoint (no 'glauber' section)")
        if self.model is None:
            self.build(state["vocab_size"], state["extra"].get("data_info"))
        self.micro_batches_seen = state["micro_batches_seen"]
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.load_method_state(state["extra"])

    def method_state(self) -> dict:
        """What a method keeps in checkpoints beside the weights (saved as the ``extra`` entry)."""
        return {"data_info": self.data_info_}

    def load_method_state(self, state: dict) -> None:  # noqa: B027 - optional hook
        """Restore what ``method_state`` saved."""
