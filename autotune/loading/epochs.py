"""A loader's epochs as torch would draw them: with or without a stop, tagged, resumable.

torch starts fetching an epoch's batches only when ``iter(loader)`` is called: at every
boundary the workers idle, then each needs a whole batch before the first one arrives.
With ``ahead`` the index stream that torch's iterator reads runs epoch after epoch (each
``iter()`` of the batch sampler is the next epoch), so the workers make the next epoch's
first batches while the consumer takes this epoch's last ones. The consumer still sees
epochs: each ``iter(loader)`` yields exactly one epoch's batches.

- Every epoch's samples once: an epoch ends where its sampler iterator ended, counted as
  the indices are drawn, and batches arrive in the order drawn (``in_order=True``).
- An epoch drawn ahead is the epoch torch would draw at ``iter()``, or it is drawn again:
  what decides it (lengths, the sampler's parameters and epoch, its random source) is read
  when it is drawn and again at ``iter()`` (``policy.epochs.why_stale``). A draw ahead from
  torch's global generator is hidden: the loop sees the global state it would see with
  torch, and the draw counts only if the loop drew nothing from it before ``iter()``.
- ``break`` out of an epoch: the next ``iter()`` starts afresh, as torch's does; the epochs
  drawn ahead and not started are given back to the sampler.
- Each batch of indices is a ``TaggedBatch`` with its epoch (per-sample seeding).
- ``state()`` / ``load()``: where the consumer stands (batches it received, never what was
  drawn ahead), and a start from there that skips the delivered indices without loading them.
"""

from __future__ import annotations

