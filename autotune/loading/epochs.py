"""Epochs without a stop: one torch iterator runs on across epoch boundaries.

torch starts fetching an epoch's batches only when ``iter(loader)`` is called: at every
boundary the workers idle, then each needs a whole batch before the first one arrives.
Here the index stream that torch's iterator reads runs epoch after epoch (each ``iter()`` of
the batch sampler is the next epoch, as the factory's samplers already do), so the workers
make the next epoch's first batches while the consumer takes this epoch's last ones. The
consumer still sees epochs: each ``iter(loader)`` yields exactly one epoch's batches.

- Every epoch's samples once: an epoch ends where its sampler iterator ended, counted as
  the indices are drawn, and batches arrive in the order drawn (``in_order=True``).
- Each epoch its own order, never a stale one: the epoch each one was drawn with is kept;
  a ``set_epoch(n)`` that disagrees with the epoch drawn ahead discards what was drawn
  (torch's own reset of persistent workers) and draws again.
- ``break`` out of an epoch: the next ``iter()`` starts afresh, as torch's does; the epochs
  drawn ahead and not started are given back to the sampler.
- Only samplers whose next epoch is known are drawn ahead (``why_not_ahead``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import (BatchSampler, DistributedSampler, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

# Samplers whose every iter() is a fresh, complete epoch (DistributedSampler: of its epoch).
_KNOWN = (DistributedSampler, RandomSampler, SequentialSampler, SubsetRandomSampler,
          WeightedRandomSampler)


def order_of(loader: Any) -> Any:
    """The sampler that decides the loader's order (inside its batch sampler)."""
    batches = loader.batch_sampler
    return batches.sampler if isinstance(batches, BatchSampler) else (batches or loader.sampler)


def why_not_ahead(loader: Any) -> str | None:
    """Why this loader's next epoch cannot be drawn ahead (None: it can)."""
    batches = loader.batch_sampler
    if batches is None:
        return "off: batches are not made by a batch sampler (batch_size=None)"
    if type(batches) is not BatchSampler:
        return (f"off: the batch sampler {type(batches).__name__} may not start a new epoch "
                "at every iter()")
    if not isinstance(order_of(loader), _KNOWN) and not _advances_itself(order_of(loader)):
        return (f"off: the sampler {type(order_of(loader)).__name__} may not start a new "
                "epoch at every iter()")
    return None


def _advances_itself(sampler: Any) -> bool:
    """The factory's samplers: each ``iter()`` starts epoch ``_next_epoch``."""
    return hasattr(sampler, "_next_epoch") and hasattr(sampler, "epoch")


def _epoch_state(sampler: Any) -> tuple[Any, Any]:
    return getattr(sampler, "epoch", None), getattr(sampler, "_next_epoch", None)


class IndexStream:
    """The index batches of epoch after epoch, read by torch's iterator as one stream.

    ``ends[k]``: how many batches were drawn when the stream's epoch ``k`` ended;
    ``drawn_with[k]``: the sampler's epoch when epoch ``k`` was drawn (None: no epochs).
    """

    def __init__(self, batches: BatchSampler) -> None:
        self.batches = batches
        self.order = batches.sampler
        self.drawn = 0
        self.ends: list[int] = []
        self.drawn_with: list[Any] = []
        self.state_after: tuple[Any, Any] = _epoch_state(self.order)
        self._current: Iterator[Any] | None = None
        self._done = False

    def __iter__(self) -> IndexStream:
        return self

    def __next__(self) -> Any:
        while not self._done:
            if self._current is None:
                self._current = iter(self.batches)
                self._started = self.drawn
            try:
                index = next(self._current)
            except StopIteration:
                self._current = None
                self.ends.append(self.drawn)
                self._done = self.drawn == self._started  # an empty epoch: stop there
                continue
            if self.drawn == self._started:  # the sampler's iter() has run: its epoch is set
                self.drawn_with.append(_epoch_state(self.order)[0])
                self.state_after = _epoch_state(self.order)
            self.drawn += 1
            return index
        raise StopIteration


