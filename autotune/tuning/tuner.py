"""The autotuner: measure candidate settings on the real dataset and keep the winner.

The search walks the space ``LoaderConfig`` expresses, starting from the rules' choice:
a geometric ladder over workers (up from that choice, and down only when more workers did
not pay) that stops once throughput falls, a refinement between the best rung and its
better neighbour when they are far apart, then the thread budget,
prefetch depth and ordering on the best; the leading candidates are measured again so noise
does not crown a lucky trial. Every trial is a real DataLoader in steady state
(``trial.run_trial``); failures are recorded and never chosen.

With a consumer (``step_time_s`` or ``train_step``) the goal is no input stall: among the
settings that keep up, the cheapest (fewest workers, then least memory) wins. Without one,
the most samples per second wins.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..policy import rules
from ..config import TORCH_HAS_IN_ORDER, TUNED_SETTINGS, LoaderConfig
from ..errors import InvalidConfigError
from ..system.hardware import HardwareInfo, probe_hardware
from ..profiles import ProfileEntry, check_key, save_entry
from ..measure.trial import Trial, run_trial
from ..measure.workload import WorkloadProfile, measure_workload

DEFAULT_BUDGET_S = 60.0
STALL_OK = 0.05  # a consumer waiting for data less than this share of the time keeps up
NEAR_BEST = 0.95  # the ladder stops once a rung falls below this share of the best
REFINE_SPAN = 1.25  # refine between worker counts further apart than this ratio
CONFIRM_TOP = 3  # leading candidates measured a second time ...
CONFIRM_WITHIN = 0.9  # ... if their first run came within this share of the leader's
MIN_WINDOW_S, MAX_WINDOW_S = 0.5, 3.0
WINDOWS_PER_BUDGET = 30  # a trial's measuring window is about budget_s / this
CONSUMER_STEPS = 10  # a trial with a consumer runs at least this many steps
MIN_HANG_S = 10.0  # a batch slower than this (or 20x the measured batch time) is a hang


@dataclass(kw_only=True)
class TuningResult:
    best: LoaderConfig
    best_samples_per_s: float
    baseline_samples_per_s: float | None  # torch's defaults, measured in the same run
    trials: tuple[Trial, ...]
    elapsed_s: float
    batch_size: int
    key: str
    objective: str
    workload: WorkloadProfile
    hardware: HardwareInfo = field(repr=False)

    def save(self, profile_dir: str | os.PathLike[str] | None = None,
             key: str | None = None) -> Path:
        """Merge the winner into this host's profile (atomically; other keys are kept)."""
        key = check_key(key or self.key)
        measured = {
            "samples_per_s": round(self.best_samples_per_s, 1),
            "baseline_samples_per_s": None if self.baseline_samples_per_s is None
            else round(self.baseline_samples_per_s, 1),
            "batch_size": self.batch_size, "objective": self.objective,
            "trials": len(self.trials), "tuning_s": round(self.elapsed_s, 1),
            "tuned_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "torch": self.hardware.host.torch,
        }
        settings = {k: v for k, v in self.best.settings().items() if k in TUNED_SETTINGS}
        path = save_entry(self.hardware, key, ProfileEntry(settings=settings, measured=measured),
                          profile_dir)
        self.best = self.best.replace(source="profile")
        self.key = key
        return path

    def table(self) -> str:
        """Every trial, its samples/s, memory and CPU, and which one was chosen."""
        header = (f"{'#':>3} {'phase':<9} {'workers':>7} {'prefetch':>8} {'threads':>7} "
                  f"{'in_order':>8} {'samples/s':>10} {'1st batch':>9} {'memory':>9} "
                  f"{'CPU':>5} {'stall':>6}")
        lines = [header]
        for i, t in enumerate(self.trials, 1):
            c = t.config
            chosen = "  <- chosen" if _key(c) == _key(self.best) and t.ok else ""
            if not t.ok:
                chosen = f"  FAILED: {t.error}"
            lines.append(
                f"{i:>3} {t.phase:<9} {c.num_workers:>7} {_s(c.prefetch_factor):>8} "
                f"{_s(c.worker_threads):>7} {_s(c.in_order):>8} {_n(t.samples_per_s):>10} "
                f"{_f(t.first_batch_s, 's'):>9} {_mb(t.peak_memory_bytes):>9} "
                f"{_f(t.cpu_percent, '%', 0):>5} {_f(_pct(t.stall_fraction), '%', 0):>6}"
                f"{chosen}")
        base = self.baseline_samples_per_s
        gain = f" = {self.best_samples_per_s / base:.1f}x torch's defaults" if base else ""
        lines.append(f"best: {self.best_samples_per_s:,.0f} samples/s{gain}; "
                     f"{len(self.trials)} trials in {self.elapsed_s:.1f} s ({self.objective})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "best": self.best.to_dict(),
                "best_samples_per_s": self.best_samples_per_s,
                "baseline_samples_per_s": self.baseline_samples_per_s,
                "elapsed_s": self.elapsed_s, "batch_size": self.batch_size,
                "objective": self.objective, "workload": self.workload.to_dict(),
                "trials": [t.to_dict() for t in self.trials]}


