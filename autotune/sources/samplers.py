"""Samplers the factory uses when a process is one rank of several (torchrun, DDP).

- ``EpochDistributedSampler``: torch's ``DistributedSampler`` (each rank a disjoint share,
  padded so every rank gets as many) that moves to the next epoch by itself each time an
  epoch starts. With torch's, a user who forgets ``set_epoch`` trains every epoch in the
  same order. A ``set_epoch(n)`` call still wins: the next epoch is ``n``. Its length
  follows the dataset's (torch's is fixed when it is made). With one replica it is the
  seeded factory's order for a single process.
- ``ShardSampler``: rank r gets samples r, r + world, r + 2 x world, ... in order, with no
  padding, so evaluation counts every sample exactly once (ranks may get one sample more
  or less than each other; torch's sampler pads with duplicates instead). A
  ``DistributedSampler`` subclass, so that Lightning keeps it rather than sharding it again.
  ``contiguous=True`` gives rank r one run of consecutive samples instead, for chunked
  data: strided, every rank would decompress every chunk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DistributedSampler

from .._check import check_int


class EpochDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose every ``iter()`` is a new epoch (0, 1, 2, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_epoch = self.epoch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        self._fit_length()
        return super().__iter__()

    def __len__(self) -> int:
        self._fit_length()
        return self.num_samples

    def _fit_length(self) -> None:
        """The share of the dataset as long as it is now (torch's counts it once, at
        ``__init__``: a dataset that grew would be cut, one that shrank padded)."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.drop_last and size % self.num_replicas:
            self.num_samples = math.ceil((size - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas


class ShardSampler(DistributedSampler):
    """This rank's indices of ``range(size)`` in order, without padding: every
    ``world_size``-th, or with ``contiguous`` one run of consecutive ones.

    A ``DistributedSampler`` so that what adds one to every loader lacking it (Lightning's
    ``use_distributed_sampler``) keeps this one instead of sharding the shard again.
    """

    def __init__(self, size: int, *, rank: int, world_size: int,
                 contiguous: bool = False) -> None:
        check_int("size", size, minimum=0)
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ValueError(f"rank={rank} must be < world_size={world_size}")
        super().__init__(range(size),  # type: ignore[arg-type]  # a range is all it reads
                         num_replicas=world_size, rank=rank, shuffle=False)
        self.size, self.world_size = size, world_size
        if contiguous:
            self._indices = range(size * rank // world_size, size * (rank + 1) // world_size)
        else:
            self._indices = range(rank, size, world_size)
        self.num_samples, self.total_size = len(self._indices), size

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)
