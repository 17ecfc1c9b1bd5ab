"""``TuningResult``: what the autotuner chose, the fastest setting it saw, and what the
choice traded (workers and memory against samples/s); saved into the host's profile.

Under torchrun every rank holds the same result; only rank 0 writes it, recording how many
ranks per host it was measured with (the factory warns when a run has another number)."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TUNED_SETTINGS, LoaderConfig
from ..measure.trial import Trial
from ..measure.workload import WorkloadProfile
from ..policy.search import setting_key
from ..profiles import ProfileEntry, check_key, profile_path, save_entry
from ..system.distributed import current_ranks
from ..system.hardware import HardwareInfo
from .ranks import RankTrial


@dataclass(kw_only=True)
class TuningResult:
    best: LoaderConfig  # the chosen setting: the leanest within noise of the fastest
    best_samples_per_s: float
    baseline_samples_per_s: float | None  # torch's defaults, measured in the same run
    trials: tuple[Trial, ...]
    elapsed_s: float
    batch_size: int
    key: str
    objective: str
    workload: WorkloadProfile
    hardware: HardwareInfo = field(repr=False)
    best_memory_bytes: int | None = None  # peak PSS of the chosen setting's trials
    fastest: LoaderConfig | None = None  # the fastest setting measured (may be the chosen)
    fastest_samples_per_s: float | None = None
    fastest_memory_bytes: int | None = None
    noise: float | None = None  # relative spread of repeated runs the choice allowed for
    local_world_size: int = 1  # ranks on this host while it was tuned (torchrun), all loading
    # under torchrun, each trial's own measurement on every rank (aligned with ``trials``,
    # which hold the combined numbers); empty when tuned alone
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
        measured: dict[str, Any] = {
            "samples_per_s": round(self.best_samples_per_s, 1),
            "peak_memory_mb": _mb_value(self.best_memory_bytes),
            "baseline_samples_per_s": None if self.baseline_samples_per_s is None
            else round(self.baseline_samples_per_s, 1),
            "batch_size": self.batch_size, "objective": self.objective,
            "noise": None if self.noise is None else round(self.noise, 3),
            "trials": len(self.trials), "tuning_s": round(self.elapsed_s, 1),
            "tuned_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "torch": self.hardware.host.torch,
            "local_world_size": self.local_world_size,
        }
        if self.fastest is not None:
            measured["fastest"] = {
                **_tuned(self.fastest),
                "samples_per_s": round(self.fastest_samples_per_s or 0.0, 1),
                "peak_memory_mb": _mb_value(self.fastest_memory_bytes)}
        if current_ranks().rank != 0:  # rank 0 writes the one entry every rank agreed on
            path = profile_path(self.hardware.host.hostname, profile_dir)
        else:
            path = save_entry(self.hardware, key,
                              ProfileEntry(settings=_tuned(self.best), measured=measured),
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
        return {"key": self.key, "best": self.best.to_dict(),
                "best_samples_per_s": self.best_samples_per_s,
                "best_memory_bytes": self.best_memory_bytes,
                "fastest": None if self.fastest is None else self.fastest.to_dict(),
                "fastest_samples_per_s": self.fastest_samples_per_s,
                "fastest_memory_bytes": self.fastest_memory_bytes, "noise": self.noise,
                "baseline_samples_per_s": self.baseline_samples_per_s,
                "elapsed_s": self.elapsed_s, "batch_size": self.batch_size,
                "objective": self.objective, "workload": self.workload.to_dict(),
                "local_world_size": self.local_world_size,
                "trials": [self._trial_dict(i, t) for i, t in enumerate(self.trials)]}

    def _trial_dict(self, index: int, trial: Trial) -> dict[str, Any]:
        data = trial.to_dict()
        if self.rank_trials:
            data["ranks"] = [r.to_dict() for r in self.rank_trials[index]]
        return data


def _tuned(config: LoaderConfig) -> dict[str, Any]:
    return {k: v for k, v in config.settings().items() if k in TUNED_SETTINGS}


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
