"""The search over a group's joint split (``MultiAutotuner``): how many workers each loader
of one loop gets, measured as one loop.

Each set of counts is measured with every other setting following from them as the joint
rules set it (``configure``: the thread budget over all the workers, prefetch for the
strategy's runs, each loader's part of the memory). The steps:

1. torch's defaults (no workers anywhere), the rules' joint split, and each loader sized alone;
2. up from the lean pick, the first move that clearly pays, again and again: all counts
   doubled, or one loader's alone. The loop goes at the pace of the loader that falls short,
   so what holds it back may be one loader (the rules underrated it) or all of them. After
   each move that pays, the pick it left is measured again, side by side: on shared CPUs the
   machine's speed drifts, and a gain that the old pick also shows now was the drift;
3. all counts halved while the loop stays as fast (or, with a consumer, keeps up);
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
from ..records import Trial
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
        self._try(self.space.start, "rules")
        self._try(self.space.alone, "alone")
        self._climb()
        self._shrink()
        for name in sorted(self.names, key=lambda n: -self._lean()[n]):
            self._trim(name)
        return self.outcome(baseline)

    # -- steps ----------------------------------------------------------------------

    def _climb(self) -> None:
        """From the lean pick, the first move up that clearly pays, again and again: every
        count doubled, or one loader's alone (the loop goes at the pace of the loader that
        falls short, so one loader's or all of theirs may be what holds it back)."""
        while self._has_time() and not self._keeps_up_now():
            lean = self._lean()
            moves = [("scale", {n: max(1, 2 * w) for n, w in lean.items()})]
            moves += [("grow", {**lean, n: max(1, 2 * lean[n])}) for n in self.names]
            for phase, counts in moves:
                counts = self._capped(counts)
                if counts == lean or self._tried(counts):
                    continue
                if not self._has_time():
                    return
                trial = self._try(counts, phase)
                if self._clearly_better(trial):
                    if not self._gain_holds(self.space.configure(self._capped(lean)), trial):
                        return  # the gain was the machine's drift, not the move
                    break
            else:
                return  # no move up paid

    def _shrink(self) -> None:
        """Every count halved while the loop stays as good."""
        while self._has_time():
            lean = self._lean()
            down = {n: max(1, w // 2) for n, w in lean.items()}
            if down == lean or self._tried(down) or not self._good(self._try(down, "scale")):
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
