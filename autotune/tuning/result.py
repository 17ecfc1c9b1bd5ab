"""``TuningResult``: what the autotuner chose, the fastest setting it saw, and what the
choice traded (workers and memory against samples/s); saved into the host's profile.

Under torchrun every rank holds the same result; only rank 0 writes it, recording how many
ranks per host it was measured with (the factory warns when a run has another number)."""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import GroupConfig, LoaderConfig
from ..policy.search import SearchOutcome, setting_key
from ..profiles import ProfileEntry, check_key, profile_path, save_entry
from ..records import HardwareInfo, Trial, WorkloadProfile
from ..system.distributed import current_ranks
from .ranks import RankTrial


@dataclass(kw_only=True)
class TuningResult:
    """What ``Autotuner.run()`` chose for one loader, the fastest setting it saw and every
    trial; ``save()`` writes the choice into this host's profile, ``table()`` shows it.

    Rates are the mean over a setting's runs. Under torchrun every trial ran on all ranks at
    once: its samples/s is the slowest rank's (training waits for it), its memory and CPU
    the node's (summed over the ranks on a host; the busiest host's).

    Attributes:
        best: the chosen setting (``source="tuned"``, ``"profile"`` once saved): the leanest
            within noise of the fastest (fewest workers, then least memory); with a
            consumer (``step_time_s``, ``train_step``), the fewest workers that keep up.
            Its ``reasons`` say why.
        best_samples_per_s: samples/s the chosen setting measured.
        baseline_samples_per_s: samples/s of torch's defaults (no workers), measured in the
            same run; None if that trial failed.
        trials: every trial in the order run (baseline, rules, ladder, ..., confirm),
            failed ones included with their error.
        elapsed_s: wall seconds the tuning took, measuring the workload included.
        batch_size: samples per batch the trials loaded.
        key: the profile key ``save()`` writes under (the tuner's ``key``; ``save(key=...)``
            changes it).
        objective: what the choice optimised, in words (``"lean throughput"``, or no stall
            with the given step).
        workload: the quick measurement of a few samples the search started from (rank 0's
            under torchrun).
        hardware: the machine it was tuned on; ``save()`` files the entry under its host
            name.
        best_memory_bytes: peak memory (PSS, bytes) of the main process and its workers over
            the chosen setting's runs; None if it could not be read.
        fastest: the setting with the highest samples/s measured (may be the chosen one);
            the tuner always sets it, None only in a result built by hand.
        fastest_samples_per_s, fastest_memory_bytes: as ``best_samples_per_s`` and
            ``best_memory_bytes``, for ``fastest``.
        noise: the relative spread of repeated runs that the choice allowed for (a fraction:
            the median (max - min) / mean of settings run twice or more, kept within
            0.02-0.05; 0.03 when nothing was repeated); None only in a result built by
            hand.
        local_world_size: ranks on this host while it was tuned (torchrun), all loading at
            once; 1 when tuned alone. The factory warns when a run has another number.
        rank_trials: under torchrun, each trial's own measurement on every rank (aligned
            with ``trials``, which hold the combined numbers); empty when tuned alone.
    """

    best: LoaderConfig
    best_samples_per_s: float
    baseline_samples_per_s: float | None
    trials: tuple[Trial, ...]
    elapsed_s: float
    batch_size: int
    key: str
    objective: str
    workload: WorkloadProfile
    hardware: HardwareInfo = field(repr=False)
    best_memory_bytes: int | None = None
    fastest: LoaderConfig | None = None
    fastest_samples_per_s: float | None = None
    fastest_memory_bytes: int | None = None
    noise: float | None = None
    local_world_size: int = 1
    rank_trials: tuple[tuple[RankTrial, ...], ...] = ()

    def save(self, profile_dir: str | os.PathLike[str] | None = None,
             key: str | None = None) -> Path:
        """Merge the chosen setting into this host's profile (atomically; other keys kept),
        with what was measured, the fastest setting and the ranks per host included.

        Under torchrun only rank 0 writes: on another rank this writes nothing and returns
        the path rank 0 writes to (every rank holds the same result; call it on all of them
        or on rank 0 alone).

        Args:
            profile_dir: the profile directory (default: ``$AUTOTUNE_PROFILE_DIR`` or
                ./profiles).
            key: the entry's key (default: the tuner's ``key``).
        """
        key = check_key(key or self.key)
        measured = _measured(self)
        if self.fastest is not None:
            measured["fastest"] = {
                **self.fastest.tuned_settings(),
                "samples_per_s": round(self.fastest_samples_per_s or 0.0, 1),
                "peak_memory_mb": _mb_value(self.fastest_memory_bytes)}
        if current_ranks().rank != 0:  # rank 0 writes the one entry every rank agreed on
            path = profile_path(self.hardware.host.hostname, profile_dir)
        else:
            path = save_entry(self.hardware, key,
                              ProfileEntry(settings=self.best.tuned_settings(), measured=measured),
                              profile_dir)
        self.best = self.best.replace(source="profile")
        self.key = key
        return path

    def table(self) -> str:
        """Every trial, its samples/s, memory and CPU; the chosen and the fastest marked."""
        header = (f"{'#':>3} {'phase':<9} {'workers':>7} {'prefetch':>8} {'threads':>7} "
                  f"{'in_order':>8} {'samples/s':>10} {'1st batch':>9} {'memory':>9} "
                  f"{'CPU':>5} {'stall':>6}")
        lines = [header]
        chosen = setting_key(self.best)
        fastest = setting_key(self.fastest) if self.fastest else None
        for i, t in enumerate(self.trials, 1):
            c = t.config
            assert isinstance(c, LoaderConfig)  # one loader's trials
            mark = ""
            if not t.ok:
                mark = f"  FAILED: {t.error}"
            elif setting_key(c) == chosen:
                mark = "  <- chosen"
            elif setting_key(c) == fastest:
                mark = "  <- fastest"
            lines.append(
                f"{i:>3} {t.phase:<9} {c.num_workers:>7} {_s(c.prefetch_factor):>8} "
                f"{_s(c.worker_threads):>7} {_s(c.in_order):>8} {_n(t.samples_per_s):>10} "
                f"{_f(t.first_batch_s, 's'):>9} {_mb(t.peak_memory_bytes):>9} "
                f"{_f(t.cpu_percent, '%', 0):>5} {_f(_pct(t.stall_fraction), '%', 0):>6}{mark}")
        base = self.baseline_samples_per_s
        gain = f" = {self.best_samples_per_s / base:.1f}x torch's defaults" if base else ""
        lines.append(f"chosen: {self.best.num_workers} workers, "
                     f"{self.best_samples_per_s:,.0f} samples/s{gain}, "
                     f"{_mb(self.best_memory_bytes)}")
        if self.fastest is not None and fastest != chosen:
            lines.append(f"fastest: {self.fastest.num_workers} workers, "
                         f"{self.fastest_samples_per_s or 0:,.0f} samples/s, "
                         f"{_mb(self.fastest_memory_bytes)}")
        lines.append(f"why: {self.best.reasons.get('num_workers', '')}")
        lines.append(f"{len(self.trials)} trials in {self.elapsed_s:.1f} s ({self.objective})")
        if self.rank_trials:
            ranks = len(self.rank_trials[0])
            lines.append(f"each trial ran on {ranks} ranks at once: samples/s of the slowest "
                         "rank, memory and CPU of the node")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**_result_dict(self), "workload": self.workload.to_dict(),
                "local_world_size": self.local_world_size,
                "trials": [self._trial_dict(i, t) for i, t in enumerate(self.trials)]}

    def _trial_dict(self, index: int, trial: Trial) -> dict[str, Any]:
        data = trial.to_dict()
        if self.rank_trials:
            data["ranks"] = [r.to_dict() for r in self.rank_trials[index]]
        return data


