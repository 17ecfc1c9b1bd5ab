"""The search over a group's joint split (``MultiAutotuner``): how many workers each loader
of one loop gets, measured as one loop.

Each set of counts is measured with every other setting following from them as the joint
rules set it (``configure``: the thread budget over all the workers, prefetch for the
strategy's runs, each loader's part of the memory). The steps:

1. torch's defaults (no workers anywhere), the rules' joint split, and each loader sized alone;
2. the joint split scaled: all counts doubled while that clearly pays, halved while the loop
   stays as fast (or, with a consumer, keeps up);
3. each loader's count doubled on its own while that clearly pays: a loader the rules
   underrated holds the whole loop back;
4. each loader's count halved on its own while the loop stays as fast, most workers first, with
   one midpoint when a halving went too far: a loader that does not hold the loop back gives
   its workers up;
5. the leaders measured again.

The choice is ``Measurements``': within noise of the fastest, the fewest workers in all, then
the least memory (with a consumer: the cheapest that keeps up).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..config import GroupConfig, LoaderConfig
from ..measure.trial import Trial
from .search import REFINE_SPAN, Measure, Measurements, SearchOutcome, setting_key

Counts = Mapping[str, int]


@dataclass(frozen=True, kw_only=True)
class JointSpace:
    """Where the joint search may go."""

    configure: Callable[[Counts], GroupConfig]  # every loader's settings for these counts
    start: Counts  # the rules' joint split
    alone: Counts  # each loader sized alone
    caps: Counts  # the most workers worth trying, per loader


class JointSearch(Measurements):
    """One search over a group's worker counts; ``run()`` once (arguments as ``Search``)."""

    def __init__(self, measure: Measure, space: JointSpace, *, budget_s: float = math.inf,
                 keep_up: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(measure, budget_s=budget_s, keep_up=keep_up, clock=clock)
        self.space = space
        self.names = list(space.start)

    def run(self) -> SearchOutcome:
        self._start = self.clock()
        baseline = self._measure(GroupConfig(members={
            name: LoaderConfig(reasons={}) for name in self.names}), "baseline")
        first = self._try(self.space.start, "rules")
        self._try(self.space.alone, "alone")
        self._scale(first)
        for name in self.names:
            self._grow(name)
        for name in sorted(self.names, key=lambda n: -self._lean()[n]):
            self._trim(name)
        return self.outcome(baseline)

    # -- steps ----------------------------------------------------------------------

    def _scale(self, first: Trial) -> None:
        """All counts doubled while that clearly pays, else halved while as good."""
        current, went_up = dict(self.space.start), False
        while not self._keeps_up(first) and self._has_time():
            up = self._capped({n: max(1, 2 * w) for n, w in current.items()})
            if up == current:
                break
            trial = self._try(up, "scale")
            if not self._clearly_better(trial):
                break
            current, went_up = up, True
            if self._keeps_up(trial):
                break
        if went_up and not self.keep_up:
            return
        current = dict(self.space.start)
        while self._has_time():
            down = {n: max(1, w // 2) for n, w in current.items()}
            if down == current or not self._good(self._try(down, "scale")):
                break
            current = down

    def _grow(self, name: str) -> None:
        """This loader's count doubled on its own while that clearly pays."""
        while self._has_time():
            lean = self._lean()
            if self._keeps_up_now():
                return
            more = self._capped({**lean, name: max(1, 2 * lean[name])})
            if more == lean or self._tried(more) \
                    or not self._clearly_better(self._try(more, "grow")):
                return

    def _trim(self, name: str) -> None:
        """This loader's count halved on its own while the loop stays as good; one midpoint
        when the last halving went too far."""
        while self._has_time():
            lean = self._lean()
            n = lean[name]
            if n == 0:
                return
            fewer = n // 2
            if self._tried({**lean, name: fewer}):
                return  # the choice went back to a count it had left: no new step
            if self._good(self._try({**lean, name: fewer}, "trim")):
                continue
            mid = round(math.sqrt(max(1, fewer) * n))
            if n > REFINE_SPAN * max(1, fewer) and fewer < mid < n and self._has_time():
                self._try({**lean, name: mid}, "trim")
            return

    # -- helpers --------------------------------------------------------------------

    def _try(self, counts: Counts, phase: str) -> Trial:
        return self._measure(self.space.configure(self._capped(counts)), phase)

    def _tried(self, counts: Counts) -> bool:
        return setting_key(self.space.configure(self._capped(counts))) in self._runs

    def _capped(self, counts: Counts) -> dict[str, int]:
        return {n: max(0, min(w, self.space.caps[n])) for n, w in counts.items()}

    def _lean(self) -> dict[str, int]:
        """The counts the choice would pick now (the rules' split before any trial)."""
        pick = self._pick()
        if pick is None or not isinstance(pick.config, GroupConfig) \
                or pick.config.num_workers == 0:
            return dict(self.space.start)
        return pick.config.workers()

    def _good(self, trial: Trial) -> bool:
        return self._keeps_up(trial) if self.keep_up else self._in_band(trial)

    def _keeps_up_now(self) -> bool:
        pick = self._pick()
        return self.keep_up and pick is not None and pick.keeps_up
