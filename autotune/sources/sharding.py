"""``shard_iterable``: make any stream safe for workers and ranks.

A ``torch.utils.data.IterableDataset`` runs its ``__iter__`` once in every worker process
(and on every rank): unless it splits its items by ``get_worker_info()`` (and the rank),
each worker yields the whole stream and an epoch repeats every item once per worker.
``ShardedIterable`` keeps item ``i`` of the wrapped stream only in shard
``i % shards`` (``shards = world_size x num_workers``, this shard
``rank x num_workers + worker id``), so together the shards yield each item exactly once.

Every shard still reads the whole stream and skips the others' items: right for any
stream, cheap when making an item is cheap. Where reading is the cost (files, a network),
split the sources (files, URLs) by worker and rank inside ``__iter__`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from .._check import is_stream
from ..errors import InvalidConfigError
from ..system.distributed import current_ranks


def shard_iterable(dataset: Any) -> ShardedIterable:
    """``dataset``'s items split across DataLoader workers and torch.distributed ranks.

    Args:
        dataset: a ``torch.utils.data.IterableDataset`` that does not shard itself.

    Example::

        stream = autotune.shard_iterable(MyStream(urls))
        loader = factory.create_training_loader(stream, batch_size=64)  # any worker count
    """
    if isinstance(dataset, ShardedIterable):
        return dataset
    if not is_stream(dataset):
        raise InvalidConfigError(
            f"shard_iterable needs a torch.utils.data.IterableDataset, got "
            f"{type(dataset).__name__}: a map-style dataset is split by its sampler instead")
    return ShardedIterable(dataset)


class ShardedIterable(IterableDataset):
    """One shard of ``dataset`` per (rank, worker); see the module docstring.

    The rank is read when needed: in the main process, and in forked workers from what
    they inherited; a pickled copy (spawned workers) keeps the rank of the process that
    pickled it.
    ``len()`` is this rank's share of the wrapped stream's length, when it has one.
    ``autotune.shard_iterable(dataset)`` builds one, and returns a wrapped stream as it is.

    Args:
        dataset: the stream to split, an ``IterableDataset`` that does not shard itself;
            every shard iterates it in full and keeps item ``i`` when ``i % shards`` is its
            index.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self._ranks: tuple[int, int] | None = None  # (rank, world size) once pickled

    def shard(self) -> tuple[int, int]:
        """(this shard's index, the number of shards) for the calling process."""
        rank, world = self._rank_and_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[Any]:
        mine, shards = self.shard()
        for i, item in enumerate(self.dataset):
            if i % shards == mine:
                yield item

    def __len__(self) -> int:
        rank, world = self._rank_and_world()
        return (len(self.dataset) - rank + world - 1) // world

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ranks"] = self._rank_and_world()  # spawned workers have no process group
        return state

    def _rank_and_world(self) -> tuple[int, int]:
        if self._ranks is not None:
            return self._ranks
        ranks = current_ranks()
        return ranks.rank, ranks.world_size

    def __repr__(self) -> str:
        return f"shard_iterable({self.dataset!r})"
