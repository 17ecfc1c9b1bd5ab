"""Pure judgements on an input stall: the verdict and what to try next.

The thresholds are TensorFlow profiler's: a job waiting for input more than 20% of its step
time is input-bound, 5-20% moderately, less is not.
"""

from __future__ import annotations

INPUT_BOUND = 0.20
MODERATE = 0.05
VERDICTS = ("input-bound", "moderately input-bound", "not input-bound")
CPU_SATURATED = 0.85  # workers using this share of the CPU budget leave no room for more
BURSTY = 4.0  # a p95 wait this many times the median: batches arrive in bursts
IDLE_STALL = 0.01  # below this, the loader has slack
START_SHARE = 0.5  # epoch starts holding this share of the wait are the problem


def verdict(stall_fraction: float) -> str:
    """``input-bound`` above 20%, ``moderately input-bound`` from 5% to 20%, else not."""
    if stall_fraction > INPUT_BOUND:
        return VERDICTS[0]
    if stall_fraction >= MODERATE:
        return VERDICTS[1]
    return VERDICTS[2]


def suggestion(stall_fraction: float, *, num_workers: int | None, workers_cpu: float | None,
               cpu_budget: int, wait_p50_s: float, wait_p95_s: float, wait_s: float = 0.0,
               start_wait_s: float = 0.0, passes: int = 0, steps: int | None = None) -> str:
    """What to change, in words, from what the monitor saw. ``start_wait_s``: the part of
    ``wait_s`` spent on the passes' first batches."""
    if steps == 0:
        return "no step timed yet: iterate the monitor and report after some steps"
    if stall_fraction < MODERATE:
        text = "the step is the bottleneck: data arrives in time"
        if num_workers and stall_fraction < IDLE_STALL:
            text += (f"; fewer than {num_workers} workers may keep up too "
                     "(adapt=True finds the fewest)")
        return text
    if num_workers and passes and wait_s > 0 and start_wait_s >= START_SHARE * wait_s:
        return (f"most of the wait is each epoch's first batch ({start_wait_s / passes * 1e3:.0f} "
                f"ms a pass): workers start (or restart) and torch does not prefetch across "
                "epochs; persistent_workers=True avoids restarts, and the share shrinks with "
                "longer epochs; within an epoch the data keeps up")
    if num_workers == 0:
        return ("load in worker processes: the main process makes every batch while the step "
                "waits (set num_workers, or adapt=True to size them while training)")
    if workers_cpu is not None and workers_cpu >= CPU_SATURATED * cpu_budget:
        return (f"the workers already use {workers_cpu:.1f} of {cpu_budget} CPUs: more workers "
                "will not help; make samples cheaper (decode or augment less, cache decoded "
                "samples) or move augmentation to the accelerator")
    if wait_p50_s > 0 and wait_p95_s > BURSTY * wait_p50_s:
        return (f"batches arrive in bursts (wait p95 {wait_p95_s * 1e3:.1f} ms vs median "
                f"{wait_p50_s * 1e3:.1f} ms): a deeper prefetch_factor smooths them, more "
                "workers if that is not enough")
    spare = "" if workers_cpu is None else f" (they use {workers_cpu:.1f} of {cpu_budget} CPUs)"
    return f"more workers: the workers cannot keep up{spare}, so samples wait on I/O or start-up"