@dataclass(kw_only=True)
class MultiTuningResult:
    """What ``MultiAutotuner`` chose for loaders sharing one loop: every loader's settings
    (``best.members``), measured as the loop's samples/s; saved as one profile entry.

    Rates are the mean over a split's runs, of the whole loop (all loaders together).

    Attributes:
        best: the chosen split (each member ``source="tuned"``, ``"profile"`` once saved):
            the fewest workers in all within noise of the fastest, then the least memory;
            with a consumer, the fewest that keep up.
        best_samples_per_s: samples/s of the loop, all loaders together, with the chosen
            split.
        baseline_samples_per_s: the loop's samples/s with torch's defaults (no workers) for
            every loader, measured in the same run; None if that trial failed.
        trials: every trial in the order run, failed ones included with their error.
        elapsed_s: wall seconds the tuning took, measuring the workloads included.
        batch_size: samples per batch, for every loader.
        key: the profile key ``save()`` writes under (default: the datasets' class names
            joined by ``+``, as the factory looks it up).
        objective: what the choice optimised, in words.
        strategy: how the loop interleaves the loaders (``"round_robin"``,
            ``"alternating"`` or ``"weighted"``).
        shares: each loader's share of the loop's batches (a fraction, 0-1), by name.
        workloads: each dataset's quick measurement of a few samples, by name.
        hardware: the machine it was tuned on; ``save()`` files the entry under its host
            name.
        best_memory_bytes: peak memory (PSS, bytes) of the main process and every loader's
            workers over the chosen split's runs; None if it could not be read.
        fastest: the split with the highest samples/s measured (may be the chosen one);
            the tuner always sets it, None only in a result built by hand.
        fastest_samples_per_s, fastest_memory_bytes: as ``best_samples_per_s`` and
            ``best_memory_bytes``, for ``fastest``.
        noise: the relative spread of repeated runs that the choice allowed for (a fraction,
            as ``TuningResult.noise``); None only in a result built by hand.
        local_world_size: always 1: ``MultiAutotuner`` tunes in one process, never under
            torchrun.
    """

    best: GroupConfig
    best_samples_per_s: float
    baseline_samples_per_s: float | None
    trials: tuple[Trial, ...]
    elapsed_s: float
    batch_size: int
    key: str
    objective: str
    strategy: str
    shares: dict[str, float]
    workloads: dict[str, WorkloadProfile]
    hardware: HardwareInfo = field(repr=False)
    best_memory_bytes: int | None = None
    fastest: GroupConfig | None = None
    fastest_samples_per_s: float | None = None
    fastest_memory_bytes: int | None = None
    noise: float | None = None
    local_world_size: int = 1

    def save(self, profile_dir: str | os.PathLike[str] | None = None,
             key: str | None = None) -> Path:
        """Merge the chosen split into this host's profile as one entry (atomically; other
        keys kept); ``factory.create_training_loaders`` with the same datasets (or
        ``profile_key=key``) applies it."""
        key = check_key(key or self.key)
        measured = {**_measured(self), "strategy": self.strategy, "shares": dict(self.shares)}
        if self.fastest is not None:
            measured["fastest"] = {
                "workers": self.fastest.workers(),
                "samples_per_s": round(self.fastest_samples_per_s or 0.0, 1),
                "peak_memory_mb": _mb_value(self.fastest_memory_bytes)}
        entry = ProfileEntry(members={name: config.tuned_settings()
                                      for name, config in self.best.members.items()},
                             measured=measured)
        path = save_entry(self.hardware, key, entry, profile_dir)
        self.best = GroupConfig(members={name: config.replace(source="profile")
                                         for name, config in self.best.members.items()})
        self.key = key
        return path

    def table(self) -> str:
        """Every trial: each loader's workers, the loop's samples/s, memory and CPU."""
        names = list(self.best.members)
        width = max(7, *(len(n) for n in names))
        header = (f"{'#':>3} {'phase':<9} " + " ".join(f"{n:>{width}}" for n in names)
                  + f" {'total':>5} {'samples/s':>10} {'memory':>9} {'CPU':>5} {'stall':>6}")
        lines = [header]
        chosen = setting_key(self.best)
        fastest = setting_key(self.fastest) if self.fastest else None
        for i, t in enumerate(self.trials, 1):
            assert isinstance(t.config, GroupConfig)  # as every group trial's
            workers = t.config.workers()
            mark = ""
            if not t.ok:
                mark = f"  FAILED: {t.error}"
            elif setting_key(t.config) == chosen:
                mark = "  <- chosen"
            elif setting_key(t.config) == fastest:
                mark = "  <- fastest"
            lines.append(
                f"{i:>3} {t.phase:<9} " + " ".join(f"{workers[n]:>{width}}" for n in names)
                + f" {t.config.num_workers:>5} {_n(t.samples_per_s):>10} "
                f"{_mb(t.peak_memory_bytes):>9} {_f(t.cpu_percent, '%', 0):>5} "
                f"{_f(_pct(t.stall_fraction), '%', 0):>6}{mark}")
        base = self.baseline_samples_per_s
        gain = f" = {self.best_samples_per_s / base:.1f}x torch's defaults" if base else ""
        split = " + ".join(f"{n} {w}" for n, w in self.best.workers().items())
        lines.append(f"chosen: {split} workers, {self.best_samples_per_s:,.0f} samples/s of "
                     f"the loop{gain}, {_mb(self.best_memory_bytes)}")
        if self.fastest is not None and fastest != chosen:
            split = " + ".join(f"{n} {w}" for n, w in self.fastest.workers().items())
            lines.append(f"fastest: {split} workers, {self.fastest_samples_per_s or 0:,.0f} "
                         f"samples/s, {_mb(self.fastest_memory_bytes)}")
        first = next(iter(self.best.members.values()))
        lines.append(f"why: {first.reasons.get('num_workers', '')}")
        lines.append(f"{len(self.trials)} trials in {self.elapsed_s:.1f} s ({self.objective}; "
                     f"strategy {self.strategy!r}, shares "
                     + ", ".join(f"{n} {s:.0%}" for n, s in self.shares.items()) + ")")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**_result_dict(self), "strategy": self.strategy,
                "shares": dict(self.shares),
                "workloads": {n: w.to_dict() for n, w in self.workloads.items()},
                "trials": [t.to_dict() for t in self.trials]}


