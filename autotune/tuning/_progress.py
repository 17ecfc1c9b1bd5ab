"""The tuners' progress: a ``tqdm`` bar on stderr over the time budget, the trial in progress
and its result beside it; none when stderr is not a terminal (or when asked for none)."""

from __future__ import annotations

import sys
from typing import Any

from ..config import GroupConfig, LoaderConfig
from ..records import Trial


class Progress:
    """One bar for one tuning run, closed by ``done()``.

    Args:
        enabled: draw it (the tuners pass ``sys.stderr.isatty()`` unless told).
        budget_s: the seconds the bar fills up to.
    """

    def __init__(self, enabled: bool, budget_s: float) -> None:
        self.enabled = enabled
        self.budget_s = budget_s
        self._bar: Any = None
        self._trial = ""

    def show(self, number: int, phase: str, config: LoaderConfig | GroupConfig,
             elapsed: float) -> None:
        if self.enabled:
            self._trial = f"trial {number} ({phase}): {_setting(config)}"
            self._draw(elapsed, self._trial)

    def result(self, trial: Trial) -> None:
        if self.enabled and self._bar is not None:
            rate = "-" if trial.samples_per_s is None else f"{trial.samples_per_s:,.0f}"
            outcome = f"{rate} samples/s" if trial.ok else "failed"
            self._draw(self._bar.n, f"{self._trial}: {outcome}")

    def done(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _draw(self, elapsed: float, text: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=round(self.budget_s), desc="autotune tune", unit="s",
                             file=sys.stderr, leave=False, dynamic_ncols=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s"
                                        "{postfix}")  # tqdm puts ", " before the postfix
        self._bar.n = min(round(elapsed), self._bar.total)
        self._bar.set_postfix_str(text, refresh=False)
        self._bar.refresh()


def _setting(config: LoaderConfig | GroupConfig) -> str:
    if isinstance(config, GroupConfig):
        return " + ".join(f"{n} {w}" for n, w in config.workers().items()) + " workers"
    prefetch = "-" if config.prefetch_factor is None else config.prefetch_factor
    return f"{config.num_workers} workers, prefetch {prefetch}"
