"""A deterministic, resumable, rank-sharded stream of training indices.

Global draw ``g`` is item ``perm_e[g % N]`` with epoch ``e = g // N`` and ``perm_e = randperm(N)``
seeded by ``seed + e`` (or ``arange(N)`` without shuffling). Rank ``r`` of ``W`` takes the draws
``g = n * W + r`` for ``n = 0, 1, ...``, so ranks see disjoint items that together cover each epoch,
and a run resumed at ``n = start`` continues exactly where it stopped. The stream never depends on
how the training loop iterates it, only on ``(num_items, seed, rank, world_size)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

CHUNK = 1 << 16


class ResumableSampler(Sampler[int]):
    """Indices for rank ``rank``: ``num_samples`` draws in all (``__len__``), starting at draw ``start``.

    Only the current epoch's permutation is kept, so ``N`` in the tens of millions costs one
    ``randperm`` per epoch.
    """

    def __init__(
        self,
        num_items: int,
        num_samples: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        start: int = 0,
    ):
        if num_items < 1:
            raise ValueError(f"ResumableSampler needs at least one item (got num_items={num_items})")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0 (got {num_samples})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_items = num_items
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start = 0
        self.set_start(start)
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def set_start(self, k: int) -> None:
        """Skip the first ``k`` of this rank's draws (they were consumed before a resume)."""
        if k < 0:
            raise ValueError(f"start must be >= 0 (got {k})")
        self.start = int(k)

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of items in ``epoch`` (cached for the latest epoch asked for)."""
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.num_items, generator=g)
            else:
                self._perm = torch.arange(self.num_items)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[int]:
        N, W = self.num_items, self.world_size
        n = self.start
        while n < self.num_samples:
            g = n * W + self.rank
            epoch, pos = divmod(g, N)
            # this rank's draws left in this epoch: positions pos, pos + W, ... below N, capped by num_samples
            count = min((N - pos + W - 1) // W, self.num_samples - n)
            take = min(count, CHUNK)  # converted to Python ints a chunk at a time, not a whole epoch
            yield from self.permutation(epoch)[pos : pos + take * W : W].tolist()
            n += take
