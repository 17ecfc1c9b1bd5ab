"""Re-tuning while training runs: what ``create_training_loader(..., adapt=True)`` returns.

``AdaptiveLoader`` is iterated like the DataLoader it holds. Every ``every`` steps it looks
at the last window (its own ``StallMonitor`` clock, the seconds its workers spent making
samples, their CPU use) and asks ``policy.adapt.decide`` for a worker count; a change builds
a new loader through the one builder, so the new settings are what the factory would build.

A change mid-epoch neither loses nor repeats a sample: the epoch's batches are drawn from the
sampler once, at the epoch's start, batches arrive in that order (``in_order=True``), and the
new loader continues from the first batch not yet delivered. A stream cannot be resumed
mid-epoch, so its changes wait for the end of the epoch.

An ``ImageFolder`` whose placement was measured may also move where it decodes, at an epoch
boundary, when the last window says the other side would do better
(``policy.placement.reconsider``); a move that did not make the loop faster is taken back at
the next boundary and not made again (a split: not with a share within ``SHARE_STEP`` of it).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler, SequentialSampler

from .._check import check_int, is_stream
from .._lifecycle import Closeable
from ..config import SETTINGS, LoaderConfig
from ..errors import InvalidConfigError, WorkerSafetyError
from ..loading.builder import TunedDataLoader, build_loader
from ..loading.draws import EpochDraws
from ..loading.epochs import STATE_VERSION, check_state
from ..loading.inputs import epoch_inputs, random_source
from ..loading.seeding import TaggedBatch
from ..loading.worker import BusyMeter
from ..policy import adapt
from ..policy.stall import MODERATE
from ..policy.placement import SHARE_STEP, Placement, reconsider
from ..profiles import ProfileEntry, check_key, profile_path, save_entry
from ..records import HardwareInfo, WorkloadProfile
from ..sources.chunk_sampler import ChunkShuffleSampler
from ..sources.images import image_folder_in, with_images
from ..system.distributed import current_ranks
from ..system.usage import children_cpu_seconds
from .monitor import Epochs, StallMonitor, StallReport
from .steps import device_steps

log = logging.getLogger("autotune.tuning.adapt")  # the name users configure (kept when it moved)

DEFAULT_EVERY = 20  # steps per window: at most one change per this many steps
SETTLED_WINDOWS = 3  # this many windows without a change: settled


@dataclass(frozen=True, kw_only=True)
class AdaptChange:
    """One change the re-tuner made."""

    epoch: int
    step: int  # batches the loader had delivered
    from_workers: int
    to_workers: int
    reason: str
    placement: str | None = None  # where an ImageFolder decodes from now on (None: unmoved)


class AdaptiveLoader(Closeable):
    """A training loader that changes its worker count between steps while training runs.

    Built by ``factory.create_training_loader(dataset, batch_size, adapt=True)``; iterate it
    like a DataLoader. ``changes`` lists what it changed and why (each change is also logged
    by ``autotune.tuning.adapt`` at INFO), ``report()`` is its ``StallMonitor`` report,
    ``autotune_config`` the settings now, ``save()`` writes them to this host's profile.

    The factory passes these arguments; there is rarely a reason to build one by hand.

    Args:
        dataset: a map-style dataset or an ``IterableDataset`` (a stream cannot resume
            mid-epoch, so its changes wait for the end of the epoch).
        batch_size: samples per batch.
        config: the settings it starts with (its ``num_workers`` is the first count).
        configure: returns the full settings for a worker count, resolved as the factory
            would (``policy.resolve``); called for each count it moves to.
        cap: the most workers it may move to (RAM, /dev/shm, CPUs); raised to
            ``config.num_workers`` if that starts higher.
        hardware: the machine: no growth once the workers use its CPU budget, and
            ``save()`` writes the profile of its hostname.
        extra: DataLoader keywords that are not settings (``collate_fn``, ``sampler``,
            ``batch_sampler``, ``generator``, ...), copied; a ``sampler`` or
            ``batch_sampler`` there sets the epoch's order, a ``generator`` seeds the
            random one.
        shuffle: True: a new random order each epoch; False: sequential. Not used when
            ``extra`` holds a sampler or batch sampler, nor for a stream.
        key: the profile key ``save()`` writes under by default; also the monitor's name
            when ``name`` is None.
        check_workers: called with the new settings before it moves to a worker set-up not
            yet checked (one worker or several, start method): a ``WorkerSafetyError`` keeps
            the current count and caps it there. None: no check.
        every: steps per window, >= 1: at most one change per this many steps (default 20).
        name: the ``StallMonitor``'s label in logs and reports; None: ``key``.
        profile_dir: where ``save()`` writes by default; None: ``$AUTOTUNE_PROFILE_DIR``,
            else ``./profiles``.
        device: where the loop runs its steps (``"cuda"``): for a CUDA device a step's time
            is also read on the GPU (``feed.steps``), since the host only launches it.
            None: the host's time alone.
        workload: the measurement of a few samples the settings came from: its share of
            time spent computing tells a CPU-bound batch even when other processes make
            the workers' own CPU readings look like waiting. None: the readings alone.
        seed: seeds each sample from (seed, epoch, index) (``loading.seeding``): the same
            batches before and after a worker-count change. None: torch's worker seeds.

    ``state_dict()`` / ``load_state_dict()`` resume mid-epoch (a map-style dataset): the
    epoch, the batches of it received and the worker count, nested as
    ``{"order": ..., "workers": n}``.

    Example::

        loader = factory.create_training_loader(dataset, batch_size=16, adapt=True)
        for epoch in range(3):
            for batch in loader:
                train_step(batch)
        print(loader.changes, loader.report().stall_fraction)
        loader.save()  # the setting it settled on, for the next run
    """

    def __init__(self, dataset: Any, batch_size: int, config: LoaderConfig, *,
                 configure: Callable[[int], LoaderConfig], cap: int, hardware: HardwareInfo,
                 extra: dict[str, Any], shuffle: bool, key: str,
                 check_workers: Callable[[LoaderConfig], None] | None = None,
                 every: int = DEFAULT_EVERY, name: str | None = None,
                 profile_dir: Any = None, device: Any = None,
                 workload: WorkloadProfile | None = None, seed: int | None = None) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.every = check_int("adapt_every", every, minimum=1)
        self.key = key
        self.hardware = hardware
        self.profile_dir = profile_dir
        self.changes: list[AdaptChange] = []
        self.epoch = 0
        self.steps = 0  # batches delivered since the loader was created
        self._config = config
        self._seed = seed
        self._resume: dict[str, Any] | None = None
        self._configure = configure
        self._cap = max(cap, config.num_workers)
        self._check_workers = check_workers
        # the worker set-ups already checked (the factory checked the starting one)
        self._checked = {(min(config.num_workers, 2), config.multiprocessing_context)}
        self._stream = is_stream(dataset)
        self._extra = dict(extra)
        self._order = None if self._stream else _EpochOrder(dataset, batch_size, config,
                                                            self._extra, shuffle)
        if self._order is not None:
            self._extra["batch_sampler"] = _Remaining(self._order)
        self._loader: TunedDataLoader | None = None
        self._inner: Iterator[Any] | None = None  # the loader's iterator, kept across epochs
        self._meter: BusyMeter | None = None
        self._window: _Snapshot | None = None
        self._stalled_at = -1
        self._device_steps = device_steps(device)
        self._cpu_fraction = workload.cpu_fraction if workload is not None else None
        self._tried: adapt.Tried | None = None  # the last growth, until a window judges it
        self._ceiling: int | None = None  # a count a growth gave nothing at
        self._last_rate = 0.0
        self._quiet_windows = 0
        self._pending: adapt.Change | None = None
        self._last: adapt.Window | None = None  # the last window judged
        self._images = image_folder_in(dataset)  # an ImageFolder's placement may move
        # the last move: the placement, the loop's rate and a step's seconds before it
        self._moved: tuple[Placement, float, float] | None = None
        self._back: Placement | None = None  # a move to take back at the next boundary
        self._refused: list[Placement] = []  # placements a move gave nothing with
        self._workers_at: dict[str, int] = {}  # the worker count each placement had
        self.monitor = StallMonitor(Epochs(self), name=name or key)

    # -- what users call ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return iter(self.monitor)

    def __len__(self) -> int:
        if self._order is not None:
            return len(self._order.source)
        return len(self._current())

    @property
    def autotune_config(self) -> LoaderConfig:
        return self._config

    @property
    def num_workers(self) -> int:
        return self._config.num_workers

    @property
    def settled(self) -> bool:
        """No change over the last ``SETTLED_WINDOWS`` windows."""
        return self._quiet_windows >= SETTLED_WINDOWS

    def report(self) -> StallReport:
        return self.monitor.report()

    def save(self, profile_dir: Any = None, key: str | None = None) -> Any:
        """Write the settings now in use to this host's profile under ``key`` (default: the
        loader's key) in ``profile_dir`` (default: the factory's), so the next run starts
        there. Only rank 0 writes under torchrun. Returns the profile's path."""
        key = check_key(key or self.key)
        profile_dir = profile_dir if profile_dir is not None else self.profile_dir
        if current_ranks().rank != 0:
            return profile_path(self.hardware.host.hostname, profile_dir)
        report = self.report()
        measured = {
            "objective": "adapt: the fewest workers that keep the training loop fed",
            "stall_fraction": round(report.stall_fraction, 4), "steps": report.steps,
            "changes": len(self.changes), "settled": self.settled,
            "batch_size": self.batch_size, "local_world_size": current_ranks().local_world_size,
            "tuned_at": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
            "torch": self.hardware.host.torch,
        }
        return save_entry(self.hardware, key, ProfileEntry(settings=self._config.tuned_settings(),
                                                           measured=measured), profile_dir)

    def state_dict(self, *, unreceived: int = 0) -> dict[str, Any]:
        """Where the consumer stands (plain data): ``{"version", "order", "workers"}``.
        ``unreceived``: batches a wrapper holds ahead (``DeviceLoader``)."""
        if self._order is None:
            raise InvalidConfigError("state_dict() of an adapting loader needs a map-style "
                                     f"dataset; this one is {type(self.dataset).__name__}")
        if self._resume is not None:
            return {"version": STATE_VERSION, "order": dict(self._resume["order"]),
                    "workers": self._resume["workers"]}
        return {"version": STATE_VERSION, "order": self._order.state(unreceived),
                "workers": self.num_workers}

    def load_state_dict(self, state: Any) -> None:
        """Resume from ``state_dict()``'s ``state`` at the next ``iter()``: the rest of the
        saved epoch (its delivered batches skipped, not loaded), then whole epochs."""
        if self._order is None:
            self.state_dict()  # raises, naming why
        try:
            order, workers = dict(state["order"]), int(state["workers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidConfigError(f"state is not an AdaptiveLoader's state_dict(): {exc!r} "
                                     "(pass what state_dict() returned)") from None
        assert self._order is not None
        self._resume = {"order": self._order.check(order), "workers": workers}

    def _start_from(self, state: dict[str, Any]) -> None:
        """The epoch order starts again at the saved place, with fresh workers."""
        self._resume = None
        assert self._order is not None
        self.epoch = self._order.restart(state["order"])
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        self._inner = None
        self._window = None
        workers = min(state["workers"], self._cap)
        if workers != self.num_workers:  # the count the saved run had settled on
            self._apply(adapt.Change(workers=workers, reason=(
                "the count the run that saved the state had")))
            self._tried = None

    def close(self) -> None:
        """Stop the workers now (iterating again starts new ones)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        self._inner = None
        self.monitor.release()

    def __repr__(self) -> str:
        return f"AdaptiveLoader({self.key!r}, num_workers={self.num_workers}, every={self.every})"

    # -- one epoch ---------------------------------------------------------------------------

    def _epoch(self) -> Iterator[Any]:
        self.epoch += 1
        resumed = self._resume is not None
        if self._resume is not None:
            self._start_from(self._resume)
        elif self._loader is not None and self._loader.restart_if_changed():
            self._inner = None  # the dataset changed: new workers copy it
            config = self._loader.autotune_config
            note = None if config is None else config.reasons.get("workers_restarted")
            if note is not None:
                self._config = self._config.noted(workers_restarted=note)
        if self._pending is not None:
            self._apply(self._pending)
        if self._images is not None and self._order is not None:
            self._place()
        if self._order is None:
            yield from self._stream_epoch()
            return
        order = self._order
        if resumed:
            order.workers = self._config.num_workers
        elif not order.new_epoch(self._config.num_workers):
            self._inner = None  # the last epoch was left early: what was drawn ahead is gone
        restarted = False
        while not order.epoch_done():
            if self._inner is None:
                order.start = order.delivered  # a loader (new or reset) goes on from here
                self._inner, restarted = iter(self._current()), True
            for batch in self._inner:
                restarted = False
                order.delivered += 1
                self.steps += 1
                self._handed()
                yield batch
                self._asked()
                change = self._watch()
                if change is not None and self._apply(change):
                    order.start = order.delivered  # the new loader goes on here
                    break
                if order.epoch_done():
                    return  # the loader goes on into the next epoch, drawn ahead
            else:
                self._inner = None  # its batches ran out (nothing more was drawn ahead)
                if restarted:
                    return

    def _stream_epoch(self) -> Iterator[Any]:
        for batch in self._current():
            self.steps += 1
            self._handed()
            yield batch
            self._asked()
            change = self._watch()
            if change is not None:
                self._pending = change  # a stream cannot resume mid-epoch

    def _current(self) -> TunedDataLoader:
        if self._loader is None:
            if self._order is not None:  # what the next epochs are drawn for
                self._order.ahead = self._config.prefetch_across_epochs
                self._order.workers = self._config.num_workers
            workers = self._config.num_workers
            self._meter = BusyMeter(workers) if workers else None
            self._loader = build_loader(self.dataset, self.batch_size, self._config,
                                        shuffle=False, extra=self._extra, meter=self._meter,
                                        seed=self._seed)
        return self._loader

    # -- watching and changing -----------------------------------------------------------------

    def _handed(self) -> None:
        if self._device_steps is not None:
            self._device_steps.handed()

    def _asked(self) -> None:
        if self._device_steps is not None:
            self._device_steps.asked()

    def _snapshot(self) -> _Snapshot:
        clock = self.monitor.clock
        steps, wait_s, step_s = clock.totals()
        return _Snapshot(clock=clock, steps=steps, wait_s=wait_s - clock.start_wait_s,
                         step_s=step_s, wall=time.perf_counter(), cpu=children_cpu_seconds(),
                         busy=self._meter.total() if self._meter is not None else 0.0,
                         main=time.process_time(),
                         device=self._device_steps.totals() if self._device_steps else None)

    def _watch(self) -> adapt.Change | None:
        """Called after each step; every ``every`` steps, the decision on the last window.
        Windows span epochs; the waits for each epoch's first batch are left out (no worker
        count shortens them), as is the first batch after a change (the new workers start)."""
        first = self._window
        if first is None or first.clock is not self.monitor.clock:  # a change, or a reset
            self._window = self._snapshot()
            return None
        if self.monitor.clock.steps - first.steps < self.every:
            return None
        now = self._window = self._snapshot()
        wall = now.wall - first.wall
        window = adapt.Window(
            workers=self.num_workers, steps=now.steps - first.steps,
            wait_s=max(0.0, now.wait_s - first.wait_s), step_s=now.step_s - first.step_s,
            busy_s=now.busy - first.busy if self._meter is not None else None,
            cpu_used=(now.cpu - first.cpu) / wall if wall > 0 else None,
            main_cpu=(now.main - first.main) / wall if wall > 0 else None,
            device_s=_device_s(first, now), cpu_fraction=self._cpu_fraction)
        if adapt.short_of_workers(window):
            self._stalled_at = max(self._stalled_at, window.workers)
        change = adapt.decide(window, cap=self._cap, cpu_budget=self.hardware.cpu_budget,
                              stalled_at=self._stalled_at, tried=self._tried,
                              ceiling=self._ceiling)
        if self._tried is not None and change is not None \
                and change.workers == self._tried.before:  # the growth gave nothing
            self._ceiling = min(self._ceiling or self._tried.after, self._tried.after)
        self._tried = None
        self._last_rate = window.rate
        self._quiet_windows = 0 if change is not None else self._quiet_windows + 1
        self._last = window
        if change is None and self._moved is not None:
            self._judge_move(window)
        return change

    def _apply(self, change: adapt.Change) -> bool:
        """Switch to ``change.workers`` workers; False when it cannot (workers unsafe) or
        need not (that many already)."""
        self._pending = None
        if change.workers == self.num_workers:
            return False
        config = self._configure(change.workers).replace(
            source="tuned", reason=f"adapt=True: {change.reason}", num_workers=change.workers)
        checked = (min(config.num_workers, 2), config.multiprocessing_context)
        if config.num_workers and checked not in self._checked \
                and self._check_workers is not None:
            try:  # pickling (spawn), a stream's sharding (> 1 worker): before workers start
                self._check_workers(config)
            except WorkerSafetyError as exc:
                log.warning("autotune adapt: staying at %d workers: %s", self.num_workers, exc)
                self._cap = self.num_workers
                return False
            self._checked.add(checked)
        record = AdaptChange(epoch=self.epoch, step=self.steps,
                             from_workers=self.num_workers, to_workers=change.workers,
                             reason=change.reason)
        grew = change.workers > self.num_workers
        self._tried = adapt.Tried(before=self.num_workers, after=change.workers,
                                  rate_before=self._last_rate) if grew else None
        self.changes.append(record)
        log.info("autotune adapt %s: %d -> %d workers (epoch %d, step %d): %s", self.key,
                 record.from_workers, record.to_workers, record.epoch, record.step, change.reason)
        if self._loader is not None:
            self._loader.close()
            self._loader = None
        self._inner = None
        self._config = _with_notes(config, self._config)
        self._window = None
        return True

    # -- where an ImageFolder decodes ----------------------------------------------------------

    def _place(self) -> None:
        """At an epoch boundary: move the placement if the last window says so (or take
        back a move that gave nothing)."""
        assert self._images is not None
        current = self._images.in_effect
        if self._back is not None:
            new, self._back = self._back, None
        elif self._last is None or self._quiet_windows < 1 or self._moved is not None:
            return  # nothing measured, the worker count still moving, or a move being judged
        else:
            window = self._last
            found = reconsider(current, images_per_step=self.batch_size, step_s=window.step,
                               stall=window.stall, images_per_s=window.rate * self.batch_size)
            if found is None or any(_alike(found, no) for no in self._refused):
                return
            new = found
            self._moved = (current, window.rate, window.step)
        self._workers_at[current.where] = self.num_workers
        self.changes.append(AdaptChange(epoch=self.epoch, step=self.steps,
                                        from_workers=self.num_workers,
                                        to_workers=self.num_workers, reason=new.reason,
                                        placement=new.where))
        log.info("autotune adapt %s: decoding moved from %s to %s (epoch %d, step %d): %s",
                 self.key, current.where, new.where, self.epoch, self.steps, new.reason)
        self._images = self._images.placed(new)
        self.dataset = with_images(self.dataset, self._images)
        self._config = self._config.noted(placement=f"{new.where}: adapt=True: {new.reason}")
        if self._loader is not None:  # what it drew ahead was decoded the other way
            self._loader.close()
            self._loader = None
        self._inner = None
        self._window = self._last = None
        self._tried, self._ceiling, self._stalled_at = None, None, -1  # counts of the old one
        self._quiet_windows = 0
        workers = self._workers_at.get(new.where)
        if workers is not None and workers != self.num_workers:
            self._apply(adapt.Change(workers=workers, reason=(
                f"the count decoding on {new.where!r} ran with before")))
            self._tried = None  # known for this placement: not a growth to judge

    def _judge_move(self, window: adapt.Window) -> None:
        """The first window with a steady worker count after a move: take it back at the
        next boundary unless the loop got faster by more than ``adapt.NO_GAIN``. What the
        window showed corrects the rates the placement taken back carries: the loop waited
        for the workers (their real rate), the step grew by more than the device's decoding
        was measured to cost (its real rate)."""
        assert self._moved is not None and self._images is not None
        before, rate_before, step_before = self._moved
        self._moved = None
        if window.rate >= rate_before * (1 + adapt.NO_GAIN):
            return
        moved = self._images.in_effect
        self._refused.append(moved)
        cpu_rate, device_rate = before.cpu_rate, before.device_rate
        if window.stall >= MODERATE and moved.cpu_share > 0:
            cpu_rate = window.rate * self.batch_size * moved.cpu_share
        if moved.cpu_share < 1 and before.device_rate:
            own_s = step_before - (1 - before.cpu_share) * self.batch_size / before.device_rate
            if window.step > own_s:
                device_rate = (1 - moved.cpu_share) * self.batch_size / (window.step - own_s)
        self._back = dataclasses.replace(before, cpu_rate=cpu_rate, device_rate=device_rate,
                                         reason=(
            f"decoding on {moved.where!r} gave no gain: {window.rate:.1f} steps/s against "
            f"{rate_before:.1f}; back to {before.where!r}"))


@dataclass(frozen=True)
class _Snapshot:
    """The running totals at a window's edge."""

    clock: Any
    steps: int
    wait_s: float  # without the epochs' first batches
    step_s: float
    wall: float
    cpu: float
    busy: float
    main: float  # the training process's CPU seconds
    device: tuple[float, int] | None  # (seconds, steps) the device completed (DeviceSteps)


