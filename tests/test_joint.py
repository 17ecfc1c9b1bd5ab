"""One budget for several loaders: the pure split (fake hardware and workloads) and
``create_training_loaders`` on real datasets and real loaders."""

from __future__ import annotations

import pytest

from autotune import InvalidConfigError, MultiLoader, OptimalDataLoaderFactory, TunedDataLoader
from autotune.policy import joint, rules
from datasets import Busy, Indexed, Sleepy
from fakes import fake_hardware
from test_rules import WORKLOADS


def member(name: str, workload: str, share: float, batch: int = 32) -> joint.Member:
    hints = rules.DatasetHints(dataset_size=100_000, batch_size=batch)
    hw = fake_hardware(cpus=2)
    alone = rules.recommend(hw, hints, WORKLOADS[workload]).num_workers
    return joint.Member(name=name, hints=hints, workload=WORKLOADS[workload], share=share,
                        alone=alone)


def test_a_waiting_loader_next_to_a_cpu_bound_one_needs_far_fewer_workers() -> None:
    hw = fake_hardware(cpus=2)
    cpu, io = member("cpu", "python", 0.5), member("io", "io", 0.5)
    split = joint.split_workers(hw, [cpu, io])
    assert split["io"].workers < io.alone / 3  # alone it is sized for the whole machine
    assert 1 <= split["cpu"].workers <= cpu.alone
    assert "shares the loop with cpu: 50% of the batches" in split["io"].reason
    assert "the CPUs allow" in split["io"].reason and f"(alone: {io.alone})" in split["io"].reason


def test_a_larger_share_gets_more_workers() -> None:
    hw = fake_hardware(cpus=2)
    light = joint.split_workers(hw, [member("cpu", "python", 0.8), member("io", "io", 0.2)])
    heavy = joint.split_workers(hw, [member("cpu", "python", 0.2), member("io", "io", 0.8)])
    assert heavy["io"].workers > light["io"].workers


def test_two_waiting_loaders_split_the_worker_cap() -> None:
    hw = fake_hardware(cpus=2)
    split = joint.split_workers(hw, [member("a", "io", 0.5), member("b", "io", 0.5)])
    cap = rules.max_workers(hw, member("a", "io", 0.5).hints, WORKLOADS["io"])
    assert all(1 <= s.workers <= cap for s in split.values())
    assert "worker cap" in split["a"].reason or "CPUs" in split["a"].reason


def test_unmeasured_or_in_process_members_keep_their_count_alone() -> None:
    hw = fake_hardware(cpus=2)
    bare = joint.Member(name="x", hints=rules.DatasetHints(dataset_size=None, batch_size=32),
                        workload=None, share=0.5, alone=1)
    tiny = member("tiny", "tiny", 0.5)
    split = joint.split_workers(hw, [bare, tiny])
    assert split["x"].workers == 1 and "no measurement" in split["x"].reason
    assert split["tiny"].workers == tiny.alone == 0


def test_thread_budget_fits_all_workers_on_the_cpus() -> None:
    for cpus, workers in [(2, 2), (8, 3), (64, 10), (4, 12)]:
        threads, why = joint.thread_budget(fake_hardware(cpus=cpus), workers)
        assert threads >= 1 and (threads == 1 or (workers + 1) * threads <= cpus)
        assert f"{workers} workers across the loaders" in why


def test_batch_shares() -> None:
    assert joint.batch_shares("weighted", [3.0, 1.0]) == [0.75, 0.25]
    assert joint.batch_shares("round_robin", [1.0, 1.0, 1.0]) == [1 / 3] * 3
    assert joint.batch_shares("sequential", [1.0, 1.0]) == [1.0, 1.0]


# -- create_training_loaders, real loaders ----------------------------------------------------

def factory(tmp_path) -> OptimalDataLoaderFactory:
    """2 CPUs, whatever this machine has: the split is judged against that budget."""
    return OptimalDataLoaderFactory(hardware=fake_hardware(cpus=2), profile_dir=tmp_path,
                                    seed=0)


