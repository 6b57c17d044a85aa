"""Peak memory of a configured training step, measured without the memory: a dry run on fake tensors.

``estimate_training_memory(cfg)`` builds the configured LightningModule, moves it onto fake tensors
(``FakeTensorMode``: shapes, dtypes and storages, no data and no arithmetic) and runs what one device runs in
an optimizer step of ``glauber train``: the loss of a micro-batch under the configured precision, backward,
gradient clipping, AdamW and the EMA update, then a second micro-batch with the gradients still held (as under
gradient accumulation). ``PeakMemory``, a dispatch mode, adds up the bytes of every live tensor storage after
every aten op; its maximum is the estimate. A 400M-parameter step takes seconds on a laptop CPU.

What it counts: parameters, gradients, AdamW's two moments, the EMA copy, every activation autograd keeps,
and the transient tensors of each op. What it does not (the error bars, see docs/BENCHMARKS.md): the CUDA
caching allocator's rounding and fragmentation (``memory_reserved`` is typically 5-20% above
``max_memory_allocated``), kernel workspaces (cuBLAS, ~tens of MiB), the CUDA context (~0.5 GiB, outside
PyTorch's counters), DDP's gradient buckets (one more fp32 copy of the gradients, reported apart), and
``torch.compile``, which fuses elementwise ops and usually keeps fewer activations (the run is eager).
Attention is counted as the fused flash kernel a GPU runs (it keeps q, k, v, the output and a float32
log-sum-exp per row and head), since the CPU kernels materialise the L x L matrix the GPU never stores.
Autocast runs as CPU autocast, whose op lists match CUDA's for the ops of this network (linear layers in
16 bits; the LayerNorms compute in float32 by construction).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from glauber.config import batch_layout
from glauber.methods import method_class

GiB = 2**30
# Vocabulary sizes by tokenizer when the data are not at hand: GPT-2's BPE, the ImageNet VQGAN f16-16384.
DEFAULT_VOCAB = {"gpt2": 50257, "image": 16384}
PRECISIONS = {  # Lightning's precision flag -> (autocast dtype or None, parameter dtype)
    "32-true": (None, torch.float32),
    "32": (None, torch.float32),
    "bf16-mixed": (torch.bfloat16, torch.float32),
    "16-mixed": (torch.float16, torch.float32),
    "bf16-true": (None, torch.bfloat16),
}


class PeakMemory(TorchDispatchMode):
    """Bytes held by live tensor storages (each storage once, however many views), updated after every aten
    op: ``current`` and ``peak``. Works on real and on fake tensors. Tensors made before the mode was entered
    are counted once passed to ``track``."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: Any) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self._update()

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ref = StorageWeakRef(storage)
        old = self._live.get(ref.cdata)
        if old is not None and not old[0].expired():
            return
        if old is not None:  # an expired storage whose address was reused
            self.current -= old[1]
        self._live[ref.cdata] = (ref, storage.nbytes())
        self.current += storage.nbytes()

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self.current -= nbytes

    def _update(self) -> None:
        if self.current > self.peak:  # a new peak only counts once the freed storages are taken off
            self._sweep()
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        self._update()
        return out


