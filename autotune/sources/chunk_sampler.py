"""``ChunkShuffleSampler``: a shuffled order in which each chunk is read once.

Shuffled sample by sample, every read of a chunked file lands in a different chunk. This
sampler shuffles the order of the chunks, then the samples within each window of
``window`` consecutive chunks, so a cache of ``window`` chunks serves every read.

The randomness it trades: a batch holds samples from at most ``window`` chunks (one more
at a window's edge), and the samples of one chunk all come within one window of the epoch
instead of anywhere in it. Files sorted by label (one class per file) still give mixed
batches once a window spans chunks of several files; a larger window mixes more and needs
a larger cache. The chunk order and the shuffles change every epoch.

Ranks (``DistributedSampler`` semantics): every rank draws the same chunk order from
``seed`` and the epoch and takes a contiguous share of it, so a chunk is read on one rank
(two at a share's edge). Shares are padded with the order's first samples
(``drop_last=False``) or cut (``drop_last=True``) so that every rank gets as many samples.

Workers: given ``batch_size`` and ``num_workers``, the rank's share is split into one
stripe per worker and batch ``i`` comes from stripe ``i % num_workers``, the worker that
DataLoader sends batch ``i`` to: each worker reads only its own chunks. With
``in_order=False`` DataLoader may send a batch to a less busy worker instead, which then
reads chunks of another's stripe (2.7x slower in an autotuner trial on a JetClass-like
file; the autotuner measures it and kept batches in order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .._check import check_bool, check_int
from ..errors import InvalidConfigError
from ..policy.chunks import DEFAULT_WINDOW
from ..system.distributed import current_ranks
from .samplers import EpochDistributedSampler


class ChunkShuffleSampler(EpochDistributedSampler):
    """Sample indices of ``dataset`` in chunk-shuffled order (see the module docstring).

    Args:
        dataset: a dataset with ``chunk_ranges`` (``autotune.HDF5Dataset``).
        window: chunks whose samples are shuffled together; the cache must hold as many.
        seed: the order's seed, the same on every rank. ``None``: drawn from torch's
            global generator (``torch.manual_seed`` fixes it); 0 under several ranks.
        shuffle: ``False`` keeps file order (evaluation), still split by rank and worker.
        num_replicas, rank: the ranks (default: the process group or torchrun's variables).
        drop_last: cut the ranks' shares to the same length instead of padding them.
        batch_size, num_workers: the loader's, to give each worker its own chunks.

    Like the factory's distributed sampler, each ``iter()`` starts the next epoch;
    ``set_epoch(n)`` makes the next one ``n``.
    """

    def __init__(self, dataset: Any, *, window: int = DEFAULT_WINDOW, seed: int | None = None,
                 shuffle: bool = True, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False, batch_size: int | None = None,
                 num_workers: int = 0) -> None:
        ranges = getattr(dataset, "chunk_ranges", None)
        if ranges is None:
            raise InvalidConfigError(
                f"ChunkShuffleSampler needs a dataset with chunk_ranges (autotune.HDF5Dataset); "
                f"{type(dataset).__name__} has none: use torch's RandomSampler")
        check_int("window", window, minimum=1)
        check_bool("shuffle", shuffle)
        check_bool("drop_last", drop_last)
        check_int("num_workers", num_workers, minimum=0)
        if batch_size is not None:
            check_int("batch_size", batch_size, minimum=1)
        here = current_ranks()
        num_replicas = here.world_size if num_replicas is None else num_replicas
        rank = here.rank if rank is None else rank
        check_int("num_replicas", num_replicas, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= num_replicas:
            raise InvalidConfigError(f"rank={rank} must be < num_replicas={num_replicas}")
        if seed is None:
            seed = 0 if num_replicas > 1 else int(torch.randint(0, 2**62, ()).item())
        check_int("seed", seed, minimum=0)
        super().__init__(range(len(dataset)), num_replicas=num_replicas, rank=rank,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.window, self.batch_size, self.num_workers = window, batch_size, num_workers
        self._starts = np.fromiter((r.start for r in ranges), np.int64, len(ranges))
        self._lengths = np.fromiter((len(r) for r in ranges), np.int64, len(ranges))

    def __iter__(self) -> Iterator[int]:
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        for run in self.order(self.epoch):
            yield from run.tolist()

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[np.ndarray]:
        """This rank's indices for ``epoch``, in runs (one per batch with stripes)."""
        rng = np.random.default_rng([self.seed, epoch])
        chunks = rng.permutation(len(self._lengths)) if self.shuffle else \
            np.arange(len(self._lengths))
        lengths = self._lengths[chunks]
        ends = np.cumsum(lengths)
        index = np.repeat(self._starts[chunks] - (ends - lengths), lengths) \
            + np.arange(int(ends[-1]))
        chunk = np.repeat(np.arange(len(chunks)), lengths)
        if len(index) < self.total_size:  # padded with the order's first samples
            index, chunk = np.resize(index, self.total_size), np.resize(chunk, self.total_size)
        share = slice(self.rank * self.num_samples, (self.rank + 1) * self.num_samples)
        index, chunk = index[share], chunk[share]
        stripes = self._stripes(len(index))
        bounds = np.cumsum([0, *stripes])
        shuffled = [self._window_shuffle(index[a:b], chunk[a:b], rng)
                    for a, b in itertools.pairwise(bounds)]
        if len(shuffled) == 1:
            return shuffled
        return _interleave(shuffled, self.batch_size or 1)

    def _stripes(self, count: int) -> Sequence[int]:
        """Samples per worker's stripe: the batches DataLoader sends each worker."""
        workers, batch = self.num_workers, self.batch_size
        if workers < 2 or batch is None or count <= batch:
            return [count]
        sizes = np.full(-(-count // batch), batch)
        sizes[-1] = count - batch * (len(sizes) - 1)
        return [int(sizes[w::workers].sum()) for w in range(workers)]

    def _window_shuffle(self, index: np.ndarray, chunk: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
        if not self.shuffle or len(index) == 0:
            return index
        runs = np.concatenate([[0], np.cumsum(chunk[1:] != chunk[:-1])])
        return index[np.lexsort((rng.random(len(index)), runs // self.window))]


def _interleave(stripes: list[np.ndarray], batch: int) -> list[np.ndarray]:
    """Batch ``i`` from stripe ``i % len(stripes)``, in batch order."""
    runs: list[np.ndarray] = []
    for j in range(max(-(-len(s) // batch) for s in stripes)):
        runs.extend(s[j * batch:(j + 1) * batch] for s in stripes if j * batch < len(s))
    return runs