def test_create_training_loaders_sizes_them_together(tmp_path) -> None:
    datasets = {"cpu": Busy(4000, 20_000), "io": Sleepy(4000, 0.005)}
    f = factory(tmp_path)
    multi = f.create_training_loaders(datasets, 32, strategy="weighted",
                                      weights={"cpu": 1, "io": 1}, seed=0)
    assert isinstance(multi, MultiLoader) and multi.strategy == "weighted"
    assert all(isinstance(loader, TunedDataLoader) for loader in multi.loaders.values())
    io = multi.loaders["io"].autotune_config
    alone = f.create_training_loader(datasets["io"], 32).num_workers
    assert 1 <= io.num_workers < alone
    assert io.reasons["num_workers"].startswith("shares the loop with cpu")
    assert multi.loaders["io"].drop_last and multi.loaders["cpu"].num_workers >= 1
    multi.close()


def test_sequential_and_explicit_workers_size_each_alone(tmp_path) -> None:
    f = OptimalDataLoaderFactory(profile_dir=tmp_path, measure=False)
    multi = f.create_training_loaders([Indexed(64), Indexed(32)], 8, num_workers=1)
    assert [loader.num_workers for loader in multi.loaders.values()] == [1, 1]
    seen = [name for name, _ in multi]
    assert seen == ["0"] * 8 + ["1"] * 4
    multi.close()


@pytest.mark.parametrize("call, named", [
    (dict(datasets=5), "datasets=5"),
    (dict(datasets={}), "datasets= is empty"),
    (dict(strategy="weighted", weights={"a": 1}), "missing \\['b'\\]"),
    (dict(strategy="nope"), "strategy='nope'"),
    (dict(adapt=True), "adapt= is not supported"),
    (dict(batch_size=0), "batch_size=0"),
])
def test_bad_arguments(tmp_path, call: dict, named: str) -> None:
    datasets = call.pop("datasets", {"a": Indexed(8), "b": Indexed(8)})
    batch_size = call.pop("batch_size", 2)
    with pytest.raises(InvalidConfigError, match=named):
        OptimalDataLoaderFactory(profile_dir=tmp_path, measure=False).create_training_loaders(
            datasets, batch_size, **call)


def test_weighted_draws_get_a_prefetch_deep_enough_for_their_runs() -> None:
    assert joint.burst(0.5, "weighted") == 7 and joint.burst(0.9, "weighted") == 44
    assert joint.burst(0.5, "round_robin") == joint.burst(1.0, "weighted") == 1
    hw = fake_hardware(cpus=2)
    io = member("io", "io", 0.5)
    assert joint.prefetch_for_bursts(hw, io, 1, 7, 2)[0] == 7
    assert joint.prefetch_for_bursts(hw, io, 4, 7, 2) == (None, None)  # 4 x 2 hold 7
    tight = fake_hardware(cpus=2, available_bytes=40_000, shm_free_bytes=40_000)
    assert joint.prefetch_for_bursts(tight, io, 1, 7, 2) == (None, None)  # no room for more


def test_a_stream_and_a_map_style_dataset_together(tmp_path) -> None:
    from datasets import make_stream

    factory = OptimalDataLoaderFactory(profile_dir=tmp_path, measure=False,
                                       hardware=fake_hardware(cpus=2))
    multi = factory.create_training_loaders(
        {"stream": make_stream(), "map": Indexed(24)}, 4, strategy="round_robin", stop="max",
        drop_last=False)
    seen: dict[str, list[int]] = {"stream": [], "map": []}
    for name, batch in multi:
        seen[name] += batch.flatten().tolist()
    multi.close()
    assert sorted(seen["map"]) == list(range(24))
    assert len(seen["stream"]) == len(set(seen["stream"])) > 0
    assert multi.report().loaders["stream"]["batches"] == -(-len(seen["stream"]) // 4)
