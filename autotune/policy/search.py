"""The search over the settings ``LoaderConfig`` expresses, driven by any measurement.

``Search(measure, space).run()`` calls ``measure(config, phase) -> Trial`` for each setting
it wants to know about: the offline tuner passes real steady-state trials, tests pass a
response surface, and a re-tuner can pass what it sees while training runs.

The steps: torch's defaults and the rules' choice; a geometric ladder over workers (up from
the start while each step clearly pays, also against the rung below measured again beside
it, down while fewer workers stay as fast); one midpoint
below the leanest good count when the rungs around it are far apart; then the thread budget,
prefetch depth, ordering and pinning on that pick; the leading candidates measured again.

The choice is lean: among settings whose mean throughput is within measurement noise of
the best (noise estimated from the repeated runs, ``NOISE_MIN``-``NOISE_MAX``), the fewest
workers, then the least memory, then the fastest. A worker costs memory and a process on
every rank of a node; a setting that is faster only within noise has not earned it. With a
consumer (``keep_up=True``) the goal is no input stall: among settings that keep up, the
fewest workers, then the least memory.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import TORCH_HAS_IN_ORDER, TUNED_SETTINGS, GroupConfig, LoaderConfig
from ..errors import InvalidConfigError
from ..records import Trial

STALL_OK = 0.05  # a consumer waiting for data less than this share of the time keeps up
NOISE_DEFAULT = 0.03  # relative spread of repeated runs, until repeats say otherwise
NOISE_MIN, NOISE_MAX = 0.02, 0.05
REFINE_SPAN = 1.25  # a midpoint is tried between worker counts further apart than this
CONFIRM_WITHIN = 0.90  # candidates whose first run came this close to the best run again
CONFIRM_MAX = 4
CONFIRM_RESERVE = 2  # trials' worth of budget the exploring steps leave for confirming
FAR_BEHIND = 1 / 3  # a setting below this share of the leader is never measured again
MIN_SETTINGS = 6  # a search that measured fewer spends what budget is left on the leader's
                  # neighbours (slow-starting workloads: few trials fit the budget)
MEMORY_TIE = 1.10  # memory within this factor of the least counts as the same
DEEP_PREFETCH = (4, 8)

Setting = LoaderConfig | GroupConfig  # one loader's settings, or a group's (joint_search)
Measure = Callable[[Setting, str], Trial]


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Where the search may go.

    ``configure(n)`` gives the rules' settings for ``n`` workers (the thread budget,
    prefetch and the rest follow the count); ``cap`` is the most workers worth trying.
    """

    configure: Callable[[int], LoaderConfig]
    cap: int
    rules_workers: int  # the rules' own choice, measured as is
    start: int  # the ladder's first rung
    cpu_budget: int = 1
    native_threads: bool = False  # samples ran native thread pools: try them capped or not
    cuda: bool = False  # batches go to a CUDA device: try pinned memory both ways
    in_order_option: bool = TORCH_HAS_IN_ORDER


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One setting and every run of it."""

    config: Setting
    runs: tuple[Trial, ...]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.runs)

    @property
    def samples_per_s(self) -> float:
        rates = [t.samples_per_s for t in self.runs if t.ok and t.samples_per_s is not None]
        return statistics.fmean(rates) if rates else 0.0

    @property
    def peak_memory_bytes(self) -> int | None:
        peaks = [t.peak_memory_bytes for t in self.runs if t.peak_memory_bytes is not None]
        return max(peaks) if peaks else None

    @property
    def keeps_up(self) -> bool:
        return self.ok and all((t.stall_fraction or 0.0) <= STALL_OK for t in self.runs)

    @property
    def spread(self) -> float | None:
        """(max - min) / mean of its runs, when it ran more than once."""
        rates = [t.samples_per_s or 0.0 for t in self.runs]
        if len(rates) < 2 or not self.ok or self.samples_per_s <= 0:
            return None
        return (max(rates) - min(rates)) / self.samples_per_s


@dataclass(frozen=True, kw_only=True)
class SearchOutcome:
    chosen: Candidate
    fastest: Candidate
    baseline: Candidate  # torch's defaults, every run of them
    trials: tuple[Trial, ...]
    noise: float  # the relative spread the choice allowed for
    why: str  # one line: what was chosen over what


class Measurements:
    """What a search measured, and the choice over it: the bookkeeping, the noise, the lean
    pick and confirming the leaders, shared by ``Search`` and the joint search of a group
    (``policy.joint_search``), which differ only in the steps they take.

    Args:
        measure: ``measure(config, phase) -> Trial``; must not raise for a failing setting
            (return a Trial with ``error``), which is recorded and never chosen.
        budget_s: stop starting trials once the next would pass this (clock seconds),
            keeping time back to confirm the leaders.
        keep_up: trials carry a consumer's stall: choose the cheapest setting that keeps up.
        clock: seconds, for the budget (tests pass a counter).
    """

    def __init__(self, measure: Measure, *, budget_s: float = math.inf,
                 keep_up: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.measure = measure
        self.budget_s = budget_s
        self.keep_up = keep_up
        self.clock = clock
        self._trials: list[Trial] = []
        self._runs: dict[tuple[Any, ...], list[Trial]] = {}
        self._start = clock()

    def outcome(self, baseline: Trial) -> SearchOutcome:
        """Confirm the leaders, then choose."""
        self._confirm()
        chosen = self._pick()
        if chosen is None:
            errors = sorted({t.error or "" for t in self._trials})
            raise InvalidConfigError("every trial failed: " + "; ".join(errors))
        fastest = max(self._candidates(), key=lambda c: c.samples_per_s)
        runs = self._runs[setting_key(baseline.config)]
        return SearchOutcome(chosen=chosen, fastest=fastest,
                             baseline=Candidate(config=baseline.config, runs=tuple(runs)),
                             trials=tuple(self._trials), noise=self.noise(),
                             why=self._why(chosen, fastest))

    def _confirm(self) -> None:
        """Measure the candidates that could be chosen again, leanest first; the mean of
        all runs decides."""
        for candidate in self._to_confirm():
            if self._has_time(reserve=False):
                self._measure(candidate.config, "confirm", again=True)

    def _to_confirm(self) -> list[Candidate]:
        """The candidates that could be chosen and ran once: with a consumer, those that keep
        up (or, when none does, those close to the fastest); else those close to the
        fastest. Never one far behind the leader: it cannot win, and on a slow-starting
        workload a trial is a large share of the budget."""
        candidates = self._candidates()
        if not candidates:
            return []
        lead = max(c.samples_per_s for c in candidates)
        fastest = max(candidates, key=lambda c: c.samples_per_s)
        if self.keep_up and any(c.keeps_up for c in candidates):
            order = sorted(candidates, key=self._keep_up_rank)
        else:
            close = [c for c in candidates if c.samples_per_s >= CONFIRM_WITHIN * lead]
            order = [fastest, *sorted((c for c in close if c is not fastest),
                                      key=lambda c: (c.config.num_workers, -c.samples_per_s))]
        return [c for c in order[:CONFIRM_MAX]
                if len(c.runs) < 2 and c.samples_per_s >= FAR_BEHIND * lead]

    # -- the choice -----------------------------------------------------------------

    def noise(self) -> float:
        """Relative spread of repeated runs (median over settings run twice or more)."""
        spreads = [s for c in self._candidates() if (s := c.spread) is not None]
        if not spreads:
            return NOISE_DEFAULT
        return min(NOISE_MAX, max(NOISE_MIN, statistics.median(spreads)))

    def _pick(self) -> Candidate | None:
        candidates = self._candidates()
        if not candidates:
            return None
        if self.keep_up:
            return min(candidates, key=self._keep_up_rank)
        best = max(c.samples_per_s for c in candidates)
        band = [c for c in candidates if c.samples_per_s >= best * (1 - self.noise())]
        fewest = min(c.config.num_workers for c in band)
        lean = [c for c in band if c.config.num_workers == fewest]
        least = min((c.peak_memory_bytes for c in lean if c.peak_memory_bytes), default=None)
        if least is not None:
            lean = [c for c in lean if (c.peak_memory_bytes or least) <= MEMORY_TIE * least]
        return max(lean, key=lambda c: c.samples_per_s)

    def _keep_up_rank(self, c: Candidate) -> tuple[Any, ...]:
        """Lower is better: keeps up, then fewest workers, then least memory, then fastest."""
        if c.keeps_up:
            return (0, c.config.num_workers, c.peak_memory_bytes or 0, -c.samples_per_s)
        return (1, -c.samples_per_s)

    def _why(self, chosen: Candidate, fastest: Candidate) -> str:
        runs = len(self._trials)
        if self.keep_up:
            what = ("the fewest workers that keep up with the step" if chosen.keeps_up
                    else "none kept up with the step: the fastest")
        elif setting_key(chosen.config) == setting_key(fastest.config):
            what = "the fastest"
        else:
            saving = ("fewer workers" if chosen.config.num_workers < fastest.config.num_workers
                      else "less memory")
            what = (f"within noise ({self.noise():.0%}) of the fastest "
                    f"({fastest.config.num_workers} workers, {fastest.samples_per_s:,.0f} "
                    f"samples/s), with {saving}")
        return f"measured {chosen.samples_per_s:,.0f} samples/s, {what}; {runs} trials"

    # -- bookkeeping ----------------------------------------------------------------

    def _measure(self, config: Setting, phase: str, *, again: bool = False) -> Trial:
        key = setting_key(config)
        if key in self._runs and not again:
            return self._runs[key][-1]
        trial = self.measure(config, phase)
        self._trials.append(trial)
        self._runs.setdefault(key, []).append(trial)
        return trial

    def _candidates(self) -> list[Candidate]:
        """Every setting measured, whose runs all succeeded."""
        found = [Candidate(config=runs[0].config, runs=tuple(runs))
                 for runs in self._runs.values()]
        return [c for c in found if c.ok]

    def _best_rate(self, *, excluding: Trial | None = None) -> float:
        return max((t.samples_per_s or 0.0 for t in self._trials
                    if t.ok and t is not excluding), default=0.0)

    def _clearly_better(self, trial: Trial) -> bool:
        """Faster than every earlier trial by more than the noise."""
        return trial.ok and (trial.samples_per_s or 0.0) > \
            self._best_rate(excluding=trial) * (1 + self.noise())

    def _gain_holds(self, before: Setting, after: Trial) -> bool:
        """Measure ``before`` again right after ``after`` beat it: on a machine whose speed
        drifts (shared CPUs) every later trial looks better, and only side by side does a
        move's own gain show. True while ``after`` stays clearly faster (or no time is
        left to check)."""
        if not self._has_time(reserve=False):
            return True
        again = self._measure(before, "recheck", again=True)
        return again.ok and (after.samples_per_s or 0.0) > \
            (again.samples_per_s or 0.0) * (1 + self.noise())

    def _in_band(self, trial: Trial) -> bool:
        """Within the noise of the best trial so far."""
        return trial.ok and (trial.samples_per_s or 0.0) >= \
            self._best_rate() * (1 - self.noise())

    def _keeps_up(self, trial: Trial) -> bool:
        return self.keep_up and trial.ok and (trial.stall_fraction or 0.0) <= STALL_OK

    def _has_time(self, *, reserve: bool = True, held_trials: int | None = None) -> bool:
        """Room for one more trial, keeping enough back to confirm the leaders
        (``CONFIRM_RESERVE`` trials, or ``held_trials`` when that is known)."""
        elapsed = self.clock() - self._start
        per_trial = elapsed / max(1, len(self._trials))
        held = (CONFIRM_RESERVE if held_trials is None else held_trials) * per_trial \
            if reserve else 0.0
        return elapsed + per_trial + held <= self.budget_s



class Search(Measurements):
    """One search over one loader's settings; ``run()`` once.

    Args:
        measure: ``measure(config, phase) -> Trial`` (see ``Measurements``).
        space: the settings to explore.
        budget_s, keep_up, clock: as ``Measurements``.
    """

    def __init__(self, measure: Measure, space: SearchSpace, *, budget_s: float = math.inf,
                 keep_up: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(measure, budget_s=budget_s, keep_up=keep_up, clock=clock)
        self.space = space

    def run(self) -> SearchOutcome:
        self._start = self.clock()
        baseline = self._measure(LoaderConfig(reasons={}), "baseline")
        space = self.space
        self._measure(space.configure(min(space.rules_workers, space.cap)), "rules")
        self._ladder(space.start)
        self._refine()
        pick = self._pick()
        if pick is not None:
            self._tune_around(_one_loader(pick.config))
        self._neighbours()
        return self.outcome(baseline)

    # -- steps ----------------------------------------------------------------------

    def _ladder(self, start: int) -> None:
        """Up from ``start`` while each doubling clearly pays, also against the rung below
        measured again beside it (a drifting machine's gain is not the doubling's); then
        down (unless going up paid) while fewer workers are as good (as fast, or keeping
        up)."""
        cap = self.space.cap
        start = min(max(1, start), cap) if cap else 0
        if start == 0:
            return
        first = self._measure(self.space.configure(start), "ladder")
        n, went_up = start, False
        while n < cap and not self._keeps_up(first) and self._has_time():
            below, n = n, min(cap, n * 2)
            trial = self._measure(self.space.configure(n), "ladder")
            pays = self._clearly_better(trial) and \
                self._gain_holds(self.space.configure(below), trial)
            went_up = went_up or pays
            if self._keeps_up(trial) or not pays:
                break
        n = start
        while n > 1 and not (went_up and not self.keep_up) and self._has_time():
            n = max(1, n // 2)
            trial = self._measure(self.space.configure(n), "ladder")
            good = self._keeps_up(trial) if self.keep_up else self._in_band(trial)
            if not good:
                break

    def _refine(self) -> None:
        """One geometric midpoint between the leanest good count and the next count below
        it that was not good, when they are far apart."""
        pick = self._pick()
        if pick is None or pick.config.num_workers == 0 or not self._has_time():
            return
        n = pick.config.num_workers
        below = [c.config.num_workers for c in self._candidates()
                 if c.config.num_workers < n]
        lower = max(below, default=0)
        if n <= REFINE_SPAN * max(1, lower):
            return
        mid = round(math.sqrt(max(1, lower) * n))
        if lower < mid < n:
            self._measure(self.space.configure(mid), "refine")

    def _tune_around(self, pick: LoaderConfig) -> None:
        """Thread budget, prefetch depth, ordering and pinning, each tried on the pick."""
        space = self.space
        if pick.num_workers == 0:
            # Batches made in-process lead; workers with a deep queue can still win where
            # the copy, not the making, is what costs (large samples).
            with_workers = [c for c in self._candidates() if c.config.num_workers > 0]
            if with_workers and self._has_time():
                best = _one_loader(max(with_workers, key=lambda c: c.samples_per_s).config)
                self._measure(best.replace(prefetch_factor=DEEP_PREFETCH[-1]), "prefetch")
            return
        if space.native_threads and self._has_time():
            capped = max(1, space.cpu_budget // (pick.num_workers + 1))
            other = None if pick.worker_threads is not None else capped
            self._measure(pick.replace(worker_threads=other), "threads")
            pick = self._pick_with(pick.num_workers) or pick
        for depth in DEEP_PREFETCH:
            if (pick.prefetch_factor or 2) >= depth or not self._has_time():
                continue
            trial = self._measure(pick.replace(prefetch_factor=depth), "prefetch")
            if not self._clearly_better(trial):
                break
        pick = self._pick_with(pick.num_workers) or pick
        if space.in_order_option and pick.num_workers > 1 and self._has_time():
            self._measure(pick.replace(in_order=False), "in_order")
        if space.cuda and self._has_time():
            self._measure(pick.replace(pin_memory=not pick.pin_memory), "pin")

    def _neighbours(self) -> None:
        """When the steps measured fewer than ``MIN_SETTINGS`` settings, the budget they
        left (beyond the confirmations still needed) goes to the leader's neighbours: the
        worker counts halfway (geometrically) to the measured ones above and below, then a
        deeper prefetch."""
        while len(self._runs) < MIN_SETTINGS \
                and self._has_time(held_trials=len(self._to_confirm())):
            pick = self._pick()
            if pick is None or pick.config.num_workers == 0:
                return
            config = _one_loader(pick.config)
            n, cap = config.num_workers, self.space.cap
            measured = {c.config.num_workers for c in self._candidates()} | \
                {t.config.num_workers for t in self._trials}
            above = min((m for m in measured if m > n), default=min(cap, 2 * n))
            below = max((m for m in measured if 0 < m < n), default=max(1, n // 2))
            options = [config.replace(num_workers=round(math.sqrt(n * above))),
                       config.replace(num_workers=round(math.sqrt(n * below))),
                       config.replace(prefetch_factor=2 * (config.prefetch_factor or 2))]
            fresh = [c for c in options if 1 <= c.num_workers <= cap
                     and (c.prefetch_factor or 2) <= DEEP_PREFETCH[-1]
                     and setting_key(c) not in self._runs]
            if not fresh:
                return
            self._measure(fresh[0], "neighbour")

    def _pick_with(self, workers: int) -> LoaderConfig | None:
        """The best measured setting with this many workers."""
        same = [c for c in self._candidates() if c.config.num_workers == workers]
        return _one_loader(max(same, key=lambda c: c.samples_per_s).config) if same else None


def _one_loader(config: Setting) -> LoaderConfig:
    """``Search`` measures one loader's settings only (a group's go to ``joint_search``)."""
    assert isinstance(config, LoaderConfig), config
    return config


def setting_key(config: Setting) -> tuple[Any, ...]:
    """What makes two settings measure differently: the tuned settings, and of those only
    pinning when batches are made in-process (the rest are about workers); a group's,
    each member's."""
    if isinstance(config, GroupConfig):
        return tuple((name, setting_key(member)) for name, member in config.members.items())
    if config.num_workers == 0:
        return (0, config.pin_memory)
    return tuple(getattr(config, name) for name in TUNED_SETTINGS)

