"""One measurement: a LoaderConfig on the real dataset, in steady state.

Builds the loader users get (``loading.builder``: same wrapper, worker start-up, crash
naming) with persistent workers, discards the start-up and the first prefetch burst, then
counts samples over a window, optionally feeding a consumer (a simulated step or the user's
``train_step``). Many workers on few CPUs finish their batches together, so batches come in
bursts one round of workers apart: the window spans at least ``ROUNDS`` rounds
(``ROUNDS x num_workers`` batches), so that one burst cannot pass for a fast setting.
A stream (``IterableDataset``) is counted over whole epochs when they are short enough
(``_WholeEpochs``). Records samples/s, time to the first batch, peak memory of the main
process and its workers (PSS, so shared pages count once), CPU use and input stall. The
workers are stopped when the trial ends, not when the garbage collector finds them. A
trial that crashes, hangs or runs out of memory comes back failed, with the reason; it
never raises.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from .._check import is_stream
from ..config import GroupConfig, LoaderConfig
from ..feed.multi import MultiLoader, check_weights
from ..loading.builder import build_loader
from ..policy.joint import batch_shares
from ..records import Trial
from ..system.usage import CpuClock, PeakMemory

WARMUP_BATCHES = 2  # beyond the prefetch burst
ROUNDS = 3  # a window holds at least this many batches per worker ...
CONSUMER_STEPS = 10  # ... and, with a consumer, at least this many steps ...
MAX_WINDOW_FACTOR = 3  # ... unless that takes longer than this many windows
WAIT_MARGIN = 1.5  # a stream's trial waits for an epoch end it may reach by this many times
                   # the samples an earlier trial drew without one


def run_trial(dataset: Any, batch_size: int, config: LoaderConfig, *, phase: str,
              window_s: float, hang_s: float, collate_fn: Callable[..., Any] | None = None,
              consumer: Callable[[Any], None] | None = None,
              epoch: tuple[int | None, int] = (None, 0)) -> Trial:
    """Measure ``config``; never raises for what the dataset, its workers or the consumer do.

    ``epoch``: for a stream, what earlier trials saw of its epochs: (its samples, if one
    ended in a trial, and the most samples a trial drew without an end), ``_WholeEpochs``.
    """
    def build() -> DataLoader:
        return build_loader(dataset, batch_size, _bounded(config, hang_s), shuffle=True,
                            extra={"collate_fn": collate_fn})

    pace = _Pace(burst=config.num_workers * (config.prefetch_factor or 2),
                 rounds=ROUNDS * config.num_workers,
                 epochs=_WholeEpochs(*epoch) if is_stream(dataset) else None)
    return _run(build, config, pace, phase=phase, window_s=window_s, hang_s=hang_s,
                consumer=consumer)


def run_group_trial(datasets: Mapping[str, Any], batch_size: int, config: GroupConfig, *,
                    strategy: str, weights: Any, seed: int, phase: str, window_s: float,
                    hang_s: float, consumer: Callable[[Any], None] | None = None) -> Trial:
    """Measure a group: samples/s of the ``MultiLoader`` loop over every member's loader,
    as ``run_trial`` measures one (the consumer gets ``(name, batch)``). A member with a
    share ``p`` of the batches needs ``ROUNDS / p`` loop batches per round of its workers."""
    shares = batch_shares(strategy, check_weights(weights, list(datasets), strategy))

    def build() -> MultiLoader:
        loaders = {name: build_loader(datasets[name], batch_size, _bounded(member, hang_s),
                                      shuffle=True)
                   for name, member in config.members.items()}
        return MultiLoader(loaders, strategy=strategy, weights=weights, seed=seed)

    members = list(config.members.values())
    pace = _Pace(burst=sum(m.num_workers * (m.prefetch_factor or 2) for m in members),
                 rounds=max(math.ceil(ROUNDS * m.num_workers / share)
                            for m, share in zip(members, shares)),
                 count=lambda named: batch_length(named[1]))
    return _run(build, config, pace, phase=phase, window_s=window_s, hang_s=hang_s,
                consumer=consumer)


def _bounded(config: LoaderConfig, hang_s: float) -> LoaderConfig:
    """Workers that send nothing for ``hang_s`` fail the trial (torch's own timeout)."""
    return config.replace(timeout=hang_s) if config.num_workers > 0 else config


@dataclass(frozen=True)
class _Pace:
    """How a trial counts: batches to let pass as the prefetch burst, batches to count at
    least (rounds of the workers), a stream's epochs, and the samples in what it yields."""

    burst: int
    rounds: int
    epochs: _WholeEpochs | None = None
    count: Callable[[Any], int] = field(default=lambda batch: batch_length(batch))


def _run(build: Callable[[], Any], config: LoaderConfig | GroupConfig, pace: _Pace, *,
         phase: str, window_s: float, hang_s: float,
         consumer: Callable[[Any], None] | None) -> Trial:
    """Measure what ``build()`` makes in a thread of its own, bounded in time."""
    box: dict[str, Any] = {}
    stop = threading.Event()
    runner = threading.Thread(
        target=_measure_into, name="autotune-trial", daemon=True,
        args=(box, build, pace, window_s, consumer, stop))
    memory = PeakMemory()
    memory.start()
    runner.start()
    # The loader's own timeout catches hung workers; this catches a hang in this process
    # (a sample made in-process, collate_fn or the consumer that never returns).
    patience = (MAX_WINDOW_FACTOR + 1) * window_s + 4 * hang_s + 10
    runner.join(patience)
    stop.set()  # a runner that comes back later stops at once and closes its loader
    memory.stop()
    if runner.is_alive():
        return Trial(config=config, phase=phase, peak_memory_bytes=memory.peak,
                     error=f"hung: nothing came back for {patience:.0f} s (a sample made "
                     "in-process, collate_fn or the training step blocks)")
    if "result" not in box:
        return Trial(config=config, phase=phase, peak_memory_bytes=memory.peak,
                     error=box.get("error", "ended without a measurement"))
    return Trial(config=config, phase=phase, peak_memory_bytes=memory.peak, **box["result"])


def _measure_into(box: dict[str, Any], build: Callable[[], Any], pace: _Pace,
                  window_s: float, consumer: Callable[[Any], None] | None,
                  stop: threading.Event) -> None:
    loader = None
    try:
        loader = build()
        box["result"] = _steady_state(loader, pace, window_s, consumer, stop)
    except MemoryError:
        box["error"] = "out of memory in the main process"
    except BaseException as exc:  # the dataset's, the workers' or the consumer's failure
        box["error"] = _one_line(exc)
    finally:
        if loader is not None:
            try:
                loader.close()
            except Exception as exc:  # workers that died already: keep what was measured
                box.setdefault("error", _one_line(exc))


def _steady_state(loader: Any, pace: _Pace, window_s: float,
                  consumer: Callable[[Any], None] | None,
                  stop: threading.Event) -> dict[str, Any]:
    start = time.perf_counter()
    iterator = iter(loader)
    batch = next(iterator)
    first_batch_s = time.perf_counter() - start
    epochs = pace.epochs
    drawn = pace.count(batch)  # samples since the loader's (and its first epoch's) start
    for _ in range(pace.burst + WARMUP_BATCHES):  # prefetched batches arrive at once
        batch, iterator, ended = _next(iterator, loader, stop)
        if epochs is not None and ended:
            epochs.ended(drawn)
        drawn += pace.count(batch)
        if time.perf_counter() - start > window_s + first_batch_s:
            break
    if consumer is not None:  # the warm-up drained the queue: one step refills it, as in
        consumer(batch)       # training, so the window does not count the refill as a stall
    del batch
    cpu = CpuClock()
    samples = batches = 0
    waiting = 0.0
    enough = pace.rounds
    if consumer is not None:  # one slow step must not decide whether a setting keeps up
        enough = max(enough, CONSUMER_STEPS)
    began = time.perf_counter()
    while True:
        asked = time.perf_counter()
        batch, iterator, ended = _next(iterator, loader, stop)
        waiting += time.perf_counter() - asked
        if epochs is not None and ended:
            epochs.ended(drawn)
        size = pace.count(batch)
        samples += size
        drawn += size
        batches += 1
        if consumer is not None:
            consumer(batch)
        elapsed = time.perf_counter() - began
        cap = MAX_WINDOW_FACTOR * window_s
        if elapsed >= cap:
            break
        if elapsed >= window_s and batches >= enough and (
                epochs is None or epochs.done(samples, drawn, samples / elapsed,
                                              cap - elapsed)):
            break
    return {"samples_per_s": samples / elapsed, "first_batch_s": first_batch_s,
            "cpu_percent": cpu.percent(),
            "stall_fraction": waiting / elapsed if consumer is not None else None,
            "window_s": elapsed,
            "epoch_samples": epochs.first if epochs is not None else None,
            "samples_drawn": drawn if epochs is not None else None}


class _WholeEpochs:
    """Counts a stream over a whole number of epochs rather than a fixed window.

    A stream split across workers delivers its batches in epoch-sized waves: every worker
    starts together (a gap), the ones with more to read finish alone, and each drops its
    own partial batch. A window shorter than an epoch catches the smooth middle for some
    settings and the gap for others, and so ranks them wrongly (the stream runs in
    bench/RESULTS.md).
    The waves repeat every epoch, so any run of one epoch's worth of consecutive samples
    takes one epoch's time, wherever it starts: a trial that has counted its window goes on
    to the next whole multiple of the epoch's samples, if it can get there within
    ``MAX_WINDOW_FACTOR`` windows at the rate so far. The epoch's length comes from this
    trial (its loader's first epoch) or an earlier one (``epoch``); while no epoch end has
    been seen, a trial waits for one as long as it could come in time, judged by
    ``at_least`` (the most samples an earlier trial drew without seeing one). Longer epochs
    (a long stream) are counted over the window: their smooth middle is the steady state.
    """

    def __init__(self, epoch: int | None = None, at_least: int = 0) -> None:
        self.epoch, self.at_least = epoch, at_least
        self.first: int | None = None  # samples in the loader's first epoch
        self.target: int | None = None  # samples to count, once the window is done

    def ended(self, drawn: int) -> None:
        """An epoch ended after ``drawn`` samples since the loader started."""
        if self.first is None:
            self.first = drawn

    def done(self, counted: int, drawn: int, rate: float, seconds_left: float) -> bool:
        """Whether counting may stop now that the window is over."""
        reach = rate * seconds_left  # samples still to come before the cap
        epoch = self.first or self.epoch
        if epoch is None:  # wait for the first end while it may come in time
            return drawn + reach < WAIT_MARGIN * max(self.at_least, 1)
        if self.target is None:
            self.target = max(1, math.ceil(counted / epoch)) * epoch
            if counted + reach < self.target:
                self.target = counted  # not reachable in time: the window it is
        return counted >= self.target


def _next(iterator: Any, loader: Any, stop: threading.Event) -> tuple[Any, Any, bool]:
    """(the next batch, the iterator to go on with, whether an epoch just ended): a new
    epoch (same persistent workers) starts at the end of one. Raises once the trial was
    given up on."""
    if stop.is_set():
        raise TimeoutError("the trial was given up on")
    try:
        return next(iterator), iterator, False
    except StopIteration:
        iterator = iter(loader)
        return next(iterator), iterator, True


def batch_length(batch: Any) -> int:
    """Samples in a collated batch: the first dimension of its first tensor (or the length
    of a batch object that has one)."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, dict) and batch:
        return batch_length(next(iter(batch.values())))
    shape = getattr(batch, "shape", None)
    if shape:
        return int(shape[0])
    if hasattr(batch, "__len__") and not isinstance(batch, (str, bytes, dict)):
        return len(batch)  # a batch object that counts its samples (EncodedImages)
    return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
