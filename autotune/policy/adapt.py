"""Pure decisions of the re-tuner that runs while training: from what the last window of steps
showed, how many workers the loader should have.

The model: one batch costs a worker ``batch_s`` seconds (measured inside the workers, or the
main process's whole wait when it loads alone); a step takes ``step_s``, the longer of the
host's time in the loop body and the device's time for the same steps (a GPU step runs
after the host has launched it); so about ``batch_s / step_s`` workers hand over a batch
per step, and ``GROW_HEADROOM`` covers the spread. A batch whose cost is CPU time gets no
more workers than the CPUs the training process leaves them: more processes only share
them. A growth that did not make the loop faster is taken back, and not tried again.
Grow while the loop is at least moderately input-bound and the workers are busy (and have
CPU left to use); shrink when the workers sit idle, but never to or below a count
that was already seen short of workers. Idle workers and a waiting loop mean the wait is the
main process receiving batches (about 2 ms a batch measured here), which no worker fixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .stall import CPU_SATURATED, MODERATE

GROW_HEADROOM = 1.3  # workers for the step, with this margin
IDLE_BUSY = 0.5  # workers busy less than this share of the time are more than needed
MAIN_PROCESS_SHARE = 0.02  # load in the main process when a batch costs less than this
                           # share of a step
CPU_BOUND = 0.5  # worker CPU seconds per busy second from which a batch's cost is CPU time
NO_GAIN = 0.05  # a growth that made the loop less than this much faster gave nothing


@dataclass(frozen=True, kw_only=True)
class Window:
    """What the loop did over the last steps with ``workers`` workers."""

    workers: int
    steps: int
    wait_s: float  # inside next(), in all
    step_s: float  # in the loop body, in all
    busy_s: float | None = None  # inside the dataset, summed over the workers
    cpu_used: float | None = None  # CPUs the workers kept busy on average
    main_cpu: float | None = None  # CPUs the training process itself kept busy on average
    device_s: float | None = None  # the device's time for the same steps (CUDA events)
    cpu_fraction: float | None = None  # computing share of a sample, measured beforehand

    @property
    def stall(self) -> float:
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    @property
    def busy_share(self) -> float | None:
        """The share of the window the average worker spent making samples."""
        total = self.wait_s + self.step_s
        if self.busy_s is None or self.workers == 0 or total <= 0:
            return None
        return self.busy_s / (self.workers * total)

    @property
    def step(self) -> float:
        """Seconds one step takes: the host's, or the device's when that is longer."""
        return max(self.step_s, self.device_s or 0.0) / self.steps

    @property
    def rate(self) -> float:
        """Steps per second over the window."""
        total = self.wait_s + self.step_s
        return self.steps / total if total > 0 else 0.0

    @property
    def cpu_per_busy(self) -> float | None:
        """Worker CPU seconds per second the workers were busy: near 1 when a batch's cost
        is computing, near 0 when it is waiting (storage, sleep)."""
        total = self.wait_s + self.step_s
        if self.cpu_used is None or not self.busy_s or total <= 0:
            return None
        return self.cpu_used * total / self.busy_s


@dataclass(frozen=True, kw_only=True)
class Change:
    workers: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Tried:
    """A growth made, and the loop's rate (steps/s) before it."""

    before: int
    after: int
    rate_before: float