class _FlashLikeAttention(torch.autograd.Function):
    """The memory of a fused (flash) attention kernel: keeps q, k, v, the output and a float32 log-sum-exp of
    shape ``[B, H, L]``; backward makes dq, dk, dv. Values are meaningless (fake tensors only)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def flash_attention_memory() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is the fused kernel's memory model (fake runs only)."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None:
            raise ValueError("the memory model of attention has no attn_mask")
        return _FlashLikeAttention.apply(q, k, v)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class MemoryEstimate:
    """One device's peak in a training step (GiB), split into what persists and the activations on top."""

    name: str
    params_M: float
    vocab: int
    seq_len: int
    micro_batch: int
    accumulate: int
    precision: str
    weights_GiB: float
    grads_GiB: float
    optimizer_GiB: float
    ema_GiB: float
    activations_GiB: float  # peak minus the persistent state: saved activations and transients
    peak_GiB: float
    ddp_buckets_GiB: float  # DDP's gradient buckets (one more copy of the gradients), not in peak_GiB
    sampling_peak_GiB: float  # a no-grad network call at the micro-batch, EMA weights included

    def row(self) -> dict[str, Any]:
        return {k: _round(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _round(v: float) -> float:
    """Two decimals, or three significant digits below 1 (a tiny config's GiB)."""
    return round(v, 2) if abs(v) >= 1 else float(f"{v:.3g}")


def default_vocab(cfg: DictConfig) -> int:
    if cfg.get("modality", "text") == "image":
        return DEFAULT_VOCAB["image"]
    tok = cfg.data.get("tokenizer")
    if tok in DEFAULT_VOCAB:
        return DEFAULT_VOCAB[tok]
    raise ValueError(f"no default vocabulary size for tokenizer {tok!r}: give one (glauber bench --vocab V)")


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_training_memory(cfg: DictConfig, name: str = "", vocab: int | None = None) -> MemoryEstimate:
    """The peak memory of one device's training step for ``cfg`` at its micro-batch and precision (one
    device: per-device batch ``min(global, micro)``, gradients kept between micro-batches), eager."""
    cfg = OmegaConf.merge(cfg, {"train": {"compile": False}})
    precision = str(cfg.train.precision)
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision={precision!r}: the memory estimate knows {sorted(PRECISIONS)}")
    autocast_dtype, param_dtype = PRECISIONS[precision]
    V = vocab or default_vocab(cfg)
    B, accumulate = batch_layout(cfg.train.global_batch_size, 1, cfg.train.micro_batch_size)
    L = cfg.data.seq_len
    # Built for real on the CPU once (a few seconds, the weights' RAM for a moment), then moved to the meta device.
    module = method_class(cfg.method)(OmegaConf.to_container(cfg, resolve=True), vocab_size=V)
    cpu = torch.device("cpu")
    for m in getattr(module, "train_ms", []):  # fill the method's host-side caches with real tensors
        module.schedule(m)
        module.train_step_probs(m, cpu)
    if hasattr(module, "law_on"):
        module.law_on(cpu)
    module.to("meta")
    ema = module.ema
    if ema is not None:
        ema.shadow = [s.to("meta") for s in ema.shadow]
    params_M = sum(p.numel() for p in module.model.parameters()) / 1e6
    batch = torch.randint(0, V, (B, L))
    tracker = PeakMemory()
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=True), tracker, flash_attention_memory():
            module.to_empty(device=cpu)
            if param_dtype != torch.float32:
                module.model.to(param_dtype)
            if ema is not None:
                ema.shadow = [torch.empty_like(s, device=cpu) for s in ema.shadow]
            params = [p for p in module.model.parameters() if p.requires_grad]
            opt = module.configure_optimizers()["optimizer"]
            module._batch_checked = True  # the dry run has no token values to check
            module.train()

            def micro_batch(step: int) -> None:
                gen = torch.Generator().manual_seed(step)
                with autocast:
                    loss, _ = module.compute_loss(batch, gen)
                loss.backward()

            micro_batch(0)
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            opt.step()  # AdamW's moments exist from here on
            if ema is not None:
                ema.update(module.model)
            tracker.reset_peak()
            micro_batch(1)  # the steady state: gradients held, optimizer state and EMA present
            train_peak = tracker.peak
            weights, grads = _bytes(params), _bytes(p.grad for p in params)
            moments = _bytes(t for s in opt.state.values() for t in s.values() if t.numel() > 1)
            ema_bytes = _bytes(ema.shadow) if ema is not None else 0
            persistent = weights + grads + moments + ema_bytes
            for p in params:
                p.grad = None
            opt.state.clear()
            del opt
            module.eval()
            tracker.reset_peak()
            with torch.no_grad(), autocast:
                sched = module.schedule() if hasattr(module, "schedule") else None
                m = sched.m if sched is not None else L
                pos = torch.arange(m).expand(B, m)
                module.model(batch, pos, torch.full((B,), 0.5), None)
            sampling_peak = tracker.peak
    return MemoryEstimate(
        name=name or cfg.name,
        params_M=round(params_M, 1),
        vocab=V,
        seq_len=L,
        micro_batch=B,
        accumulate=accumulate,
        precision=precision,
        weights_GiB=weights / GiB,
        grads_GiB=grads / GiB,
        optimizer_GiB=moments / GiB,
        ema_GiB=ema_bytes / GiB,
        activations_GiB=(train_peak - persistent) / GiB,
        peak_GiB=train_peak / GiB,
        ddp_buckets_GiB=grads / GiB,
        sampling_peak_GiB=sampling_peak / GiB,
    )
