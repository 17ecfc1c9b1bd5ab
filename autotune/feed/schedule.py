"""Which loader gives the next batch: the pure bookkeeping behind ``MultiLoader``.

Strategies: ``sequential`` (each loader in turn to its end), ``round_robin`` (one batch from
each in turn), ``alternating`` (a fixed, evenly spread pattern from integer weights: {a: 2,
b: 1} gives a, b, a), ``weighted`` (random by weights, reproducible from the seed).

Stop rules, counted as Lightning's ``CombinedLoader`` counts them. Round-based strategies
(round robin, alternating) check them at the end of a round, so round robin over loaders of
3 and 5 batches yields 3+3 with ``min``, 5+5 with ``max_cycle`` and 3+5 with ``max``:

- ``min``: stop once any loader has ended;
- ``max_cycle``: a loader that ends starts again until every loader has ended once;
- ``max``: ended loaders are skipped until all have ended.

``weighted`` checks after every draw (a round is one draw); ``sequential`` runs every loader
to its end whatever the rule. The schedule only learns that a loader ended when told
(``ended``); ``MultiLoader`` holds one batch ahead per loader to tell it in time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

STRATEGIES = ("sequential", "round_robin", "alternating", "weighted")
STOPS = ("min", "max_cycle", "max")


class Schedule:
    """One epoch's order. ``pick()`` -> (loader index, start a new pass?) or None at the end."""

    def __init__(self, count: int, strategy: str, weights: Sequence[float], stop: str,
                 seed: int) -> None:
        self.count, self.strategy, self.stop = count, strategy, stop
        self.weights = list(weights)
        self.rng = random.Random(seed)
        self.pattern = _spread(self.weights) if strategy == "alternating" else list(range(count))
        self.position = 0  # in the round's pattern; for sequential, the loader running
        self.started = [False] * count  # a pass was begun in this epoch
        self.live = [True] * count  # the current pass may still have batches
        self.ended_once = [False] * count
        self.finished = False

    def pick(self) -> tuple[int, bool] | None:
        """The loader to take the next batch from, and whether to begin a new pass of it."""
        while not self.finished:
            index = self._next_slot()
            if index is None:
                continue  # a round ended (the stop rule was checked) or sequential moved on
            if not self.started[index]:
                self.started[index] = True
                return index, True
            if self.live[index]:
                return index, False
            if self.stop == "max_cycle" and not all(self.ended_once):
                self.live[index] = True
                return index, True
        return None

    def ended(self, index: int) -> None:
        """The current pass of loader ``index`` has no batch left."""
        self.live[index] = False
        self.ended_once[index] = True

    def _next_slot(self) -> int | None:
        if self.strategy == "sequential":
            if self.position >= self.count:
                self.finished = True
                return None
            index = self.position
            if self.started[index] and not self.live[index]:
                self.position += 1
                return None
            return index
        if self.strategy == "weighted":
            self._check_stop()
            if self.finished:
                return None
            candidates = [i for i in range(self.count)
                          if self.stop != "max" or self.live[i] or not self.started[i]]
            return self.rng.choices(candidates, [self.weights[i] for i in candidates])[0]
        if self.position >= len(self.pattern):  # the round is over
            self.position = 0
            self._check_stop()
            return None
        index = self.pattern[self.position]
        self.position += 1
        return index

    def _check_stop(self) -> None:
        if self.stop == "min":
            self.finished = any(self.ended_once)
        elif self.stop == "max_cycle":
            self.finished = all(self.ended_once)
        else:
            self.finished = all(self.started[i] and not self.live[i] for i in range(self.count))

    def state(self) -> dict[str, Any]:
        """Plain data (lists and ints) from which ``restore`` continues exactly here."""
        version, internal, gauss = self.rng.getstate()
        return {"position": self.position, "started": list(self.started),
                "live": list(self.live), "ended_once": list(self.ended_once),
                "finished": self.finished, "rng": [version, list(internal), gauss]}

    def restore(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.started = [bool(x) for x in state["started"]]
        self.live = [bool(x) for x in state["live"]]
        self.ended_once = [bool(x) for x in state["ended_once"]]
        self.finished = bool(state["finished"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def count_batches(schedule: Schedule, lengths: Sequence[int]) -> int:
    """Batches the schedule yields when loader i has ``lengths[i]`` batches a pass: the
    schedule run on counters (what ``len(MultiLoader)`` says)."""
    left = list(lengths)
    total = 0
    while (pick := schedule.pick()) is not None:
        index, new_pass = pick
        if new_pass:
            left[index] = lengths[index]
            if left[index] == 0:
                schedule.ended(index)
                continue
        left[index] -= 1
        total += 1
        if left[index] == 0:
            schedule.ended(index)
    return total


def _spread(weights: Sequence[float]) -> list[int]:
    """A round in which loader i appears ``weights[i]`` times, spread out evenly (smooth
    weighted round robin: {2, 1} -> 0, 1, 0)."""
    counts = [int(w) for w in weights]
    current = [0] * len(counts)
    pattern = []
    for _ in range(sum(counts)):
        current = [c + w for c, w in zip(current, counts)]
        best = max(range(len(counts)), key=lambda i: current[i])
        current[best] -= sum(counts)
        pattern.append(best)
    return pattern