def measured_fields(outcome: SearchOutcome, start: float) -> dict[str, Any]:
    """What a search's outcome gives every result: the chosen and the fastest with their
    samples/s and memory, the noise, torch's defaults, every trial and the time taken."""
    chosen, fastest = outcome.chosen, outcome.fastest
    return {"best_samples_per_s": chosen.samples_per_s,
            "best_memory_bytes": chosen.peak_memory_bytes, "fastest": fastest.config,
            "fastest_samples_per_s": fastest.samples_per_s,
            "fastest_memory_bytes": fastest.peak_memory_bytes, "noise": outcome.noise,
            "baseline_samples_per_s": outcome.baseline.samples_per_s
            if outcome.baseline.ok else None,
            "trials": outcome.trials, "elapsed_s": time.perf_counter() - start}


def _result_dict(result: TuningResult | MultiTuningResult) -> dict[str, Any]:
    """The fields every result's ``to_dict`` starts with."""
    return {"key": result.key, "best": result.best.to_dict(),
            "best_samples_per_s": result.best_samples_per_s,
            "best_memory_bytes": result.best_memory_bytes,
            "fastest": None if result.fastest is None else result.fastest.to_dict(),
            "fastest_samples_per_s": result.fastest_samples_per_s,
            "fastest_memory_bytes": result.fastest_memory_bytes, "noise": result.noise,
            "baseline_samples_per_s": result.baseline_samples_per_s,
            "elapsed_s": result.elapsed_s, "batch_size": result.batch_size,
            "objective": result.objective}


def _measured(result: TuningResult | MultiTuningResult) -> dict[str, Any]:
    """How a result was measured, as its profile entry records it."""
    return {
        "samples_per_s": round(result.best_samples_per_s, 1),
        "peak_memory_mb": _mb_value(result.best_memory_bytes),
        "baseline_samples_per_s": None if result.baseline_samples_per_s is None
        else round(result.baseline_samples_per_s, 1),
        "batch_size": result.batch_size, "objective": result.objective,
        "noise": None if result.noise is None else round(result.noise, 3),
        "trials": len(result.trials), "tuning_s": round(result.elapsed_s, 1),
        "tuned_at": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "torch": result.hardware.host.torch,
        "local_world_size": result.local_world_size,
    }



def _mb_value(value: int | None) -> float | None:
    return None if value is None else round(value / 1e6, 1)


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
