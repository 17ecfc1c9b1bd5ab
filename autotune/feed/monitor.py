"""Is training input-bound? ``StallMonitor`` times how long the loop waits for each batch
against the time it spends on the batch (the step), while the real job runs.

The stall fraction is the share of the loop's time spent inside ``iter()`` and ``next()``
(epoch starts count: starting workers is waiting too). The time between one pass's end and
the next ``iter()`` (validation, checkpoints) counts neither way. Worker CPU and memory and
GPU utilisation are sampled only when a summary is logged or a report is asked for, so the
per-batch cost is two clock reads (0.16% of a 1 ms step, measured in ``bench/adapt.py``).
"""

from __future__ import annotations

import collections
import logging
import statistics
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .._check import check_seconds
from .._lifecycle import Closeable, close_if_closable
from ..errors import AutotuneError, InvalidConfigError
from ..policy import stall
from ..system import usage
from ..system.cuda import canonical_device

log = logging.getLogger("autotune.monitor")  # the name users configure (kept when it moved)

HISTORY = 100_000  # per-batch times kept for percentiles and plots (the latest ones)
DEFAULT_LOG_EVERY_S = 60.0


@dataclass(frozen=True, kw_only=True)
class StallReport:
    """What a monitored loop did. Times in seconds; ``None`` where unknown.

    Counted since the first pass or the last ``StallMonitor.reset()``; a step still running
    counts up to the report. The time between one pass's end and the next ``iter()``
    (validation, checkpoints) counts neither way.

    Attributes:
        name: the monitor's label (``None`` if it was given none).
        steps: batches whose step has ended.
        passes: ``iter()`` calls (epochs).
        wall_s: ``wait_s + step_s``: the loop's time inside its passes.
        wait_s: time spent inside ``iter()`` and ``next()`` waiting for data (starting
            workers included).
        start_wait_s: the part of ``wait_s`` spent on each pass's first batch (``iter()``
            and its first ``next()``): worker start-up and the first prefetch.
        step_s: time from a batch being handed out to the loop asking for the next.
        wait_mean_s, wait_p50_s, wait_p95_s: mean, median and 95th percentile of the wait
            for one batch (a pass's first batch with its ``iter()``), over the latest
            100,000 batches; ``None`` before the first batch.
        step_mean_s, step_p50_s, step_p95_s: the same for one step; ``None`` before the
            first step ended.
        stall_fraction: ``wait_s / wall_s``, a fraction 0-1 (0.0 before anything was
            timed).
        verdict: ``"input-bound"`` above 0.20, ``"moderately input-bound"`` from 0.05 to
            0.20, else ``"not input-bound"`` (TensorFlow profiler's thresholds).
        num_workers: the loader's ``num_workers``; ``None`` when the iterable has none.
        workers_cpu: CPUs that this process's child processes (the workers) kept busy on
            average since the first pass, e.g. 3.5; ``None`` when ``num_workers`` is 0.
        workers_memory_bytes: the most memory (PSS, bytes) the child processes used at a
            report or periodic log (only then is it read); ``None`` when ``num_workers``
            is 0.
        gpu_utilization: percent (0-100) of time the GPU ran a kernel: the mean of NVML
            readings taken every half second while the loop runs (``usage.GpuSampler``);
            ``None`` without a CUDA device or NVML.
        gpu_utilization_p50: the median of the same readings.
        suggestion: what to change, in words (``policy.stall.suggestion``).
        loaders: a ``MultiLoader``'s report only: each loader's ``batches``, ``wait_s``,
            ``wait_mean_s`` (``None`` before its first batch) and ``num_workers``, by name;
            ``None`` otherwise.
    """

    name: str | None
    steps: int
    passes: int
    wall_s: float
    wait_s: float
    start_wait_s: float
    step_s: float
    wait_mean_s: float | None
    wait_p50_s: float | None
    wait_p95_s: float | None
    step_mean_s: float | None
    step_p50_s: float | None
    step_p95_s: float | None
    stall_fraction: float
    verdict: str
    num_workers: int | None
    workers_cpu: float | None
    workers_memory_bytes: int | None
    gpu_utilization: float | None
    suggestion: str
    loaders: Mapping[str, Mapping[str, Any]] | None = None
    gpu_utilization_p50: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: what the periodic log says."""
        label = f"{self.name}: " if self.name else ""
        line = (f"{label}{self.steps} steps, stall {self.stall_fraction:.1%} ({self.verdict}); "
                f"wait p50 {_ms(self.wait_p50_s)} p95 {_ms(self.wait_p95_s)}, "
                f"step p50 {_ms(self.step_p50_s)}")
        if self.num_workers is not None:
            line += f"; {self.num_workers} workers"
        if self.workers_cpu is not None:
            line += f" using {self.workers_cpu:.1f} CPUs"
        if self.gpu_utilization is not None:
            line += f"; GPU {self.gpu_utilization:.0f}% busy"
            if self.gpu_utilization_p50 is not None:
                line += f" (median {self.gpu_utilization_p50:.0f}%)"
        return line

    def __str__(self) -> str:
        return f"{self.summary()}\n  suggestion: {self.suggestion}"


class StallClock:
    """Accumulates waits and steps from timestamps; the monitor and the Lightning callback
    feed it. ``waited(start, end, batch)``: the loop waited from start to end, and got a batch
    (a step begins at ``end``) or not (a pass ended; no step runs until the next batch)."""

    def __init__(self) -> None:
        self.steps = 0
        self.passes = 0
        self.wait_s = 0.0
        self.start_wait_s = 0.0  # the part of wait_s spent on each pass's first batch
        self.step_s = 0.0
        self.waits: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self.step_times: collections.deque[float] = collections.deque(maxlen=HISTORY)
        self._open: float | None = None  # when the running step began
        self._carry = 0.0  # the iter() time a pass's first batch waits on top of its next()
        self._first = False  # the next batch is its pass's first

    def began(self, start: float, end: float) -> None:
        """A pass (``iter()``) began at ``start`` and was ready at ``end``."""
        self._close_step(start)
        self.passes += 1
        self._first = True
        self._carry += end - start
        self.wait_s += end - start

    def waited(self, start: float, end: float, batch: bool) -> None:
        self._close_step(start)
        self.wait_s += end - start
        if batch:
            self.waits.append(end - start + self._carry)
            if self._first:
                self.start_wait_s += end - start + self._carry
                self._first = False
            self._carry = 0.0
            self._open = end

    def _close_step(self, now: float) -> None:
        if self._open is not None:
            self.step_s += now - self._open
            self.step_times.append(now - self._open)
            self.steps += 1
            self._open = None

    @property
    def stepping(self) -> bool:
        """A step is running (a batch was handed out and the loop has not come back)."""
        return self._open is not None

    def totals(self, now: float | None = None) -> tuple[int, float, float]:
        """(steps, wait_s, step_s) so far, a running step counted up to ``now``."""
        running = 0.0 if self._open is None or now is None else max(0.0, now - self._open)
        return self.steps, self.wait_s, self.step_s + running


class StallMonitor(Closeable):
    """Iterate this instead of the loader: same batches, timed.

    Args:
        iterable: the loader (any iterable of batches; a ``DataLoader`` tells its workers).
        name: a label for logs and reports.
        device: where the step runs (``"cuda:0"``); its GPU's utilisation is read through
            NVML where present. Default: the current CUDA device if torch sees one.
        log_every_s: a one-line summary through ``logging`` (logger ``autotune.monitor``,
            INFO) at most this often; ``None`` for none.

    Example::

        monitor = autotune.StallMonitor(loader, name="train")
        for epoch in range(3):
            for batch in monitor:
                train_step(batch)
        print(monitor.report())   # stall_fraction, verdict, suggestion, ...
    """

    def __init__(self, iterable: Iterable[Any], *, name: str | None = None,
                 device: Any = None, log_every_s: float | None = DEFAULT_LOG_EVERY_S) -> None:
        if not hasattr(iterable, "__iter__"):
            raise InvalidConfigError(
                f"iterable={iterable!r} is not iterable: pass the DataLoader (or any iterable "
                "of batches) the training loop iterates")
        if name is not None and not isinstance(name, str):
            raise InvalidConfigError(f"name={name!r} must be a string or None")
        if log_every_s is not None:
            check_seconds("log_every_s", log_every_s)
        self.iterable = iterable
        self.name = name
        self.log_every_s = log_every_s
        self.clock = StallClock()
        self._device = _check_device(device)
        self._gpu: usage.GpuSampler | None = None
        self._cpu_start: float | None = None
        self._wall_start: float | None = None
        self._memory_peak: int | None = None
        self._next_log = float("inf")

    def __iter__(self) -> Iterator[Any]:
        start = time.perf_counter()
        iterator = iter(self.iterable)
        self.began(start, time.perf_counter())
        return _Timed(iterator, self)

    def began(self, start: float, end: float) -> None:
        """A pass began at ``start`` (``time.perf_counter()``) and was ready at ``end``.
        Iterating calls this; a framework that owns the loop (the Lightning callback) calls
        it and ``waited`` itself."""
        if self._wall_start is None:
            self._wall_start = start
            self._cpu_start = usage.children_cpu_seconds()
            self._start_gpu()
            if self.log_every_s is not None:
                self._next_log = start + self.log_every_s
        self.clock.began(start, end)

    def waited(self, start: float, end: float, batch: bool = True) -> None:
        """The loop waited from ``start`` to ``end`` and got a batch (or the pass ended)."""
        self.clock.waited(start, end, batch)
        if end >= self._next_log:
            self._log(end)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]  # TypeError like torch's if none

    def __getattr__(self, name: str) -> Any:
        if name == "iterable":
            raise AttributeError(name)
        return getattr(self.iterable, name)

    def reset(self) -> None:
        """Forget what was timed so far (e.g. after a warm-up epoch); a pass running goes on
        being timed from now."""
        self.clock = StallClock()
        if self._gpu is not None:
            self._gpu.clear()
        self._memory_peak = None
        self._wall_start = time.perf_counter()
        self._cpu_start = usage.children_cpu_seconds()

    def report(self) -> StallReport:
        """What the loop did so far (a step still running counts up to now)."""
        self._sample()
        now = time.perf_counter()
        steps, wait_s, step_s = self.clock.totals(now)
        wall = wait_s + step_s
        fraction = wait_s / wall if wall > 0 else 0.0
        workers = getattr(self.iterable, "num_workers", None)
        workers = workers if isinstance(workers, int) else None
        cpu = None
        if workers != 0 and self._cpu_start is not None and self._wall_start is not None:
            elapsed = now - self._wall_start
            cpu = (usage.children_cpu_seconds() - self._cpu_start) / elapsed if elapsed else None
        waits, step_times = list(self.clock.waits), list(self.clock.step_times)
        gpu = self._gpu.samples() if self._gpu is not None else []
        wait_p50, wait_p95 = _percentiles(waits)
        step_p50, step_p95 = _percentiles(step_times)
        return StallReport(
            name=self.name, steps=steps, passes=self.clock.passes, wall_s=wall, wait_s=wait_s,
            start_wait_s=self.clock.start_wait_s, step_s=step_s, wait_mean_s=_mean(waits),
            wait_p50_s=wait_p50, wait_p95_s=wait_p95,
            step_mean_s=_mean(step_times), step_p50_s=step_p50, step_p95_s=step_p95,
            stall_fraction=fraction, verdict=stall.verdict(fraction), num_workers=workers,
            workers_cpu=cpu, workers_memory_bytes=self._memory_peak if workers != 0 else None,
            gpu_utilization=_mean(gpu), gpu_utilization_p50=_percentiles(gpu)[0],
            suggestion=stall.suggestion(fraction, steps=steps, num_workers=workers,
                                        workers_cpu=cpu,
                                        cpu_budget=_cpu_budget(), wait_s=wait_s,
                                        start_wait_s=self.clock.start_wait_s,
                                        passes=self.clock.passes,
                                        wait_p50_s=wait_p50 or 0.0, wait_p95_s=wait_p95 or 0.0))

    def history(self) -> tuple[list[float], list[float]]:
        """(waits, steps) per batch, the latest ``HISTORY``: for a plot of stall over steps."""
        return list(self.clock.waits), list(self.clock.step_times)

    def release(self) -> None:
        """Release what the monitor itself holds (NVML); the wrapped loader stays open."""
        if self._gpu is not None:
            self._gpu.stop()
            self._gpu = None

    def close(self) -> None:
        """``release()``, and close the wrapped loader if it can be closed."""
        self.release()
        close_if_closable(self.iterable)

    def __repr__(self) -> str:
        return f"StallMonitor({self.iterable!r}, name={self.name!r})"

    def _sample(self) -> None:
        """The slow reading, worker memory (logs and reports only); the GPU sampler starts
        here too if no pass has begun yet."""
        memory = usage.process_memory_bytes(children_only=True)
        self._memory_peak = max(self._memory_peak or 0, memory)
        self._start_gpu()

    def _start_gpu(self) -> None:
        """GPU utilisation, read in the background from the first pass on (a CUDA device)."""
        if self._gpu is None:
            index = _gpu_index(self._device)
            if index is not None:
                self._gpu = usage.GpuSampler(index)
                self._gpu.start()
                weakref.finalize(self, self._gpu.stop)  # a monitor never closed

    def _log(self, now: float) -> None:
        self._next_log = now + (self.log_every_s or float("inf"))
        log.info("autotune stall %s", self.report().summary())


class Epochs:
    """An iterable whose every ``iter()`` is one call of its owner's ``_epoch()``, telling
    the owner's ``num_workers``: what a wrapper that makes its own epochs
    (``AdaptiveLoader``, ``MultiLoader``) hands its monitor. It holds the owner weakly: a
    wrapper dropped without ``close()`` is freed at once, and its workers stop with it, not
    at some later garbage collection."""

    def __init__(self, owner: Any) -> None:
        self._owner = weakref.ref(owner)

    def __iter__(self) -> Iterator[Any]:
        owner = self._owner()
        if owner is None:
            raise AutotuneError("the loader this monitor watched was dropped (its workers "
                                "stopped with it): keep the loader and iterate it")
        return owner._epoch()

    @property
    def num_workers(self) -> int:
        owner = self._owner()
        return owner.num_workers if owner is not None else 0


class _Timed:
    """One pass: the wrapped iterator with each ``next()`` timed."""

    __slots__ = ("_clock", "_iterator", "_monitor", "_pass")

    def __init__(self, iterator: Iterator[Any], monitor: StallMonitor) -> None:
        self._iterator = iterator
        self._monitor = monitor
        self._clock, self._pass = monitor.clock, monitor.clock.passes

    def __del__(self) -> None:
        """Left before its end (``break``): the step running ends now, what follows counts
        neither way (unless another pass began since)."""
        clock = self._clock
        if clock is self._monitor.clock and clock.passes == self._pass and clock.stepping:
            now = time.perf_counter()
            clock.waited(now, now, False)

    def __iter__(self) -> _Timed:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            batch = next(self._iterator)
        except BaseException:  # the end, or an error: what was waited for counts, no step
            self._monitor.waited(start, time.perf_counter(), False)
            raise
        self._monitor.waited(start, time.perf_counter(), True)
        return batch


def _check_device(device: Any) -> Any:
    """``device`` as a ``torch.device`` (None stays None); never initialises CUDA."""
    import torch

    if device is None:
        return None
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as exc:
        raise InvalidConfigError(
            f"device={device!r} is not a torch device: pass e.g. 'cuda:0', 'cpu' or None "
            f"({exc})") from None


def _gpu_index(device: Any) -> int | None:
    """The CUDA device index to read utilisation from, or None (a CPU, or no GPU in use).
    Without a device: the current CUDA device if this process already uses CUDA (asking
    torch earlier would start CUDA here, before a launcher forks or picks the device)."""
    import torch

    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.current_device()
        return None
    if device.type != "cuda":
        return None
    index = canonical_device(device).index  # "cuda": the current device, as torch runs it
    return index if index is not None else 0


def _cpu_budget() -> int:
    from ..system.hardware import probe_hardware

    return probe_hardware().cpu_budget


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"
