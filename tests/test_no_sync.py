"""No host-device synchronisation in the GGM training step (``compute_loss`` in training mode: the
training example, the network, the loss) nor in a sampler step (one iteration of ``_reverse_steps``,
the categorical draw included).

On CPU nothing synchronises, so the test counts what would: every Python-level read of a tensor
value on the host (``item``, ``bool``, ``int``, ``float``, ``index``, ``tolist``, ``numpy``, ``cpu``,
``nonzero``) through counting wrappers, and, below Python, every aten op that reads a value back
(``_local_scalar_dense``, ``is_nonzero``, ``equal``) or whose output shape depends on the data
(``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing and assignment, ...) through a
dispatch mode that sees the ops called inside PyTorch's own functions too. Each call is measured
after a warm-up call (which may fill the device caches). With CUDA the same calls also run under
``torch.cuda.set_sync_debug_mode("error")``, which refuses every real synchronisation.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glauber.config import load_config
from glauber.core.sampler import _reverse_steps
from glauber.core.schedule import GlauberSchedule, trusted_inputs
from glauber.methods.ggm import GGMModule

TINY = Path(__file__).resolve().parents[1] / "experiments" / "tiny.yaml"
V = 6
HOST_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "cpu", "nonzero")
aten = torch.ops.aten
VALUE_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
DATA_SHAPED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.bincount.default,
}
MASK_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _where() -> str:
    """The innermost glauber frame of the current stack, for the failure message."""
    frames = [f for f in traceback.extract_stack()[:-2] if "glauber" in f.filename and "test_no_sync" not in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"


class _OpWatch(TorchDispatchMode):
    """Records the aten ops that synchronise on an accelerator."""

    def __init__(self, hits: list[str]) -> None:
        super().__init__()
        self.hits = hits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VALUE_READS or func in DATA_SHAPED:
            self.hits.append(f"aten {func} at {_where()}")
        elif func in MASK_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.hits.append(f"aten {func} with a boolean mask at {_where()}")
        elif func is aten.multinomial.default:
            n = args[1] if len(args) > 1 else kwargs["num_samples"]
            replacement = args[2] if len(args) > 2 else kwargs.get("replacement", False)
            if n == 1 or not replacement:  # checks its probabilities on the host
                self.hits.append(f"aten {func} (host check) at {_where()}")
        return func(*args, **kwargs)


@contextmanager
def count_syncs() -> Iterator[list[str]]:
    """Every would-be synchronisation inside the block, as a list of descriptions."""
    hits: list[str] = []
    saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
    saved_fn = torch.nonzero

    def counting(name: str, original):
        def wrapper(self, *args, **kwargs):
            hits.append(f"Tensor.{name} at {_where()}")
            return original(self, *args, **kwargs)

        return wrapper

    def counting_nonzero(*args, **kwargs):
        hits.append(f"torch.nonzero at {_where()}")
        return saved_fn(*args, **kwargs)

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        torch.nonzero = counting_nonzero
        with _OpWatch(hits):
            yield hits
    finally:
        torch.nonzero = saved_fn
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


def ggm(*overrides: str, device: str = "cpu") -> GGMModule:
    """A tiny.yaml GGM module with ``V`` tokens (unigram counts given when its noise law needs them)."""
    module = GGMModule(load_config(TINY, list(overrides)))
    module.build(V, {"token_counts": [5, 1, 2, 3, 1, 4]})
    return module.to(device)


def batch_of(module: GGMModule, rows: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (rows, module.cfg.data.seq_len), generator=g).to(module.device)


def generator(module: GGMModule, seed: int) -> torch.Generator:
    return torch.Generator(device=module.device).manual_seed(seed)


def training_step(module: GGMModule, batch: torch.Tensor, seed: int) -> torch.Tensor:
    return module.compute_loss(batch, generator(module, seed))[0]


def random_m(module: GGMModule, seed: int) -> int:
    """The hidden-set size a training batch with this seed uses (read from the network's input)."""
    seen = []
    hook = module.model.register_forward_hook(lambda _mod, args, _out: seen.append(args[1].shape[1]))
    try:
        training_step(module, batch_of(module, rows=1), seed)
    finally:
        hook.remove()
    return seen[0]


def sampler_step(module: GGMModule, x: torch.Tensor, t: int, clamp=None, denoiser=None, steps: int = 1, **draw) -> None:
    sched = module.schedule()
    f = denoiser or module.denoiser(sched, clamp)
    draw = {"hidden_id": V, "temperature": 1.0, "top_p": 1.0, "float64": True, **draw}
    with torch.no_grad():
        _reverse_steps(
            f, sched, module.law_on(x.device), x, clamp, range(t, t - steps, -1), generator(module, t), False, "", **draw
        )


TRAINING_CONFIGS = [
    [],  # tiny.yaml: weighted loss on a normalised classifier, m drawn from {1, 2, 4}
    ["process.loss=analytic", "process.step_weighting=inverse_noise"],
    ["process.loss=single_sample", "model.condition_on_alpha=true"],
    ["process.loss=time_weighted", "process.noise=unigram"],
    ["process.loss=balanced", "process.positions_per_step=[]"],
    ["process.loss=cross_entropy", "schedule.order=random"],
]


@pytest.mark.parametrize("overrides", TRAINING_CONFIGS, ids=lambda o: ",".join(o) or "tiny")
def test_training_step_makes_no_host_sync(overrides):
    module = ggm(*overrides).train()
    batch = batch_of(module)
    seeds = range(6)  # several batches: every hidden-set size m of tiny.yaml is drawn
    assert len({random_m(module, s) for s in seeds}) == len(module.train_ms)
    for seed in seeds:  # warm-up: the schedules of each m, device caches, the one check of the first batch
        training_step(module, batch, seed)
    for seed in seeds:
        with count_syncs() as hits:
            loss = training_step(module, batch, seed)
        assert hits == [], "\n".join(hits)
    loss.backward()  # a real loss


@pytest.mark.parametrize("condition_on_alpha", [False, True])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_step_makes_no_host_sync(condition_on_alpha, top_p):
    module = ggm(f"model.condition_on_alpha={str(condition_on_alpha).lower()}").eval()
    T = module.schedule().num_steps
    x = module.law_on(module.device).sample((3, module.cfg.data.seq_len), generator(module, 0))
    sampler_step(module, x, T - 1, top_p=top_p)  # warm-up
    for t in (T - 2, T // 2, 0):
        with count_syncs() as hits:
            sampler_step(module, x, t, top_p=top_p)
        assert hits == [], "\n".join(hits)


def test_sampler_step_with_a_mask_denoiser_makes_no_host_sync():
    """Denoisers that take a hidden mask (the protocol's default): every row hides m positions."""
    module = ggm().eval()
    sched = module.schedule()
    B = 3

    def denoiser(x_in, hidden, t):
        assert hidden.dtype == torch.bool
        return torch.zeros(B * sched.m, V)  # a static shape: the network's would be data-free too

    x = module.law_on(module.device).sample((B, module.cfg.data.seq_len), generator(module, 0))
    sampler_step(module, x, 3, denoiser=denoiser)
    with count_syncs() as hits:
        sampler_step(module, x, 2, denoiser=denoiser)
    assert hits == [], "\n".join(hits)


def test_unconditional_sampling_makes_no_host_sync_at_all():
    """From prod u (no x_init to check) the whole run, corrector sweeps included, reads nothing back."""
    module = ggm().eval()
    module.sample(2, generator=torch.Generator().manual_seed(0), corrector_sweeps=1)
    with count_syncs() as hits:
        module.sample(2, generator=torch.Generator().manual_seed(1), corrector_sweeps=1)
    assert hits == [], "\n".join(hits)


def test_infilling_syncs_once_per_sweep_not_per_step():
    """With a clamp the wholly-clamped steps are found once per call; the steps themselves are free."""
    module = ggm().eval()
    L = module.cfg.data.seq_len
    clamp = torch.zeros(2, L, dtype=torch.bool)
    clamp[:, :5] = True
    x = module.law_on(module.device).sample((2, L), generator(module, 0))
    T = module.schedule().num_steps
    sampler_step(module, x, T - 1, clamp=clamp)
    counts = []
    for steps in (1, 4):
        with count_syncs() as hits:
            sampler_step(module, x, T - 2, clamp=clamp, steps=steps)
        counts.append(len(hits))
    assert counts[0] == counts[1] <= 2, counts  # the skip table's transfer, whatever the number of steps


def test_the_counter_catches_syncs():
    """The detector itself: each of these reads a device value back (or has a data-dependent shape)."""
    x = torch.arange(6)
    mask = x > 2
    p = torch.tensor([0.5, 0.5])
    for sync in (
        lambda: int(x.sum()),
        lambda: bool(mask.any()),
        lambda: x.max().item(),
        lambda: float(x.double().mean()),
        lambda: x.tolist(),
        lambda: x[mask],
        lambda: x.masked_fill(mask, 0)[mask.nonzero(as_tuple=True)],
        lambda: torch.nonzero(mask),
        lambda: x.clone().__setitem__(mask, 0),
        lambda: torch.multinomial(p, 1),
        lambda: x.numpy(),
        lambda: torch.equal(x, x),
        lambda: [0, 1, 2][x[1]],
    ):
        with count_syncs() as hits:
            sync()
        assert hits, "missed a synchronisation"
    sched = GlauberSchedule(8, 2, 2)
    with count_syncs() as hits:  # and these are free
        y = x.masked_fill(mask, 0).scatter(0, x[:2], x[2:4]).gather(0, x.flip(0))
        torch.searchsorted(p.cumsum(0), torch.rand(3, dtype=p.dtype))
        with trusted_inputs():
            sched.hidden_set(y[:1] % 4)
    assert hits == []
    with count_syncs() as hits:  # a user's call checks its steps: one read of their extremes
        sched.hidden_set(y[:1] % 4)
    assert len([h for h in hits if h.startswith("Tensor.")]) == 1


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextmanager
def cuda_sync_errors() -> Iterator[None]:
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


@CUDA
@pytest.mark.parametrize("overrides", TRAINING_CONFIGS, ids=lambda o: ",".join(o) or "tiny")
def test_training_step_makes_no_cuda_sync(overrides):
    module = ggm(*overrides, device="cuda").train()
    batch = batch_of(module)
    for seed in range(6):
        training_step(module, batch, seed)
    with cuda_sync_errors():
        for seed in range(6):
            training_step(module, batch, seed)


@CUDA
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_step_makes_no_cuda_sync(top_p):
    module = ggm("model.condition_on_alpha=true", device="cuda").eval()
    T = module.schedule().num_steps
    x = module.law_on(module.device).sample((3, module.cfg.data.seq_len), generator(module, 0))
    sampler_step(module, x, T - 1, top_p=top_p)
    with cuda_sync_errors():
        sampler_step(module, x, T - 2, top_p=top_p)
        sampler_step(module, x, 0, top_p=top_p)