class Autotuner:
    """Finds the best DataLoader settings for ``dataset`` on this machine by measuring."""

    def __init__(self, dataset: Any, batch_size: int, *, budget_s: float = DEFAULT_BUDGET_S,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 step_time_s: float | None = None,
                 train_step: Callable[[Any], Any] | None = None,
                 hardware: HardwareInfo | None = None, max_workers: int | None = None,
                 progress: bool | None = None, key: str | None = None,
                 hang_timeout_s: float | None = None) -> None:
        """``progress=None`` shows a progress line only when stderr is a terminal;
        ``hang_timeout_s`` is how long one batch may take before a trial counts as hung
        (default: 20 times the measured batch time, at least 10 s)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s <= 0:
            raise InvalidConfigError(f"budget_s={budget_s!r} must be a number of seconds > 0")
        if step_time_s is not None and (not isinstance(step_time_s, (int, float))
                                        or step_time_s < 0):
            raise InvalidConfigError(f"step_time_s={step_time_s!r} must be seconds >= 0")
        if step_time_s is not None and train_step is not None:
            raise InvalidConfigError("pass step_time_s or train_step, not both")
        if hang_timeout_s is not None and (not isinstance(hang_timeout_s, (int, float))
                                           or hang_timeout_s <= 0):
            raise InvalidConfigError(f"hang_timeout_s={hang_timeout_s!r} must be seconds > 0")
        if max_workers is not None and (isinstance(max_workers, bool)
                                        or not isinstance(max_workers, int) or max_workers < 0):
            raise InvalidConfigError(f"max_workers={max_workers!r} must be an integer >= 0")
        try:
            size = len(dataset)
        except TypeError:
            raise InvalidConfigError("the autotuner needs a map-style dataset with __len__, "
                                     f"got {type(dataset).__name__}") from None
        if size < 1:
            raise InvalidConfigError(f"len(dataset)={size}: the dataset is empty")
        from ..loading.factory import dataset_key

        self.dataset = dataset
        self.batch_size = batch_size
        self.budget_s = float(budget_s)
        self.collate_fn = collate_fn
        self.hardware = hardware or probe_hardware()
        self.max_workers = max_workers
        self.hang_timeout_s = hang_timeout_s
        self.key = check_key(key) if key is not None else dataset_key(dataset)
        self.step_time_s = step_time_s
        self.consumer = _consumer(step_time_s, train_step)
        self.objective = ("throughput" if self.consumer is None else
                          f"no stall with a {step_time_s * 1e3:g} ms step"
                          if step_time_s is not None else "no stall with train_step")
        self.progress = _Progress(sys.stderr.isatty() if progress is None else progress,
                                  self.budget_s)

    def run(self) -> TuningResult:
        """Measure, search, confirm; returns the winner and every trial."""
        self._start = time.perf_counter()
        self._trials: list[Trial] = []
        self._seen: dict[tuple[Any, ...], list[Trial]] = {}
        workload = measure_workload(self.dataset, collate_fn=self.collate_fn,
                                    max_seconds=min(1.0, self.budget_s / 10))
        self.workload = workload
        self.hints = rules.DatasetHints(dataset_size=len(self.dataset),
                                        batch_size=self.batch_size)
        cap = rules.max_workers(self.hardware, self.hints, workload)
        self.cap = cap if self.max_workers is None else min(cap, self.max_workers)
        batch_s = self.batch_size * max(workload.sec_per_sample,
                                        workload.single_thread_sec_per_sample or 0)
        self.window_s = trial_window_s(self.budget_s, batch_s, self.step_time_s or 0.0)
        self.hang_s = self.hang_timeout_s or max(MIN_HANG_S, 20 * batch_s)

        baseline = self._measure(LoaderConfig(reasons={}), "baseline")
        ruled = rules.recommend(self.hardware, self.hints, workload, workers=None)
        if ruled.num_workers > self.cap:
            ruled = self._config(self.cap)
        self._measure(ruled, "rules")
        start = ruled.num_workers
        if self.step_time_s:  # enough workers to hand over one batch per step, with margin
            start = math.ceil(1.2 * batch_s / self.step_time_s)
        self._ladder(start)
        best = self._leader()
        if best is not None and best.num_workers > 0:
            self._tune_threads(best)
            self._tune_prefetch()
            self._tune_order()
            self._tune_pinning()
        self._confirm()
        self.progress.done()
        winner = self._leader()
        if winner is None:
            raise InvalidConfigError(
                "every trial failed: " + "; ".join(sorted({t.error or "" for t in self._trials})))
        rate = _mean_rate(self._seen[_key(winner)])
        best_config = winner.replace(
            source="tuned", reason=f"measured best of {len(self._trials)} trials "
            f"({rate:,.0f} samples/s, {self.objective})", **winner.settings())
        return TuningResult(
            best=best_config, best_samples_per_s=rate,
            baseline_samples_per_s=baseline.samples_per_s if baseline.ok else None,
            trials=tuple(self._trials), elapsed_s=time.perf_counter() - self._start,
            batch_size=self.batch_size, key=self.key, objective=self.objective,
            workload=workload, hardware=self.hardware)

    # -- search steps ---------------------------------------------------------------

    def _ladder(self, start: int) -> None:
        """Geometric steps up from ``start`` while throughput rises, then down unless a step
        up beat the start (under a consumer, down while the setting still keeps up)."""
        start = min(max(1, start), self.cap) if self.cap else 0
        if start == 0:
            return
        first = self._measure(self._config(start), "ladder")
        n = start
        went_up = False
        while n < self.cap and not self._keeps_up(first) and self._has_time():
            n = min(self.cap, n * 2)
            trial = self._measure(self._config(n), "ladder")
            if trial.ok and (trial.samples_per_s or 0) > (first.samples_per_s or 0):
                went_up = True  # more workers beat the start: fewer will not
            if self._keeps_up(trial) or not self._improves(trial):
                break
        n = start
        while n > 1 and not (went_up and self.consumer is None) and self._has_time():
            n = max(1, n // 2)
            trial = self._measure(self._config(n), "ladder")
            if not (self._keeps_up(trial) if self.consumer else self._improves(trial)):
                break
        self._refine()

    def _refine(self) -> None:
        """One geometric midpoint between the best worker count and its better neighbour."""
        leader = self._leader()
        if leader is None or leader.num_workers == 0:
            return
        n = leader.num_workers
        rate: dict[int, float] = {}
        for trials in self._seen.values():
            for t in trials:
                if t.ok:
                    count = t.config.num_workers
                    rate[count] = max(rate.get(count, 0.0), t.samples_per_s or 0.0)
        neighbours = [c for c in (max((c for c in rate if c < n), default=None),
                                  min((c for c in rate if c > n), default=None)) if c is not None]
        if not neighbours:
            return
        other = max(neighbours, key=rate.__getitem__)
        if max(n, other) <= REFINE_SPAN * max(1, min(n, other)):
            return  # neighbours this close leave nothing worth a trial between them
        mid = round(math.sqrt(max(other, 1) * n))
        if mid not in (n, other) and self._has_time():
            self._measure(self._config(mid), "refine")

    def _tune_threads(self, best: LoaderConfig) -> None:
        """Capped vs uncapped native thread pools, when samples used several threads."""
        if self.workload.parallelism <= rules.PARALLEL_THRESHOLD or not self._has_time():
            return
        capped, _ = rules.worker_threads(self.hardware, best.num_workers)
        other = None if best.worker_threads is not None else capped
        self._measure(best.replace(worker_threads=other), "threads")

    def _tune_prefetch(self) -> None:
        for depth in (4, 8):
            leader = self._leader()
            if leader is None or not self._has_time():
                return
            if (leader.prefetch_factor or 2) >= depth:
                continue
            trial = self._measure(leader.replace(prefetch_factor=depth), "prefetch")
            if not self._improves(trial):
                return

    def _tune_order(self) -> None:
        leader = self._leader()
        if TORCH_HAS_IN_ORDER and leader is not None and leader.num_workers > 1 \
                and self._has_time():
            self._measure(leader.replace(in_order=False), "in_order")

    def _tune_pinning(self) -> None:
        leader = self._leader()
        if self.hardware.accelerator == "cuda" and leader is not None and self._has_time():
            self._measure(leader.replace(pin_memory=not leader.pin_memory), "pin")

    def _confirm(self) -> None:
        """Measure the leading candidates again; the mean of all their runs decides."""
        ranked = sorted((trials[0].config for trials in self._seen.values()
                         if all(t.ok for t in trials)), key=self._rank, reverse=True)
        if not ranked:
            return
        lead = _mean_rate(self._seen[_key(ranked[0])])
        for config in ranked[:CONFIRM_TOP]:
            close = _mean_rate(self._seen[_key(config)]) >= CONFIRM_WITHIN * lead
            if (close or self.consumer is not None) and len(self._seen[_key(config)]) < 2 \
                    and self._has_time(reserve=False):
                self._measure(config, "confirm", force=True)

    # -- bookkeeping ----------------------------------------------------------------

    def _config(self, workers: int) -> LoaderConfig:
        return rules.recommend(self.hardware, self.hints, self.workload, workers=workers)

    def _measure(self, config: LoaderConfig, phase: str, *, force: bool = False) -> Trial:
        key = _key(config)
        if key in self._seen and not force:
            return self._seen[key][-1]
        self.progress.show(len(self._trials) + 1, phase, config, self._elapsed())
        trial = run_trial(self.dataset, self.batch_size, config, phase=phase,
                          window_s=self.window_s, hang_s=self.hang_s,
                          collate_fn=self.collate_fn, consumer=self.consumer)
        self._trials.append(trial)
        self._seen.setdefault(key, []).append(trial)
        self.progress.result(trial)
        return trial

    def _rank(self, config: LoaderConfig) -> tuple[Any, ...]:
        """Higher is better. Throughput: mean samples/s. Consumer: keeps up, then cheap."""
        trials = [t for t in self._seen[_key(config)] if t.ok]
        rate = _mean_rate(trials)
        if self.consumer is None:
            return (rate,)
        keeps_up = all(self._keeps_up(t) for t in trials)
        memory = max((t.peak_memory_bytes or 0) for t in trials)
        if keeps_up:
            return (1, -config.num_workers, -memory, rate)
        return (0, rate)

    def _leader(self) -> LoaderConfig | None:
        candidates = [trials[0].config for trials in self._seen.values()
                      if all(t.ok for t in trials)]
        return max(candidates, key=self._rank) if candidates else None

    def _improves(self, trial: Trial) -> bool:
        """Did this trial lead, or come within NEAR_BEST of the leader (under throughput)?"""
        if not trial.ok:
            return False
        best = max((t.samples_per_s or 0) for t in self._trials if t.ok)
        return (trial.samples_per_s or 0) >= NEAR_BEST * best

    def _keeps_up(self, trial: Trial) -> bool:
        return (self.consumer is not None and trial.ok
                and (trial.stall_fraction or 0) <= STALL_OK)

    def _elapsed(self) -> float:
        return time.perf_counter() - self._start

    def _has_time(self, *, reserve: bool = True) -> bool:
        """Room for one more trial, keeping enough back to confirm the leaders."""
        per_trial = self._elapsed() / max(1, len(self._trials))
        held = CONFIRM_TOP * per_trial if reserve else 0
        return self._elapsed() + per_trial + held <= self.budget_s


def trial_window_s(budget_s: float, batch_s: float, step_s: float = 0.0) -> float:
    """How long one trial counts samples: a share of the budget, several batches, and
    enough training steps that one slow batch does not decide whether a setting keeps up."""
    return min(max(MIN_WINDOW_S, budget_s / WINDOWS_PER_BUDGET, 3 * batch_s,
                   CONSUMER_STEPS * step_s),
               max(MAX_WINDOW_S, budget_s / 6))


def _consumer(step_time_s: float | None,
              train_step: Callable[[Any], Any] | None) -> Callable[[Any], None] | None:
    if train_step is not None:
        return train_step
    if step_time_s is not None:
        return lambda batch: time.sleep(step_time_s)
    return None


def _key(config: LoaderConfig) -> tuple[Any, ...]:
    return tuple(config.settings().values())


def _mean_rate(trials: list[Trial]) -> float:
    rates = [t.samples_per_s for t in trials if t.ok and t.samples_per_s is not None]
    return sum(rates) / len(rates) if rates else 0.0


class _Progress:
    """One line on stderr, rewritten per trial; nothing when disabled (not a terminal)."""

    def __init__(self, enabled: bool, budget_s: float) -> None:
        self.enabled = enabled
        self.budget_s = budget_s

    def show(self, number: int, phase: str, config: LoaderConfig, elapsed: float) -> None:
        if self.enabled:
            done = min(1.0, elapsed / self.budget_s)
            bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
            sys.stderr.write(f"\r[{bar}] {elapsed:4.0f}/{self.budget_s:.0f} s  trial {number} "
                             f"({phase}): {config.num_workers} workers, prefetch "
                             f"{_s(config.prefetch_factor)} ...\x1b[K")
            sys.stderr.flush()

    def result(self, trial: Trial) -> None:
        if self.enabled:
            sys.stderr.write(f" {_n(trial.samples_per_s)} samples/s" if trial.ok else " failed")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


def _n(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _f(value: float | None, unit: str, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f} MB"
