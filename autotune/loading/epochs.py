"""A loader's epochs as torch would draw them: with or without a stop, tagged, resumable.

torch starts fetching an epoch's batches only when ``iter(loader)`` is called: at every
boundary the workers idle, then each needs a whole batch before the first one arrives.
With ``ahead`` the index stream that torch's iterator reads runs epoch after epoch (each
``iter()`` of the batch sampler is the next epoch), so the workers make the next epoch's
first batches while the consumer takes this epoch's last ones. The consumer still sees
epochs: each ``iter(loader)`` yields exactly one epoch's batches.

- Every epoch's samples once: an epoch ends where its sampler iterator ended, counted as
  the indices are drawn, and batches arrive in the order drawn (``in_order=True``).
- An epoch drawn ahead is the epoch torch would draw at ``iter()``, or it is drawn again
  (``loading.draws``, which also keeps draws ahead out of the generators the loop sees).
- ``break`` out of an epoch: the next ``iter()`` starts afresh, as torch's does; the epochs
  drawn ahead and not started are given back to the sampler.
- With ``tag``, each batch of indices is a ``TaggedBatch`` with its epoch (per-sample
  seeding); without, the sampler's batches go to the workers as they are.
- ``state()`` / ``load()``: where the consumer stands (batches it received, never what was
  drawn ahead), and a start from there that skips the delivered indices without loading them.
"""

from __future__ import annotations

