"""A deterministic, resumable, rank-sharded stream of training indices, and the loaders built on it. Global draw ``g``
is item ``perm_e[g % N]``, epoch ``e = g // N``, ``perm_e = randperm(N)`` seeded by ``seed + e`` (``arange(N)`` unshuffled).
Rank ``r`` of ``W`` takes draws ``g = n * W + r``: ranks see disjoint items covering each epoch, and a run resumed at
``n = start`` continues exactly where it stopped, whatever the training loop does with the stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

CHUNK = 1 << 16


class ResumableSampler(Sampler[int]):
    """Indices for rank ``rank``: ``num_samples`` draws in all from draw ``start`` (keeping one epoch's permutation)."""

    def __init__(
        self, num_items: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1, shuffle=True, start: int = 0
    ):
        if num_items < 1:
            raise ValueError(f"ResumableSampler needs at least one item (got num_items={num_items})")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (got {num_samples})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_items, self.num_samples, self.seed = num_items, num_samples, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.set_start(start)
        self._perm_epoch, self._perm = -1, None

    def set_start(self, k: int) -> None:
        if k < 0:
            raise ValueError(f"start must be >= 0 (got {k})")
        self.start = int(k)

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            if self.shuffle:
                self._perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                self._perm = torch.arange(self.num_items)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[int]:
        N, W = self.num_items, self.world_size
        n = self.start
        while n < self.num_samples:
            epoch, pos = divmod(n * W + self.rank, N)
            # this rank's draws left in this epoch (pos, pos + W, ... below N), as Python ints a chunk at a time
            take = min((N - pos + W - 1) // W, self.num_samples - n, CHUNK)
            yield from self.permutation(epoch)[pos : pos + take * W : W].tolist()
            n += take


def rank_world(trainer: Any) -> tuple[int, int]:
    """(global rank, world size): from the trainer when attached, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedLoaders:
    """Train and validation loaders of a DataModule's ``train_set``/``val_set``, sharded over DDP ranks and resumable
    mid-run: training draws come from ``ResumableSampler``; rank r validates rows r, r + W, ... (equal counts per rank, at
    most W - 1 left out), so the Trainer runs with ``use_distributed_sampler=False``."""

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        rank, world = rank_world(self.trainer)
        n = len(self.train_set)
        num_samples = self.max_train_samples if self.max_train_samples and self.max_train_samples > 0 else n // world
        self._sampler = ResumableSampler(n, num_samples, self.cfg.seed, rank, world, shuffle=True, start=self._consumed)
        return self._loader(self.train_set, self.batch_size, self._sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_set is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        rank, world = rank_world(self.trainer)
        per_rank = len(self.val_set) // world
        return self._loader(self.val_set, self.val_batch_size, range(rank, per_rank * world, world), drop_last=False)

    def _loader(self, ds: Dataset, batch_size: int, sampler: Any, drop_last: bool) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def set_consumed(self, k: int) -> None:
        """This rank has consumed ``k`` training sequences: the stream (re)starts at draw ``k``."""
        if k < 0:
            raise ValueError(f"consumed sample count must be >= 0 (got {k})")
        self._consumed = int(k)
        if self._sampler is not None:
            self._sampler.set_start(self._consumed)

    @property
    def consumed(self) -> int:
        return self._consumed

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # called once per batch the training loop actually takes, so the count stays exact
        if self.trainer is not None and self.trainer.training:
            self._consumed += len(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        state = {"consumed_train_samples": self._consumed, "world_size": rank_world(self.trainer)[1]}
        if hasattr(self, "data_fingerprint"):
            state["data"] = self.data_fingerprint()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the train stream (with another world size, at the same global position); refuse a
        checkpoint whose token ids mean something else."""
        saved = state_dict.get("data")
        if saved is not None and hasattr(self, "data_fingerprint"):
            current = self.data_fingerprint()
            if saved != current:
                raise ValueError(data_mismatch_message(saved, current, getattr(self.cfg, "source", "?")))
        world = rank_world(self.trainer)[1]
        self.set_consumed(state_dict["consumed_train_samples"] * state_dict.get("world_size", world) // world)


def data_mismatch_message(saved: dict[str, Any], current: dict[str, Any], source: str) -> str:
    what = []
    if "chars" in saved and "chars" in current:
        lost = sorted(set(saved["chars"]) - set(current["chars"]))
        new = sorted(set(current["chars"]) - set(saved["chars"]))
        what.append(
            f"its character vocabulary ({len(saved['chars'])} characters) is not this corpus's "
            f"({len(current['chars'])} characters"
            + (f"; only in the checkpoint: {''.join(lost)!r}" if lost else "")
            + (f"; only in this corpus: {''.join(new)!r}" if new else "")
            + ("; same characters, other order" if not lost and not new else "")
            + ")"
        )
    for key in sorted(set(saved) | set(current)):
        if key != "chars" and saved.get(key) != current.get(key):
            a, b = saved.get(key), current.get(key)
            a, b = (a[:12], b[:12]) if isinstance(a, str) and isinstance(b, str) and len(a) > 16 else (a, b)
            what.append(f"{key} {a!r} -> {b!r}")
    return (
        f"the checkpoint was trained on other data than data.source={source!r} gives: {'; '.join(what)}. Its token "
        "ids would silently mean other tokens. Resume on the original corpus (and tokenizer), or start a new run "
        "(train.resume=never keeps the old one in previous/, or use a new train.run_dir)"
    )