class EndlessBatches:
    """What ``TunedDataLoader._index_sampler`` hands torch: ``len`` is one epoch's, and every
    ``iter()`` (torch's reset) starts a new ``IndexStream``."""

    def __init__(self, batches: BatchSampler) -> None:
        self.batches = batches
        self.stream: IndexStream | None = None

    def __iter__(self) -> IndexStream:
        self.stream = IndexStream(self.batches)
        return self.stream

    def __len__(self) -> int:
        return len(self.batches)


class AcrossEpochs:
    """One loader's run across epochs: which stream epoch is served, how many batches were
    handed out, and whether the next ``iter()`` may go on where the last epoch ended."""

    def __init__(self, batches: BatchSampler) -> None:
        self.endless = EndlessBatches(batches)
        self._batches: Iterator[Any] | None = None
        self._served = -1  # the stream epoch being served
        self._handed = 0  # batches handed out since the stream started
        self._clean = False  # the last epoch ended at its end: the next one may follow on

    def epoch(self, restart: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        """The next epoch's batches; ``restart()`` resets torch's iterator (a new stream)."""
        stream = self.endless.stream
        if self._batches is None or stream is None or not self._clean \
                or not self._follows_on(stream):
            self._give_back(stream)
            self._batches = restart()
            self._served, self._handed = -1, 0
        self._served += 1
        self._clean = False
        return Epoch(self, self._served)

    def stop(self) -> None:
        """The workers are gone (``close()``): the next epoch starts afresh."""
        self._batches, self._clean = None, False

    def _follows_on(self, stream: IndexStream) -> bool:
        """The epoch drawn ahead is the one ``iter()`` would draw now. A ``set_epoch(n)``
        since (the sampler's state moved) that names that epoch is taken back."""
        k = self._served + 1
        if len(stream.drawn_with) <= k:
            return len(stream.ends) == k  # not started drawing it: nothing stale
        ahead, order = stream.drawn_with[k], stream.order
        if _advances_itself(order):
            if _epoch_state(order) == stream.state_after:
                return True
            if order._next_epoch != ahead:
                return False
            order.epoch, order._next_epoch = stream.state_after  # served from what was drawn
            return True
        if isinstance(order, DistributedSampler):
            return order.epoch == ahead
        return True

    def _give_back(self, stream: IndexStream | None) -> None:
        """Before a restart: the factory's sampler goes back to the first epoch drawn ahead
        and not started, unless the caller chose one (``set_epoch``) since."""
        if stream is None or not _advances_itself(stream.order):
            return
        k = self._served + 1
        if len(stream.drawn_with) > k and _epoch_state(stream.order) == stream.state_after:
            stream.order._next_epoch = stream.drawn_with[k]


class Epoch:
    """One epoch's batches, as torch's iterator is one epoch: ``len()`` and its attributes
    pass through."""

    def __init__(self, run: AcrossEpochs, k: int) -> None:
        self._run, self._k = run, k
        self._batches = run._batches

    def __iter__(self) -> Epoch:
        return self

    def __next__(self) -> Any:
        run, stream = self._run, self._run.endless.stream
        assert stream is not None
        if self._batches is not run._batches:  # a later iter() restarted the run
            raise StopIteration
        if len(stream.ends) > self._k and run._handed >= stream.ends[self._k]:
            run._clean = True
            raise StopIteration
        try:
            batch = next(self._batches)
        except StopIteration:  # the stream stopped (an empty epoch): start afresh next time
            run._batches = None
            raise
        except BaseException:
            run._batches = None  # a failed batch: the next epoch starts afresh
            raise
        run._handed += 1
        return batch

    def __len__(self) -> int:
        return len(self._run.endless)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_Epoch") or name in ("_run", "_k", "_batches"):
            raise AttributeError(name)
        return getattr(self._batches, name)
