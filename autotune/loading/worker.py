"""What runs inside worker processes besides start-up (``autotune._worker_init``): how busy
they are, what collating costs, and errors that name the sample that raised them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .seeding import TaggedBatch, seeded_items


class BusyMeter:
    """Seconds each worker spent making samples, in shared memory the main process reads:
    how busy the workers are, for the re-tuner (``tuning.adapt``). Pickles to spawned workers
    (a shared tensor); each worker writes only its own slot."""

    def __init__(self, workers: int) -> None:
        self.seconds = torch.zeros(max(1, workers), dtype=torch.float64).share_memory_()

    def add(self, seconds: float) -> None:
        info = get_worker_info()
        self.seconds[info.id if info is not None else 0] += seconds

    def total(self) -> float:
        return float(self.seconds.sum())


class TimedCollate:
    """A ``collate_fn`` that adds its time to a ``BusyMeter``: collating (tokenising,
    padding) is the workers' work too."""

    def __init__(self, collate_fn: Callable[[Any], Any], meter: BusyMeter) -> None:
        self.collate_fn, self.meter = collate_fn, meter

    def __call__(self, batch: Any) -> Any:
        start = time.perf_counter()
        result = self.collate_fn(batch)
        self.meter.add(time.perf_counter() - start)
        return result


class NamedErrors:
    """Wraps a map-style dataset so an exception from ``dataset[i]`` says which ``i``.

    The exception keeps its type and message; a note "autotune: raised by dataset[i]" is
    added, which torch carries over from worker processes in its traceback.
    Attributes not defined here come from the wrapped dataset. With a ``BusyMeter``, the
    time spent inside the dataset is added to it.
    """

    def __init__(self, dataset: Any, meter: BusyMeter | None = None, *,
                 seed: int | None = None) -> None:
        self.dataset = dataset
        self.meter = meter
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        start = time.perf_counter()
        item = self._get(index)
        if self.meter is not None:
            self.meter.add(time.perf_counter() - start)
        return item

    def _get(self, index: Any) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:
            exc.add_note(f"autotune: raised by dataset[{index!r}] ({type(self.dataset).__name__})")
            raise

    def __getitems__(self, indices: Sequence[Any]) -> list[Any]:
        """A batch at once where the dataset can (``Subset``, Hugging Face), else one by one;
        defined here so that such a batch is named and timed too (once per batch). With a
        seed, one by one, each sample from its own seed (``loading.seeding``)."""
        start = time.perf_counter()
        getitems = getattr(self.dataset, "__getitems__", None)
        if self.seed is not None and isinstance(indices, TaggedBatch):
            items = seeded_items(self._get, indices, self.seed, indices.epoch)
        elif not getitems:
            items = [self._get(index) for index in indices]
        else:
            try:
                items = getitems(indices)
            except Exception as exc:
                exc.add_note(f"autotune: raised by dataset.__getitems__({list(indices)!r}) "
                             f"({type(self.dataset).__name__})")
                raise
        if self.meter is not None:
            self.meter.add(time.perf_counter() - start)
        return items

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "meter", "seed"):  # not yet set (during unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class NamedStreamErrors(IterableDataset):
    """``NamedErrors`` for an ``IterableDataset``: an exception while iterating says which
    item it was making (counted per worker) and in which worker. Keeps the length, if any."""

    def __init__(self, dataset: Any, meter: BusyMeter | None = None) -> None:
        self.dataset = dataset
        self.meter = meter

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        where = f" in worker {info.id}" if info is not None else ""
        count = 0
        iterator = iter(self.dataset)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                exc.add_note(f"autotune: raised making item {count}{where} of the stream "
                             f"({type(self.dataset).__name__})")
                raise
            if self.meter is not None:
                self.meter.add(time.perf_counter() - start)
            count += 1
            yield item

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "meter"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
