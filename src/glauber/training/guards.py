"""What stops a run without losing work: a non-finite loss or weights, SIGINT/SIGTERM and SLURM's warning signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def say(message: str) -> None:
    print(f"[glauber.train] {message}", file=sys.stderr, flush=True)


def install_handlers(signums: Iterable[int], handler: Callable) -> dict[int, Any]:
    """Install ``handler`` for ``signums`` (main thread only: Python's rule); returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signums}


def restore_handlers(previous: dict[int, Any]) -> dict[int, Any]:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    return {}


def hpc_checkpoints(run_dir: str | Path) -> list[Path]:
    """``<run_dir>/hpc_ckpt_N.ckpt`` (Lightning's naming for SLURM checkpoints), by ``N``."""
    named = ((re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name), p) for p in Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    return [p for _, p in sorted((int(m.group(1)), p) for m, p in named if m)]


class AtStepBoundary(Callback):
    """Base of callbacks that act between optimizer steps only: ``on_step_boundary`` runs once per optimizer step,
    at the same point on every rank. A signal handler only sets a flag, which the ranks combine here (one small
    collective), so a checkpoint is never taken mid-step or mid-accumulation (where the data position and the noise
    counter are a micro-batch ahead of the weights) and a run resumed from it equals an uninterrupted one."""

    _step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._step:  # mid-accumulation (same on every rank)
            return
        self._step = trainer.global_step
        self.on_step_boundary(trainer, pl_module)

    def on_step_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError


class SlurmRequeue(AtStepBoundary):
    """SLURM's warning before the time limit (``sbatch --signal=SIGUSR1@90``): at the end of the optimizer step,
    save ``<run_dir>/hpc_ckpt_N.ckpt``, ``scontrol requeue`` and stop; the requeued job resumes from it. Replaces
    Lightning's SIGUSR1 handler (``auto_requeue=False``), which saves from inside the handler, wherever the step is."""

    def __init__(self, run_dir: str | Path, signum: int = signal.SIGUSR1) -> None:
        self.run_dir, self.signum = Path(run_dir), signum
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = install_handlers((self.signum,), self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._previous = restore_handlers(self._previous)

    def on_step_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):  # any rank signalled
            return
        self.requested = False
        existing = hpc_checkpoints(self.run_dir)
        number = int(existing[-1].stem.rsplit("_", 1)[1]) + 1 if existing else 1
        path = self.run_dir / f"hpc_ckpt_{number}.ckpt"
        trainer.save_checkpoint(path)  # every rank (a barrier inside), rank 0 writes
        ok = True
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                ok, why = done.returncode == 0, (done.stderr or done.stdout).strip()
            except (OSError, subprocess.SubprocessError) as e:
                ok, why = False, str(e)
            outcome = f"requeued job {job}, stopping" if ok else f"scontrol requeue {job} failed ({why}): training on"
            print(f"[glauber.slurm] step {trainer.global_step}: saved {path}; {outcome}", file=sys.stderr, flush=True)
        if trainer.strategy.broadcast(ok, src=0):
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # no final validation on the way out (Lightning runs one on should_stop)


class TrainingDiverged(ValueError):
    """A non-finite training loss or weights (``glauber train`` prints the message and exits 2)."""


class DivergenceGuard(Callback):
    """Raises ``TrainingDiverged`` at the first non-finite training loss (checked once per optimizer step: one host
    sync) or validation loss, and before non-finite weights reach a checkpoint, so no checkpoint holds that state."""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._finite: torch.Tensor | None = None
        self._step = -1
        self._saved_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step
        self._saved_step = trainer.global_step or None  # a resumed run's checkpoint

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            finite = torch.isfinite(loss.detach()).all()
            self._finite = finite if self._finite is None else self._finite & finite
        if trainer.global_step == self._step:  # mid-accumulation: wait for the optimizer step
            return
        step, self._step = self._step, trainer.global_step
        finite = True if self._finite is None else bool(self._finite)
        self._finite = None
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise self._diverged(f"the training loss at global step {step} is not finite")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        finite = loss is None or bool(torch.isfinite(loss).all())
        if not trainer.sanity_checking and not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise self._diverged(f"the validation loss at global step {trainer.global_step} is not finite")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        params = [p.detach() for p in pl_module.parameters() if p.is_floating_point()]
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise self._diverged(f"the weights are not finite at global step {trainer.global_step}")
        self._saved_step = trainer.global_step

    def _diverged(self, what: str) -> TrainingDiverged:
        kept = f" (the newest at global step {self._saved_step})" if self._saved_step is not None else ""
        return TrainingDiverged(
            f"training diverged: {what}. Likely cause: a learning rate too high for this model and batch "
            f"(optim.lr={self.lr:g}): start over (train.resume=never keeps this run in previous/) with a lower "
            "optim.lr, a longer optim.warmup_steps or optim.grad_clip on; else bad input data. Nothing of the "
            f"diverged state was saved; the checkpoints already written are kept{kept}."
        )


class StopOnSignal(AtStepBoundary):
    """SIGINT or SIGTERM: finish the optimizer step, save ``last.ckpt`` and stop (``train`` exits 128 + the signal's
    number); a second signal stops at once, unsaved. Installed at ``on_train_start``, after Lightning's own SIGTERM
    handler (which would end the run with exit code 0 and nothing saved)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, last_ckpt: Path) -> None:
        self.last = last_ckpt
        self.received = 0  # the signal this process got
        self.stopped_by = 0  # the signal the run stopped for (the same on every rank)
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        # os.write, not print: a handler that prints while the main thread is printing raises "reentrant call"
        os.write(
            sys.stderr.fileno(),
            f"[glauber.train] {signal.Signals(signum).name}: saving last.ckpt at the end of this optimizer step, "
            "then stopping (send it again to stop at once, without saving)\n".encode(),
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._previous = install_handlers(self.SIGNALS, self._on_signal)

    def _restore(self, *args: Any) -> None:
        self._previous = restore_handlers(self._previous)

    on_train_end = on_exception = _restore

    def on_step_boundary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        signum = self.received
        if trainer.world_size > 1:  # the signal any rank got
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device), reduce_op="max"))
        if not signum:
            return
        trainer.save_checkpoint(self.last)  # every rank (a barrier inside), rank 0 writes
        self.stopped_by = signum
        if trainer.is_global_zero:
            say(
                f"{signal.Signals(signum).name}: saved {self.last} at global step {trainer.global_step}; stopping "
                f"(exit code {128 + signum}). Run the same command to resume."
            )
        trainer.should_stop = True
        trainer.limit_val_batches = 0  # no final validation on the way out (Lightning runs one on should_stop)