import base64
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import (BatchSampler, DistributedSampler, RandomSampler, SequentialSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

from ..errors import InvalidConfigError
from .draws import EpochDraws, advances_itself
from .inputs import draws_as_it_runs, epoch_inputs, length_of, random_source
from .seeding import TaggedBatch

STATE_VERSION = 1

log = logging.getLogger("autotune.loading")

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
    if not isinstance(order, _KNOWN) and not advances_itself(order):
        return (f"off: the sampler {type(order).__name__} may not start a new "
                "epoch at every iter()")
    if draws_as_it_runs(order):
        return ("off: the RandomSampler draws from its generator all epoch long (replacement "
                "or num_samples): the next epoch's draw must wait for this one's end")
    return None


class IndexStream:
    """The index batches that torch's iterator reads: one epoch, or epoch after epoch
    (``ahead``), each drawn by ``loading.draws``.

    ``ends[k]``: how many batches were read when the stream's epoch ``k`` ended;
    ``draws.drawn[k]``: how it was drawn. The first epoch starts ``skip`` batches in.
    """

    def __init__(self, run: EpochRun, first: int) -> None:
        # the run weakly: a cycle would keep the workers until a garbage collection
        self._run = weakref.ref(run)
        self.ahead, self.tag = run.ahead, run.tag
        self.draws = EpochDraws(run.batches, run.dataset, first=first)
        self.skip = 0
        self.count = 0
        self.ends: list[int] = []
        self._pending: Any = None
        self._started = 0
        self._done = False

    def __iter__(self) -> IndexStream:
        return self

    def __next__(self) -> Any:
        draws = self.draws
        while not self._done:
            if not draws.drawing and self._pending is None:
                if draws.drawn and not self.ahead:
                    break  # one epoch per iter()
                self._start()
                continue
            if self._pending is not None:
                batch, self._pending = self._pending, None
            else:
                batch = draws.next()
            if batch is None:
                self._end()
                continue
            self.count += 1
            if self.tag and isinstance(batch, (list, tuple)) \
                    and not isinstance(batch, TaggedBatch):
                return TaggedBatch(batch, draws.drawn[-1].number)
            return batch
        raise StopIteration

    def _start(self) -> None:
        """Draw the next epoch's first batch (a resume: skip the delivered ones, unloaded)."""
        k = len(self.draws.drawn)
        run = self._run()
        if k == 0 and run is not None and run.stream is self:  # torch made it to read: a
            self.skip, self.draws._redraw = run.take_resume()  # resume starts here
        self._started = self.count
        self._pending = self.draws.begin(ahead=k > 0)
        if k == 0:
            for _ in range(self.skip):
                if self._pending is None:
                    break
                self._pending = self.draws.next()
        if self._pending is None:  # empty, or all of it delivered before a resume
            self._end()

    def finish_epoch(self) -> None:
        """Draw to the end of the epoch whose batches were all read (the sampler's last
        step, e.g. a ``RandomSampler``'s, runs as torch's next fetch would run it)."""
        if self.draws.drawing and self._pending is None:
            self._pending = self.draws.next()
            if self._pending is None:
                self._end()

    def _end(self) -> None:
        self.ends.append(self.count)
        if self.count == self._started:
            self._done = True  # an empty epoch: stop there


class EpochRun:
    """One loader's epochs: which stream epoch is served, how many batches were handed out,
    and whether the next ``iter()`` may go on where the last epoch ended (``ahead``)."""

    def __init__(self, batches: Any, dataset: Any, *, ahead: bool, tag: bool = True) -> None:
        self.batches, self.dataset, self.ahead, self.tag = batches, dataset, ahead, tag
        # the sampler (its generator, a DistributedSampler's epochs), whatever its type
        self.order: Any = batches.sampler if isinstance(batches, BatchSampler) else batches
        self.source = random_source(self.order)
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
            if stream is not None:
                stream.draws.give_back(self._served + 1)
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
        if len(stream.draws.drawn) <= k:
            return len(stream.ends) == k  # not started drawing it: nothing stale
        self.stale = stream.draws.check(k)
        if self.stale is not None:
            log.debug("autotune: the epoch drawn ahead is drawn again: %s", self.stale)
        return self.stale is None

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
        if stream is not None and self._served >= 0 \
                and len(stream.draws.drawn) > self._served:
            drawn = stream.draws.drawn[self._served]
            if ended and drawn.end is None and len(stream.draws.drawn) == self._served + 1:
                stream.finish_epoch()  # its end decides the next epoch's draw
            if ended:
                number, handed = self.number + 1, 0
                random = drawn.end  # an own generator's state after this epoch's draws
                if advances_itself(self.order) and isinstance(drawn.sampler_epoch, int):
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
        here = list(epoch_inputs(self.batches, self.order, self.dataset, None).lengths)
        self._resume = check_state(state, here, type(self.order).__name__,
                                   self.source is not None)
        self.number = self._resume["epoch"] - 1
        self.stop()

    def _apply(self, state: dict[str, Any]) -> int:
        """Set the sampler to draw the saved epoch again, from the saved state; returns the
        batches of it already delivered."""
        self._resume = None
        order, sampler_epoch = self.order, state["sampler_epoch"]
        if isinstance(sampler_epoch, int):
            if advances_itself(order):
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


def check_state(state: Any, lengths: list[int | None], sampler: str,
                random: bool) -> dict[str, Any]:
    """``state`` (a ``state()``) as plain values, or a clear error when it is not one, or
    is from a loader of other ``lengths`` (dataset, sampler, batches) or ``sampler`` type, or
    carries a random order where this loader has none (``random``)."""
    if isinstance(state, Mapping) and state.get("kind") == "stream":
        raise InvalidConfigError(f"the state was saved from a loader of the stream "
                                 f"{state.get('stream')} and this one reads a map-style "
                                 "dataset: load it into a loader built alike")
    try:
        saved = {"version": int(state["version"]), "epoch": int(state["epoch"]),
                 "batches_delivered": int(state["batches_delivered"]),
                 "sampler": str(state["sampler"]), "sampler_epoch": state["sampler_epoch"],
                 "random_state": state["random_state"],
                 "lengths": [None if x is None else int(x) for x in state["lengths"]]}
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidConfigError(f"state is not a loader's state_dict(): missing or wrong "
                                 f"{exc!r} (pass what state_dict() returned)") from None
    if saved["version"] > STATE_VERSION:
        raise InvalidConfigError(f"state version {saved['version']} is newer than this "
                                 f"autotune's ({STATE_VERSION}): upgrade autotune")
    theirs = saved["lengths"]
    if len(theirs) != len(lengths) or theirs != lengths:
        raise InvalidConfigError(
            f"the state was saved from a loader of {theirs[0] if theirs else None} samples "
            f"({theirs[-1] if theirs else None} batches) and this loader has {lengths[0]} "
            f"samples ({lengths[-1]} batches): load it into a loader over the same dataset, "
            "sampler and batch size")
    if saved["sampler"] != sampler:
        raise InvalidConfigError(
            f"the state was saved from a loader ordered by {saved['sampler']} and this one "
            f"is ordered by {sampler}: load it into a loader built alike")
    if saved["random_state"] is not None and not random:
        raise InvalidConfigError(f"the state carries a random order and this loader's "
                                 f"{sampler} has none: load it into a loader built alike")
    if saved["sampler_epoch"] is not None and not isinstance(saved["sampler_epoch"], int):
        raise InvalidConfigError(f"state: sampler_epoch={saved['sampler_epoch']!r} must be an "
                                 "int or None")
    return saved


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


class StreamRun:
    """A stream's epochs as the consumer receives them, counted for ``state()``.

    A resume hands the dataset its own state where it has one (``state_dict`` and
    ``load_state_dict``) and no workers run it (then its state is what was delivered);
    otherwise the batches already delivered are made again and skipped: a stream without its
    own state must repeat its order on a fresh ``iter()`` (as torch's would, seeded).
    """

    def __init__(self, dataset: Any, workers: int) -> None:
        self.dataset = dataset
        self.own = workers == 0 and callable(getattr(dataset, "state_dict", None)) \
            and callable(getattr(dataset, "load_state_dict", None))
        self.number = -1
        self.received = 0
        self.ended = False
        self._resume: dict[str, Any] | None = None

    def epoch(self, restart: Callable[[], Iterator[Any]]) -> Counted:
        self.number += 1
        self.received, self.ended, skip = 0, False, 0
        resume, self._resume = self._resume, None
        if resume is not None:
            self.number = resume["epoch"]
            if self.own and resume.get("dataset") is not None:
                self.dataset.load_state_dict(resume["dataset"])
            else:
                skip = resume["batches_delivered"]
        return Counted(self, restart(), skip)

    def state(self, unreceived: int = 0) -> dict[str, Any]:
        if self._resume is not None:
            return dict(self._resume)
        number, received = max(self.number, 0), self.received - unreceived
        if self.ended:
            number, received = self.number + 1, 0
        state = {"version": STATE_VERSION, "kind": "stream",
                 "stream": type(self.dataset).__name__, "epoch": number,
                 "batches_delivered": received, "dataset": None}
        if self.own:
            state["dataset"] = self.dataset.state_dict()
        return state

    def load(self, state: Any) -> None:
        try:
            saved = {"version": int(state["version"]), "kind": str(state["kind"]),
                     "stream": str(state["stream"]), "epoch": int(state["epoch"]),
                     "batches_delivered": int(state["batches_delivered"]),
                     "dataset": state["dataset"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"state is not a stream loader's state_dict(): missing or "
                                     f"wrong {exc!r} (pass what state_dict() returned)") from None
        if saved["kind"] != "stream" or saved["stream"] != type(self.dataset).__name__:
            raise InvalidConfigError(
                f"the state was saved from a loader of {saved['stream']} and this one reads "
                f"{type(self.dataset).__name__}: load it into a loader built alike")
        if saved["version"] > STATE_VERSION:
            raise InvalidConfigError(f"state version {saved['version']} is newer than this "
                                     f"autotune's ({STATE_VERSION}): upgrade autotune")
        self._resume = saved


class Counted:
    """A stream's epoch through torch's iterator, counting what the consumer received (the
    first ``skip`` batches are made and dropped); attributes pass through."""

    def __init__(self, run: StreamRun, batches: Iterator[Any], skip: int) -> None:
        self._run, self._batches, self._skip = run, batches, skip

    def __iter__(self) -> Counted:
        return self

    def __next__(self) -> Any:
        run = self._run
        try:
            while self._skip:
                next(self._batches)
                self._skip -= 1
                run.received += 1
            batch = next(self._batches)
        except StopIteration:
            run.ended = True
            raise
        run.received += 1
        return batch

    def __len__(self) -> int:
        return len(self._batches)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("_run", "_batches", "_skip"):
            raise AttributeError(name)
        return getattr(self._batches, name)
