"""MultiLoader: strategies, stop rules at their boundaries (counted as Lightning's
CombinedLoader counts), reproducible weighted draws, and mid-epoch resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from autotune import InvalidConfigError, MultiLoader
from datasets import Indexed, Sleepy


def counts(multi: MultiLoader) -> dict[str, int]:
    return dict(Counter(name for name, _ in multi))


@pytest.mark.parametrize("stop, expected", [
    ("min", {"a": 3, "b": 3}), ("max_cycle", {"a": 5, "b": 5}), ("max", {"a": 3, "b": 5})])
def test_round_robin_counts_like_lightning(stop: str, expected: dict) -> None:
    multi = MultiLoader({"a": range(3), "b": range(5)}, strategy="round_robin", stop=stop)
    assert counts(multi) == expected
    assert len(multi) == sum(expected.values())


def test_round_robin_order_and_cycling() -> None:
    multi = MultiLoader({"a": range(3), "b": range(5)}, strategy="round_robin")
    assert list(multi) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2),
                           ("a", 0), ("b", 3), ("a", 1), ("b", 4)]


def test_alternating_spreads_integer_weights() -> None:
    multi = MultiLoader({"a": range(4), "b": range(2)}, strategy="alternating",
                        weights={"a": 2, "b": 1}, stop="min")
    assert [name for name, _ in multi] == ["a", "b", "a", "a", "b", "a"]
    assert len(multi) == 6


def test_sequential_runs_each_to_its_end() -> None:
    for stop in ("min", "max_cycle", "max"):
        multi = MultiLoader([range(2), range(3)], stop=stop)
        assert list(multi) == [("0", 0), ("0", 1), ("1", 0), ("1", 1), ("1", 2)]


@pytest.mark.parametrize("stop", ["min", "max_cycle", "max"])
def test_boundaries_equal_lengths_and_a_single_batch(stop: str) -> None:
    assert counts(MultiLoader({"a": range(4), "b": range(4)}, strategy="round_robin",
                              stop=stop)) == {"a": 4, "b": 4}
    single = MultiLoader({"a": range(1), "b": range(3)}, strategy="round_robin", stop=stop)
    assert counts(single) == {"min": {"a": 1, "b": 1}, "max_cycle": {"a": 3, "b": 3},
                              "max": {"a": 1, "b": 3}}[stop]
    assert len(single) == sum(counts(single).values())


def test_weighted_proportions_over_10000_batches_and_reproducible() -> None:
    def draw(seed: int) -> list[str]:
        multi = MultiLoader({"a": range(20_000), "b": range(20_000)}, strategy="weighted",
                            weights={"a": 0.7, "b": 0.3}, seed=seed)
        return [name for name, _ in itertools.islice(multi, 10_000)]

    names = draw(seed=1)
    assert abs(names.count("a") / 10_000 - 0.7) <= 0.02
    assert names == draw(seed=1) and names != draw(seed=2)


@pytest.mark.parametrize("stop", ["min", "max_cycle", "max"])
def test_weighted_stop_rules(stop: str) -> None:
    multi = MultiLoader({"a": range(5), "b": range(50)}, strategy="weighted",
                        weights=[1, 1], stop=stop, seed=3)
    length = len(multi)  # of the next epoch: weighted epochs differ
    got = counts(multi)
    assert length == sum(got.values())
    if stop == "min":
        assert got["a"] == 5 or got["b"] == 50
    elif stop == "max_cycle":
        assert got["b"] == 50 and got["a"] >= 5
    else:
        assert got == {"a": 5, "b": 50}


def test_each_epoch_draws_anew_from_the_seed() -> None:
    multi = MultiLoader({"a": range(30), "b": range(30)}, strategy="weighted", seed=0)
    first, second = list(multi), list(multi)
    assert first != second
    again = MultiLoader({"a": range(30), "b": range(30)}, strategy="weighted", seed=0)
    assert list(again) == first and list(again) == second


@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=4),
       strategy=st.sampled_from(["sequential", "round_robin", "alternating", "weighted"]),
       stop=st.sampled_from(["min", "max_cycle", "max"]), seed=st.integers(0, 50))
@settings(max_examples=150, deadline=None)
def test_len_is_what_iterating_yields(lengths, strategy, stop, seed) -> None:
    if stop == "max_cycle" and 0 in lengths and strategy == "weighted":
        lengths = [n or 1 for n in lengths]  # an empty loader cycles to no end when drawn
    weights = [1 + i % 2 for i in range(len(lengths))] if strategy in (
        "alternating", "weighted") else None
    multi = MultiLoader([range(n) for n in lengths], strategy=strategy, weights=weights,
                        stop=stop, seed=seed)
    length = len(multi)
    items = list(multi)
    assert len(items) == length
    for name, value in items:  # every batch comes from its loader, in its order
        assert 0 <= value < lengths[int(name)]


@pytest.mark.parametrize("strategy, stop", [
    ("round_robin", "max_cycle"), ("round_robin", "min"), ("alternating", "max"),
    ("weighted", "max_cycle"), ("weighted", "max"), ("sequential", "max_cycle")])
@pytest.mark.parametrize("cut", [0, 1, 7, 12])
def test_resume_mid_epoch_yields_the_same_remaining_sequence(strategy, stop, cut) -> None:
    def make() -> MultiLoader:
        return MultiLoader({"a": range(5), "b": range(8), "c": range(3)}, strategy=strategy,
                           weights=[2, 1, 1] if strategy in ("alternating", "weighted")
                           else None, stop=stop, seed=11)

    whole = list(make())
    first = make()
    iterator = iter(first)
    head = [next(iterator) for _ in range(min(cut, len(whole)))]
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as in a checkpoint
    resumed = make()
    resumed.load_state_dict(state)
    assert head + list(resumed) == whole
    assert list(resumed) == _second_epoch(make)  # and the next epoch is the next epoch


def _second_epoch(make) -> list:
    multi = make()
    list(multi)
    return list(multi)


def test_resume_with_real_dataloaders_and_workers() -> None:
    def make() -> MultiLoader:
        return MultiLoader({"a": DataLoader(Indexed(12), batch_size=2, num_workers=2),
                            "b": DataLoader(Indexed(20), batch_size=4)},
                           strategy="round_robin", stop="max_cycle")

    def plain(items):
        return [(name, batch.flatten().tolist()) for name, batch in items]

    whole = plain(make())
    first = make()
    iterator = iter(first)
    head = plain(itertools.islice(iterator, 5))
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + plain(resumed) == whole


def test_report_has_each_loaders_batches_and_data_time() -> None:
    multi = MultiLoader({"slow": DataLoader(Sleepy(8, 0.005), batch_size=2),
                         "fast": DataLoader(Indexed(8), batch_size=2)}, strategy="round_robin")
    for _ in multi:
        pass
    report = multi.report()
    assert report.steps == 8 and report.loaders["slow"]["batches"] == 4  # the pass ended
    assert report.loaders["slow"]["wait_s"] > report.loaders["fast"]["wait_s"]
    assert report.loaders["fast"]["num_workers"] == 0
    assert json.loads(json.dumps(report.to_dict()))["loaders"]["slow"]["batches"] == 4


@pytest.mark.parametrize("kwargs, named", [
    (dict(loaders={}), "loaders= is empty"),
    (dict(loaders=5), "loaders=5"),
    (dict(loaders={"a": 3}), "loaders\\['a'\\]=3"),
    (dict(strategy="random"), "strategy='random'"),
    (dict(stop="longest"), "stop='longest'"),
    (dict(strategy="round_robin", weights=[1, 2]), "weights= applies to"),
    (dict(strategy="weighted", weights={"a": 1}), "missing \\['b'\\]"),
    (dict(strategy="weighted", weights=[1, -1]), "weights\\['b'\\]=-1"),
    (dict(strategy="weighted", weights=[1]), "has 1 values for 2 loaders"),
    (dict(strategy="alternating", weights=[1, 0.5]), "whole numbers"),
    (dict(seed=-1), "seed=-1"),
])
def test_bad_arguments_name_themselves(kwargs: dict, named: str) -> None:
    loaders = kwargs.pop("loaders", {"a": range(2), "b": range(2)})
    with pytest.raises(InvalidConfigError, match=named):
        MultiLoader(loaders, **kwargs)


def test_bad_state_is_refused() -> None:
    multi = MultiLoader([range(2), range(2)])
    with pytest.raises(InvalidConfigError, match=r"not a MultiLoader\.state_dict"):
        multi.load_state_dict({"epoch": 1})
    with pytest.raises(InvalidConfigError, match="3 loaders"):
        multi.load_state_dict({"epoch": 1, "seed": 0, "delivered": [0, 0, 0]})
