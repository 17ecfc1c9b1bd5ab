"""Pure decisions of the re-tuner that runs while training: from what the last window of steps
showed, how many workers the loader should have.

The model: one batch costs a worker ``batch_s`` seconds (measured inside the workers, or the
main process's whole wait when it loads alone); a step takes ``step_s``; so about
``batch_s / step_s`` workers hand over a batch per step, and ``GROW_HEADROOM`` covers the
spread. Grow while the loop is at least moderately input-bound and the workers are busy
(and have CPU left to use); shrink when the workers sit idle, but never to or below a count
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


@dataclass(frozen=True, kw_only=True)
class Window:
    """What the loop did over the last steps with ``workers`` workers."""

    workers: int
    steps: int
    wait_s: float  # inside next(), in all
    step_s: float  # in the loop body, in all
    busy_s: float | None = None  # inside the dataset, summed over the workers
    cpu_used: float | None = None  # CPUs the workers kept busy on average

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


@dataclass(frozen=True, kw_only=True)
class Change:
    workers: int
    reason: str


def decide(window: Window, *, cap: int, cpu_budget: int, stalled_at: int = -1) -> Change | None:
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
    """
    if window.steps < 1 or window.step_s <= 0:
        return None
    step = window.step_s / window.steps
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
    if workers and window.cpu_used is not None and window.cpu_used >= CPU_SATURATED * cpu_budget:
        return None  # more processes would only share the same CPUs
    target = min(cap, wanted)
    if target <= workers:  # enough workers for the step: the wait is transfer or bursts
        return None
    return Change(workers=target, reason=(
        f"input-bound: waited {window.stall:.0%} of {window.steps} steps; a batch costs "
        f"{_ms(batch)} of a worker and a step takes {_ms(step)}, so {target} workers hand "
        f"over a batch per step"))


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
