"""The joint search over a group's worker counts, driven through an injected ``measure``.

No loader runs here: a surface says what the loop would measure for each pair of counts, so
these tests check what the search tries and what it chooses, not the machine.
"""

from __future__ import annotations

import itertools

from autotune import GroupConfig, LoaderConfig, Trial
from autotune.policy.joint_search import JointSearch, JointSpace

MB = 1_000_000


def configure(counts) -> GroupConfig:
    return GroupConfig(members={
        name: LoaderConfig(num_workers=w, prefetch_factor=2 if w else None,
                           persistent_workers=w > 0) for name, w in counts.items()})


def loop_rate(workers, *, cpu_needs=2, io_needs=6):
    """Two loaders at 0.5/0.5: the loop goes as fast as the slower supply allows; a CPU-bound
    loader's supply stops at the CPUs, a waiting one's at the workers it needs; every worker
    past 12 costs a little (contention)."""
    cpu, io = workers["cpu"], workers["io"]
    supply = min(1000.0 * min(cpu, cpu_needs) / cpu_needs, 1000.0 * min(io, io_needs) / io_needs)
    if cpu == 0 and io == 0:
        supply = 150.0
    return supply / (1 + 0.002 * max(0, cpu + io - 12))


class Surface:
    def __init__(self, rate, *, stall=None, wobble=(1.0,)):
        self.rate, self.stall, self.wobble = rate, stall, wobble
        self.asked: list[tuple[str, dict[str, int]]] = []
        self._runs: dict[tuple, itertools.cycle] = {}

    def __call__(self, config: GroupConfig, phase: str) -> Trial:
        workers = config.workers()
        self.asked.append((phase, workers))
        factor = next(self._runs.setdefault(tuple(workers.items()), itertools.cycle(self.wobble)))
        return Trial(config=config, phase=phase, samples_per_s=self.rate(workers) * factor,
                     peak_memory_bytes=(200 + 30 * config.num_workers) * MB,
                     stall_fraction=None if self.stall is None else self.stall(workers))


def space(start, alone, caps=None) -> JointSpace:
    return JointSpace(configure=configure, start=start, alone=alone,
                      caps=caps or {name: 64 for name in start})


def test_trims_the_loader_that_does_not_hold_the_loop_back():
    # The rules gave the waiting loader far more workers than the loop asks of it.
    surface = Surface(loop_rate)
    outcome = JointSearch(surface, space({"cpu": 2, "io": 24}, {"cpu": 2, "io": 64})).run()
    assert outcome.chosen.config.workers() == {"cpu": 2, "io": 6}
    assert outcome.baseline.config.num_workers == 0
    phases = [p for p, _ in surface.asked]
    assert phases[:3] == ["baseline", "rules", "alone"] and "trim" in phases


def test_grows_a_starved_loader_alone():
    # The rules underrated the CPU-bound loader: doubling it alone is what pays (doubling
    # both does not: the storage thrashes past 6 readers).
    surface = Surface(lambda w: loop_rate(w, cpu_needs=4) * (0.2 if w["io"] > 6 else 1))
    outcome = JointSearch(surface, space({"cpu": 1, "io": 6}, {"cpu": 1, "io": 8})).run()
    chosen = outcome.chosen.config.workers()
    assert chosen["cpu"] == 4 and chosen["io"] == 6
    assert ("grow", {"cpu": 2, "io": 6}) in surface.asked  # from the rules' 1 + 6


def test_scales_the_whole_split_up_when_every_loader_is_short():
    surface = Surface(lambda w: loop_rate(w, cpu_needs=4, io_needs=16))
    outcome = JointSearch(surface, space({"cpu": 1, "io": 4}, {"cpu": 1, "io": 4})).run()
    assert ("scale", {"cpu": 2, "io": 8}) in surface.asked
    assert outcome.chosen.config.workers() == {"cpu": 4, "io": 16}


def test_noise_picks_the_leanest_split_within_it():
    # Every split from 2 + 4 up measures within 3% of the rest: the fewest workers win.
    surface = Surface(lambda w: 1000.0 * (1 - 0.005 * (w["io"] > 4)) if w["cpu"] >= 2
                      and w["io"] >= 4 else 500.0, wobble=(1.0, 0.99))
    outcome = JointSearch(surface, space({"cpu": 2, "io": 16}, {"cpu": 2, "io": 32})).run()
    assert outcome.chosen.config.workers() == {"cpu": 2, "io": 4}
    assert "within noise" in outcome.why


def test_caps_bound_every_trial():
    surface = Surface(lambda w: 100.0 * (w["cpu"] + w["io"]))  # more is always better
    JointSearch(surface, space({"cpu": 2, "io": 4}, {"cpu": 2, "io": 4},
                               caps={"cpu": 3, "io": 5})).run()
    assert all(w["cpu"] <= 3 and w["io"] <= 5 for _, w in surface.asked)


def test_with_a_consumer_the_cheapest_split_that_keeps_up():
    # The loop keeps up once each loader supplies its share; past that, workers only cost.
    def stall(w):
        return 0.0 if w["cpu"] >= 2 and w["io"] >= 3 else 0.3
    surface = Surface(loop_rate, stall=stall)
    outcome = JointSearch(surface, space({"cpu": 2, "io": 12}, {"cpu": 2, "io": 48}),
                          keep_up=True).run()
    assert outcome.chosen.config.workers() == {"cpu": 2, "io": 3}
    assert outcome.chosen.keeps_up


def test_the_budget_stops_new_trials():
    ticks = itertools.count()
    surface = Surface(loop_rate)
    JointSearch(surface, space({"cpu": 2, "io": 24}, {"cpu": 2, "io": 64}), budget_s=8,
                clock=lambda: next(ticks)).run()
    assert len(surface.asked) <= 8


def test_a_machine_that_speeds_up_does_not_pass_for_more_workers():
    # Every setting measures the same, but each trial runs 8% faster than the one before
    # (a shared machine drifting): the pick left behind, measured again, shows the gain
    # was the drift, so the climb stops at the first step and the lean split stays.
    calls = itertools.count()
    surface = Surface(lambda w: (1000.0 if w["cpu"] and w["io"] else 300.0)
                      * 1.08 ** next(calls))
    outcome = JointSearch(surface, space({"cpu": 2, "io": 6}, {"cpu": 2, "io": 6})).run()
    phases = [p for p, _ in surface.asked]
    assert "recheck" in phases
    assert not any(p in ("scale", "grow") and w["cpu"] + w["io"] > 16
                   for p, w in surface.asked)  # it did not go on doubling
    assert outcome.chosen.config.num_workers <= 8
