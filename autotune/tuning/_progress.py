"""One progress line on stderr, rewritten per trial; nothing when stderr is not a terminal."""

from __future__ import annotations

import sys

from ..config import GroupConfig, LoaderConfig
from ..records import Trial


class Progress:
    def __init__(self, enabled: bool, budget_s: float) -> None:
        self.enabled = enabled
        self.budget_s = budget_s

    def show(self, number: int, phase: str, config: LoaderConfig | GroupConfig,
             elapsed: float) -> None:
        if self.enabled:
            done = min(1.0, elapsed / self.budget_s)
            bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
            sys.stderr.write(f"\r[{bar}] {elapsed:4.0f}/{self.budget_s:.0f} s  trial {number} "
                             f"({phase}): {_setting(config)} ...\x1b[K")
            sys.stderr.flush()

    def result(self, trial: Trial) -> None:
        if self.enabled:
            rate = "-" if trial.samples_per_s is None else f"{trial.samples_per_s:,.0f}"
            sys.stderr.write(f" {rate} samples/s" if trial.ok else " failed")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _setting(config: LoaderConfig | GroupConfig) -> str:
    if isinstance(config, GroupConfig):
        return " + ".join(f"{n} {w}" for n, w in config.workers().items()) + " workers"
    prefetch = "-" if config.prefetch_factor is None else config.prefetch_factor
    return f"{config.num_workers} workers, prefetch {prefetch}"