class _EpochOrder:
    """The batches of epoch after epoch as drawn from the caller's sampler or batch sampler
    (or a random or sequential one), kept from the first not yet delivered on: a new loader
    continues the same order. Each epoch is drawn once, as the loaders ask (an endless
    sampler works), by ``loading.draws``. With ``ahead`` the next epoch's draw begins where
    this one's ends, so the workers go on into it while the loop takes this epoch's last
    batches (one epoch ahead at most); at the loop's next epoch it is checked against what
    torch would draw then, and drawn again if it differs. Positions count batches over all
    epochs; ``epochs`` holds [first, end, drawn] of the consumer's epoch and the one ahead."""

    def __init__(self, dataset: Any, batch_size: int, config: LoaderConfig,
                 extra: dict[str, Any], shuffle: bool) -> None:
        batches = extra.pop("batch_sampler", None)
        if batches is None:
            sampler = extra.pop("sampler", None)
            if sampler is None:
                sampler = (RandomSampler(dataset, generator=_own(extra.get("generator")))
                           if shuffle else SequentialSampler(dataset))
            batches = BatchSampler(sampler, batch_size, config.drop_last)
        self.source = batches
        self.dataset = dataset
        self.ahead = config.prefetch_across_epochs
        self.drawn: list[list[Any]] = []  # batches drawn and not yet delivered ...
        self.offset = 0  # ... the first of them is at this position
        self.start = 0  # where the loader being built begins
        self.delivered = 0
        self.epochs: list[list[Any]] = []
        self.draws = EpochDraws(batches, dataset)
        self.number = -1  # the consumer's epoch (from 0)
        self.stale: str | None = None  # why the last epoch drawn ahead was drawn again
        self.workers = 0  # the workers the epochs are striped for (a ChunkShuffleSampler)
        self._first: Any = None  # the first batch of the epoch just begun

    def new_epoch(self, workers: int) -> bool:
        """The loop starts its next epoch. False when the loader must start again from here:
        the last epoch was left before its end (what was drawn after it is dropped, as torch
        drops an epoch left early), or the epoch drawn ahead is not the one torch would draw
        now (``loading.draws``)."""
        self.workers = workers
        self.number += 1
        self.stale = None
        if self.epochs:
            end = self.epochs[0][1]
            if end is not None and self.delivered == end:
                self.epochs.pop(0)
                if not self.epochs:
                    self._begin(ahead=False)
                    return True
                self.stale = self.draws.check(len(self.draws.drawn) - 1)
                if self.stale is None:
                    return True  # drawn ahead, as torch would draw it now
                log.debug("autotune adapt: the epoch drawn ahead is drawn again: %s", self.stale)
            self._drop_ahead(self.epochs[-1][2] if self.epochs else None)
            self._begin(ahead=False)
            return False
        self._begin(ahead=False)
        return True

    def epoch_done(self) -> bool:
        """Every batch of the consumer's epoch was delivered. When all that was drawn was
        delivered and the epoch's end is not known yet (a loader without workers draws as it
        is asked), the next batch is drawn now to learn it: a loader started after this
        must begin the next epoch, not add to this one."""
        if not self.epochs:
            return False
        if self.epochs[0][1] is None and self._drawing() \
                and self.delivered >= self.offset + len(self.drawn):
            self._draw_one()
        end = self.epochs[0][1]
        return end is not None and self.delivered >= end

    def _drawing(self) -> bool:
        return self._first is not None or self.draws.drawing

    def _draw_one(self) -> None:
        """The next batch of the epoch being drawn, or its end."""
        batch, self._first = (self._first, None) if self._first is not None \
            else (self.draws.next(), None)
        if batch is None:
            self.epochs[-1][1] = self.offset + len(self.drawn)
        else:
            self.drawn.append(TaggedBatch(batch, self.epochs[-1][2].number))

    def _begin(self, *, ahead: bool) -> None:
        sampler = getattr(self.source, "sampler", None)
        if isinstance(sampler, ChunkShuffleSampler):  # each worker its own chunks again
            sampler.num_workers = self.workers
        self._first = self.draws.begin(ahead=ahead, number=self.number + int(ahead))
        self.epochs.append([self.offset + len(self.drawn), None, self.draws.drawn[-1]])
        if self._first is None:
            self.epochs[-1][1] = self.epochs[-1][0]  # an empty epoch

    def _drop_ahead(self, unserved: Any) -> None:
        """Forget what was drawn after the delivered batches; the sampler goes back to
        ``unserved``, the epoch drawn ahead and not served (None: none)."""
        for k, drawn in enumerate(self.draws.drawn):
            if drawn is unserved:
                self.draws.give_back(k)
        self.epochs.clear()
        self._first = None
        self.draws = EpochDraws(self.source, self.dataset)
        self.drawn, self.offset, self.start = [], self.delivered, self.delivered

    def state(self, unreceived: int = 0) -> dict[str, Any]:
        """The consumer's epoch, the batches of it delivered (``unreceived``: of those, the
        ones a wrapper holds ahead) and what decides its order (``loading.epochs``'s form)."""
        sampler = getattr(self.source, "sampler", self.source)
        first, end, drawn = self.epochs[0] if self.epochs else (self.delivered, None, None)
        handed = self.delivered - first - unreceived
        random, sampler_epoch, number = None, None, max(self.number, 0)
        ended = drawn is None or (end is not None and self.delivered - unreceived >= end) \
            or handed >= len(self.source)
        if drawn is not None and ended:
            if self.epochs[0][1] is None and len(self.epochs) == 1:
                self.epoch_done()  # draws to its end: that decides the next epoch
            number, handed, random = self.number + 1, 0, drawn.end
            if hasattr(sampler, "_next_epoch") and isinstance(drawn.sampler_epoch, int):
                sampler_epoch = drawn.sampler_epoch + 1
        elif drawn is not None:
            random, sampler_epoch = drawn.inputs.random, drawn.sampler_epoch
        return {"version": STATE_VERSION, "epoch": number, "batches_delivered": max(handed, 0),
                "sampler": type(sampler).__name__, "sampler_epoch": sampler_epoch,
                "random_state": base64.b64encode(random).decode() if random else None,
                "lengths": list(epoch_inputs(self.source, sampler, self.dataset,
                                             None).lengths)}

    def check(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` checked against this order (a clear error for another dataset, batch
        count or sampler), as ``loading.epochs`` checks a loader's."""
        sampler = getattr(self.source, "sampler", self.source)
        here = list(epoch_inputs(self.source, sampler, self.dataset, None).lengths)
        return check_state(state, here, type(sampler).__name__,
                           random_source(sampler) is not None)

    def restart(self, state: dict[str, Any]) -> int:
        """Draw the saved epoch again and skip its delivered batches (not loaded); returns
        the loader's epoch count (from 1) to go on with."""
        sampler = getattr(self.source, "sampler", self.source)
        if isinstance(state["sampler_epoch"], int) and hasattr(sampler, "_next_epoch"):
            sampler.epoch = sampler._next_epoch = state["sampler_epoch"]
        elif isinstance(state["sampler_epoch"], int) and isinstance(sampler, DistributedSampler):
            sampler.set_epoch(state["sampler_epoch"])
        self.epochs.clear()
        self._first = None
        self.draws = EpochDraws(self.source, self.dataset)
        random = state["random_state"]
        if random is not None and self.draws.source is not None:
            raw = base64.b64decode(random)
            if self.draws.source.is_global:
                self.draws._redraw = raw
            else:
                self.draws.source.set(raw)
        self.drawn, self.offset = [], self.delivered
        self.number = int(state["epoch"])
        self._begin(ahead=False)
        for _ in range(int(state["batches_delivered"])):
            self._draw_one()
            if self.epochs[-1][1] is not None:
                break
        self.delivered = self.start = self.offset + len(self.drawn)
        return self.number + 1

    def batches_from(self, start: int) -> Iterator[list[Any]]:
        position = start
        while True:
            if self.delivered - self.offset > 1024:  # forget what was delivered
                cut = self.delivered - self.offset
                del self.drawn[:cut]
                self.offset += cut
            if position - self.offset < len(self.drawn):
                yield self.drawn[position - self.offset]
                position += 1
                continue
            if not self._drawing():
                if not (self.ahead and len(self.epochs) == 1 and self.epochs[0][1] is not None):
                    return
                self._begin(ahead=True)  # the next epoch, drawn ahead
                continue
            self._draw_one()


def _alike(a: Placement, b: Placement) -> bool:
    """The same placement, or splits whose shares differ by less than a move would."""
    return a.where == b.where and abs(a.cpu_share - b.cpu_share) < SHARE_STEP


def _with_notes(config: LoaderConfig, before: LoaderConfig) -> LoaderConfig:
    """``config`` with the notes of ``before`` it lacks (the sampler, the placement): the
    settings are resolved anew for a count, how the data is read stays."""
    kept = {name: reason for name, reason in before.reasons.items()
            if name not in SETTINGS and name not in config.reasons}
    return config.noted(**kept) if kept else config


def _own(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator for the order alone, seeded from the loader's: every new loader draws its
    workers' base seed from the loader's, and the order must not depend on how many did."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator().manual_seed(seed)


class _Remaining:
    """The batch sampler each built loader gets: the batches from ``start`` on (into the
    next epoch when drawing ahead); its length is the rest of the current epoch."""

    def __init__(self, order: _EpochOrder) -> None:
        self.order = order

    def __iter__(self) -> Iterator[list[Any]]:
        return self.order.batches_from(self.order.start)

    def __len__(self) -> int:
        first = self.order.epochs[0][0] if self.order.epochs else self.order.start
        return max(0, len(self.order.source) - (self.order.start - (first or 0)))


def _device_s(first: _Snapshot, now: _Snapshot) -> float | None:
    """The device's time for the window's steps, from the steps it completed meanwhile (its
    events complete a few steps behind the host)."""
    if first.device is None or now.device is None:
        return None
    seconds, steps = now.device[0] - first.device[0], now.device[1] - first.device[1]
    return seconds / steps * (now.steps - first.steps) if steps > 0 else None