import base64
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import (BatchSampler, DistributedSampler, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

from ..errors import InvalidConfigError
from ..policy.epochs import EpochInputs, why_stale
from .inputs import RandomSource, draws_as_it_runs, epoch_inputs, length_of, random_source
from .seeding import TaggedBatch

STATE_VERSION = 1

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
    order = order_of(loader)
    if not isinstance(order, _KNOWN) and not _advances_itself(order):
        return (f"off: the sampler {type(order).__name__} may not start a new "
                "epoch at every iter()")
    if draws_as_it_runs(order):
        return ("off: the RandomSampler draws from its generator all epoch long (replacement "
                "or num_samples): the next epoch's draw must wait for this one's end")
    return None


def _advances_itself(sampler: Any) -> bool:
    """The factory's samplers: each ``iter()`` starts epoch ``_next_epoch``."""
    return hasattr(sampler, "_next_epoch") and hasattr(sampler, "epoch")


def _epoch_state(sampler: Any) -> tuple[Any, Any]:
    return getattr(sampler, "epoch", None), getattr(sampler, "_next_epoch", None)


@dataclass
class _Drawn:
    """One epoch of a stream as it was drawn."""

    inputs: EpochInputs  # read just before its draw (``random``: the state drawn from)
    after: bytes | None  # the random source's state right after its draw
    sampler_epoch: Any  # the sampler's epoch once its iter() ran (None: it has none)
    number: int  # the loader's epoch number, the tag of its batches
    end: bytes | None = None  # an own generator's state when its last index was drawn
    generator: Any = None  # the copy of the sampler's own generator it was drawn with
    adopted: bytes | None = None  # the state the sampler's generator was given when served


class IndexStream:
    """The index batches that torch's iterator reads: one epoch, or epoch after epoch.

    ``ends[k]``: how many batches were drawn when the stream's epoch ``k`` ended;
    ``drawn[k]``: how epoch ``k`` was drawn. The first epoch starts ``skip`` batches in.
    """

    def __init__(self, run: EpochRun, first: int) -> None:
        # the run weakly: a cycle would keep the workers until a garbage collection
        self._run = weakref.ref(run)
        self.ahead, self.dataset = run.ahead, run.dataset
        self.batches, self.order = run.batches, run.order
        self.source = run.source
        self.first, self.skip = first, 0
        self._redraw: bytes | None = None
        self.count = 0
        self.ends: list[int] = []
        self.drawn: list[_Drawn] = []
        self.state_after: tuple[Any, Any] = _epoch_state(self.order)
        self._next_base: bytes | None = None  # where an own generator's next epoch draws from
        self._internal: bytes | None = None  # a global source's state, draws ahead included
        self._current: Iterator[Any] | None = None
        self._pending: Any = None
        self._done = False

    def __iter__(self) -> IndexStream:
        return self

    def __next__(self) -> Any:
        while not self._done:
            if self._current is None:
                if self.drawn and not self.ahead:
                    break  # one epoch per iter()
                self._start()
                continue
            if self._pending is not None:
                batch, self._pending = self._pending, None
            else:
                batch = next(self._current, None)
            if batch is None:
                self._end()
                continue
            self.count += 1
            if isinstance(batch, (list, tuple)) and not isinstance(batch, TaggedBatch):
                return TaggedBatch(batch, self.drawn[-1].number)
            return batch
        raise StopIteration

    def _start(self) -> None:
        """Draw the next epoch's first batch, recording what decided it.

        A sampler's own generator is left alone while epochs are drawn ahead: each epoch
        draws from a copy (``_Drawn.generator``) that starts where the last one ended, and
        the loop's generator takes its state when the epoch is served (``adopt``). A draw
        from torch's global generator is hidden: the global state is put back after it."""
        k = len(self.drawn)
        run = self._run()
        if k == 0 and run is not None and run.stream is self:  # torch made it to read: a
            self.skip, self._redraw = run.take_resume()  # resume starts here
        source, own = self.source, None
        start_from = self._internal if k > 0 else self._redraw
        hide = source is not None and source.is_global and (k > 0 or start_from is not None)
        if hide:
            assert source is not None
            seen = source.get()  # the loop goes on from this state
            if start_from is not None:
                source.set(start_from)  # where the draws ahead (or a saved state) left it
        base = source.get() if source is not None else None
        if source is not None and not source.is_global:
            base = self._next_base if k > 0 else base
            own = RandomSource.copy_of(base)  # type: ignore[arg-type]
            self.order.generator = own
        inputs = epoch_inputs(self.batches, self.order, self.dataset, base,
                              with_epoch=not _advances_itself(self.order))
        try:
            self._current = iter(self.batches)
            started = self.count
            self._pending = next(self._current, None)  # the sampler's iter() runs here
        finally:
            if own is not None:
                assert source is not None
                self.order.generator = source.generator
        after = source.get() if source is not None and own is None else None
        if hide:
            assert source is not None
            self._internal = after
            source.set(seen)
        sampler_epoch = _epoch_state(self.order)[0]
        self.state_after = _epoch_state(self.order)
        number = sampler_epoch if isinstance(sampler_epoch, int) else self.first + k
        self.drawn.append(_Drawn(inputs, after, sampler_epoch, number, generator=own))
        if k == 0:
            self.adopt(0)  # drawn at iter(), as torch draws it
        if k == 0 and self.skip:  # a resume: the delivered batches, skipped unloaded
            for _ in range(self.skip):
                if self._pending is None:
                    break
                self._pending = next(self._current, None)
        self._started = started
        if self._pending is None:  # an empty epoch
            self._end()

    def adopt(self, k: int) -> None:
        """Epoch ``k`` is served: a sampler's own generator goes where its draw left the copy
        (as if drawn now), and follows it to the epoch's end."""
        drawn = self.drawn[k]
        if drawn.generator is not None and self.source is not None:
            drawn.adopted = drawn.end or drawn.generator.get_state().numpy().tobytes()
            self.source.set(drawn.adopted)

    def finish_epoch(self) -> None:
        """Draw to the end of the epoch whose batches were all drawn (the sampler's last
        step, e.g. a ``RandomSampler``'s, runs as torch's next fetch would run it)."""
        if self._current is not None and self._pending is None:
            batch = next(self._current, None)
            if batch is None:
                self._end()
            else:  # more than its length said: kept for the next read
                self._pending = batch

    def _end(self) -> None:
        self._current = None
        self.ends.append(self.count)
        drawn = self.drawn[-1]
        if drawn.generator is not None and self.source is not None:
            drawn.end = self._next_base = drawn.generator.get_state().numpy().tobytes()
            if drawn.adopted is not None and self.source.get() == drawn.adopted:
                drawn.adopted = drawn.end  # served and untouched: it follows the epoch's end
                self.source.set(drawn.end)
        if self.count == self._started:
            self._done = True  # an empty epoch: stop there


class EpochRun:
    """One loader's epochs: which stream epoch is served, how many batches were handed out,
    and whether the next ``iter()`` may go on where the last epoch ended (``ahead``)."""

    def __init__(self, batches: Any, dataset: Any, *, ahead: bool) -> None:
        self.batches, self.dataset, self.ahead = batches, dataset, ahead
        self.order = batches.sampler if isinstance(batches, BatchSampler) else batches
        self.source: RandomSource | None = random_source(self.order)
        self.stream: IndexStream | None = None
        self.number = -1  # the loader's epoch being served
        self._batches: Iterator[Any] | None = None
        self._served = -1  # the stream epoch being served
        self._handed = 0  # batches handed out since the stream started
        self._clean = False  # the last epoch ended at its end: the next one may follow on
        self._resume: dict[str, Any] | None = None
        self._skip = 0  # batches of the next stream's first epoch already delivered
        self._redraw_from: bytes | None = None  # the global state a resumed epoch was drawn from
        self.stale: str | None = None  # why the last epoch drawn ahead was drawn again
        self.received = 0  # batches of the served epoch the consumer received

    # -- what torch's iterator reads ---------------------------------------------------------

    def take_resume(self) -> tuple[int, bytes | None]:
        """The batches a resumed epoch skips and the global generator's state to draw it
        from, once (torch makes a stream at each reset, and reads the last one made)."""
        skip, state = self._skip, self._redraw_from
        self._skip, self._redraw_from = 0, None
        return skip, state

    def new_stream(self) -> IndexStream:
        """What torch's iterator reads from its (re)start on."""
        self.stream = IndexStream(self, self.number if self.number >= 0 else 0)
        return self.stream

    def __len__(self) -> int:
        return len(self.batches)

    # -- what the loader's iter() calls ------------------------------------------------------

    def epoch(self, restart: Callable[[], Iterator[Any]]) -> Epoch:
        """The next epoch's batches; ``restart()`` resets torch's iterator (a new stream)."""
        stream = self.stream
        if stream is not None and self._clean and len(stream.ends) <= self._served:
            stream.finish_epoch()  # the served epoch's last step (a sampler's end) is torch's
        self.number += 1
        self.stale = None
        skip = 0
        if self._resume is not None:
            skip = self._apply(self._resume)
            stream = None
        if not self.ahead or self._batches is None or stream is None or not self._clean \
                or not self._follows_on(stream):
            self._give_back(stream)
            self._batches = restart()
            self._served, self._handed = -1, 0
        self._served += 1
        self._clean = False
        self.received = skip
        return Epoch(self, self._served)

    def stop(self) -> None:
        """The workers are gone (``close()``, a dataset change): the next epoch starts afresh."""
        self._batches, self._clean = None, False

    def _follows_on(self, stream: IndexStream) -> bool:
        """The epoch drawn ahead is the one ``iter()`` would draw now."""
        k = self._served + 1
        if len(stream.drawn) <= k:
            return len(stream.ends) == k  # not started drawing it: nothing stale
        drawn, order = stream.drawn[k], stream.order
        if _advances_itself(order) and _epoch_state(order) != stream.state_after:
            if order._next_epoch != drawn.sampler_epoch:  # a set_epoch(n) to another epoch
                self.stale = "set_epoch() chose another epoch"
                return False
            order.epoch, order._next_epoch = stream.state_after  # served from what was drawn
        source = self.source
        now = epoch_inputs(self.batches, order, self.dataset,
                           source.get() if source is not None else None,
                           with_epoch=not _advances_itself(order))
        self.stale = why_stale(drawn.inputs, now, expected=drawn.inputs.random)
        if self.stale is not None:
            return False
        if source is not None and source.is_global and drawn.after is not None:
            source.set(drawn.after)  # as torch's draw at iter() would leave it
        stream.adopt(k)
        return True

    def _give_back(self, stream: IndexStream | None) -> None:
        """Before a restart: the sampler goes back to the first epoch drawn ahead and not
        started, unless the caller chose one (``set_epoch``, a reseed) since."""
        if stream is None:
            return
        k = self._served + 1
        if len(stream.drawn) <= k:
            return
        drawn = stream.drawn[k]
        if _advances_itself(stream.order) and _epoch_state(stream.order) == stream.state_after:
            stream.order._next_epoch = drawn.sampler_epoch

    # -- where the consumer stands -------------------------------------------------------------

    def delivered(self, unreceived: int = 0) -> tuple[int, bool]:
        """Batches of the served epoch the consumer received, and whether it ended."""
        if self._served < 0:
            return 0, False
        received, length = self.received - unreceived, length_of(self.batches)
        if unreceived:
            return received, False
        return received, self._clean or (length is not None and received >= length)

    def state(self, unreceived: int = 0) -> dict[str, Any]:
        """Plain data: the epoch the next batch belongs to and what decides its order."""
        if self._resume is not None:
            return dict(self._resume)  # loaded and not started yet: the same place
        stream, (handed, ended) = self.stream, self.delivered(unreceived)
        number, random, sampler_epoch = max(self.number, 0), None, None
        if stream is not None and self._served >= 0 and len(stream.drawn) > self._served:
            drawn = stream.drawn[self._served]
            if ended and drawn.end is None and len(stream.drawn) == self._served + 1:
                stream.finish_epoch()  # its end decides the next epoch's draw
            if ended:
                number, handed = self.number + 1, 0
                random = drawn.end  # an own generator's state after this epoch's draws
                if _advances_itself(self.order) and isinstance(drawn.sampler_epoch, int):
                    sampler_epoch = drawn.sampler_epoch + 1
            else:
                number, random, sampler_epoch = self.number, drawn.inputs.random, \
                    drawn.sampler_epoch
        return {"version": STATE_VERSION, "epoch": number, "batches_delivered": handed,
                "sampler": type(self.order).__name__, "sampler_epoch": sampler_epoch,
                "random_state": base64.b64encode(random).decode() if random else None,
                "lengths": list(epoch_inputs(self.batches, self.order, self.dataset,
                                             None).lengths)}

    def load(self, state: Any) -> None:
        """Check ``state`` against this loader now; the next ``epoch()`` starts there."""
        try:
            number, handed = int(state["epoch"]), int(state["batches_delivered"])
            lengths, sampler = list(state["lengths"]), str(state["sampler"])
            sampler_epoch, random = state["sampler_epoch"], state["random_state"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"state is not a loader's state_dict(): {exc!r} "
                                     "(pass what state_dict() returned)") from None
        here = list(epoch_inputs(self.batches, self.order, self.dataset, None).lengths)
        if lengths != here:
            raise InvalidConfigError(
                f"the state was saved from a loader of {lengths[0]} samples ({lengths[2]} "
                f"batches) and this loader has {here[0]} samples ({here[2]} batches): load it "
                "into a loader over the same dataset, sampler and batch size")
        if sampler != type(self.order).__name__:
            raise InvalidConfigError(
                f"the state was saved from a loader ordered by {sampler} and this one is "
                f"ordered by {type(self.order).__name__}: load it into a loader built alike")
        if random is not None and self.source is None:
            raise InvalidConfigError("the state carries a random order and this loader's "
                                     f"{sampler} has none: load it into a loader built alike")
        self._resume = {"version": STATE_VERSION, "epoch": number,
                        "batches_delivered": handed, "sampler": sampler,
                        "sampler_epoch": sampler_epoch, "random_state": random,
                        "lengths": lengths}
        self.number = number - 1
        self.stop()

    def _apply(self, state: dict[str, Any]) -> int:
        """Set the sampler to draw the saved epoch again, from the saved state; returns the
        batches of it already delivered."""
        self._resume = None
        order, sampler_epoch = self.order, state["sampler_epoch"]
        if isinstance(sampler_epoch, int):
            if _advances_itself(order):
                order.epoch = order._next_epoch = sampler_epoch
            elif isinstance(order, DistributedSampler):
                order.set_epoch(sampler_epoch)
        random = state["random_state"]
        if random is not None and self.source is not None:
            raw = base64.b64decode(random)
            if self.source.is_global:
                self._redraw_from = raw  # the stream's first draw: set, drawn, put back
            else:
                self.source.set(raw)
        self._skip = state["batches_delivered"]
        self.stream = None
        return self._skip


class Indices:
    """What ``TunedDataLoader._index_sampler`` hands torch: ``len`` is one epoch's, and every
    ``iter()`` (torch's reset) starts a new ``IndexStream``. Apart from the run, which holds
    torch's iterator: a cycle would keep the workers until a garbage collection."""

    def __init__(self, run: EpochRun) -> None:
        self._run = weakref.ref(run)
        self.batches = run.batches

    def __iter__(self) -> IndexStream:
        run = self._run()
        if run is None:
            raise RuntimeError("the loader's epochs are gone")
        return run.new_stream()

    def __len__(self) -> int:
        return len(self.batches)


class Epoch:
    """One epoch's batches, as torch's iterator is one epoch: ``len()`` and its attributes
    pass through."""

    def __init__(self, run: EpochRun, k: int) -> None:
        self._run, self._k = run, k
        self._batches = run._batches

    def __iter__(self) -> Epoch:
        return self

    def __next__(self) -> Any:
        run, stream = self._run, self._run.stream
        if self._batches is not run._batches and run._batches is not None:
            raise StopIteration  # a later iter() restarted the run
        if stream is not None and len(stream.ends) > self._k \
                and run._handed >= stream.ends[self._k]:
            run._clean = True
            raise StopIteration
        try:
            batch = next(self._batches)  # type: ignore[arg-type]
        except StopIteration:  # the stream stopped (an empty epoch): start afresh next time
            run._batches = None
            run._clean = True
            raise
        except BaseException:
            run._batches = None  # a failed batch: the next epoch starts afresh
            raise
        run._handed += 1
        run.received += 1
        return batch

    def __len__(self) -> int:
        return len(self._run)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_Epoch") or name in ("_run", "_k", "_batches"):
            raise AttributeError(name)
        return getattr(self._batches, name)