def decide(window: Window, *, cap: int, cpu_budget: int, stalled_at: int = -1,
           tried: Tried | None = None, ceiling: int | None = None) -> Change | None:
    """The worker count for the next window, or None to keep the current one.

    Workers busy less than ``IDLE_BUSY`` of the time are not what the loop waits for (a
    batch still costs the main process its transfer): never grow then, shrink to what the
    step needs. Otherwise grow while the loop is at least moderately input-bound and the
    model asks for more workers than there are.

    Args:
        window: the last window; it must hold at least one step.
        cap: the most workers the hardware budget allows (RAM, /dev/shm, CPUs).
        cpu_budget: CPUs this process may use.
        stalled_at: the largest count already seen short of workers (``short_of_workers``).
        tried: the last growth, when ``window`` is the first full window after it: taken
            back if the loop did not get faster by more than ``NO_GAIN``.
        ceiling: a count a growth gave nothing at: never grow to it or beyond.
    """
    if window.steps < 1 or window.step_s <= 0:
        return None
    if tried is not None and window.workers == tried.after > tried.before \
            and window.rate < tried.rate_before * (1 + NO_GAIN):
        return Change(workers=tried.before, reason=(
            f"{tried.after} workers gave no gain: {window.rate:.1f} steps/s against "
            f"{tried.rate_before:.1f} with {tried.before}; back to {tried.before}"))
    step = window.step
    batch = _batch_s(window)
    workers = window.workers
    wanted = math.ceil(GROW_HEADROOM * batch / step)
    busy = window.busy_share
    if busy is not None and busy < IDLE_BUSY:
        tiny = batch < MAIN_PROCESS_SHARE * step and stalled_at < 0
        target = 0 if tiny else max(1, wanted, stalled_at + 1)
        if target >= workers:
            return None
        return Change(workers=target, reason=(
            f"workers idle: busy {busy:.0%} of the time (the loop waited {window.stall:.1%}); "
            f"a batch costs {_ms(batch)} of a worker and a step takes {_ms(step)}, so "
            f"{target} worker(s) keep up"))
    if window.stall < MODERATE or workers >= cap:
        return None
    if workers and window.cpu_used is not None \
            and window.cpu_used + (window.main_cpu or 0.0) >= CPU_SATURATED * cpu_budget:
        return None  # workers and the training process fill the CPUs: more would share them
    target = min(cap, wanted)
    if ceiling is not None:
        target = min(target, ceiling - 1)
    so = f"so {target} workers hand over a batch per step"
    cpu_room = cpu_for_workers(window, cpu_budget)
    if cpu_room is not None and target > cpu_room:
        target = cpu_room
        so = (f"so {wanted} would hand over a batch per step, but its cost is CPU time: "
              f"{target}, the CPUs the training process leaves")
    if target <= workers:  # enough workers for the step: the wait is transfer or bursts
        return None
    return Change(workers=target, reason=(
        f"input-bound: waited {window.stall:.0%} of {window.steps} steps; a batch costs "
        f"{_ms(batch)} of a worker and a step takes {_ms(step)}, {so}"))


def cpu_for_workers(window: Window, cpu_budget: int) -> int | None:
    """The most workers worth having when a batch's cost is CPU time: the CPUs left once the
    training process has its share (None: the cost is not CPU time, or unknown)."""
    total = window.wait_s + window.step_s
    if window.workers == 0:  # the training process loads: its CPU while waiting is loading
        if window.main_cpu is None or total <= 0 or window.wait_s <= 0:
            return None
        cpu_s = window.main_cpu * total
        if min(cpu_s, window.wait_s) < CPU_BOUND * window.wait_s \
                and (window.cpu_fraction or 0.0) < CPU_BOUND:
            return None
        return max(1, round(cpu_budget - max(0.0, cpu_s - window.wait_s) / total))
    computing = max(window.cpu_per_busy or 0.0, window.cpu_fraction or 0.0)
    if computing < CPU_BOUND:  # other processes on the CPUs make a reading look lower
        return None
    return max(1, round(cpu_budget - (window.main_cpu or 0.0)))


def short_of_workers(window: Window) -> bool:
    """The loop waited at least moderately and the workers (if any) were busy: more of them
    would have helped. The re-tuner never shrinks to a count seen like this."""
    busy = window.busy_share
    return window.stall >= MODERATE and (busy is None or busy >= IDLE_BUSY)


def _batch_s(window: Window) -> float:
    """Seconds one batch costs whoever loads it."""
    if window.workers == 0 or window.busy_s is None:
        # alone, the main process loads while the step waits; with workers and no meter,
        # all of them busy for every batch when input-bound
        per_batch = window.wait_s / window.steps
        return per_batch if window.workers == 0 else \
            window.workers * (window.wait_s + window.step_s) / window.steps
    return window.busy_s / window.steps


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"
