"""IterableDatasets (streams) through the factory, measure_workload, the tuner and the CLI,
the sharding check, shard_iterable, the rank samplers and create_dataloaders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import get_worker_info

import autotune
from autotune import (DatasetError, InvalidConfigError, LoaderConfig, OptimalDataLoaderFactory,
                      WorkerSafetyError, create_dataloaders, measure_workload, shard_iterable)
from autotune.loading.safety import check_stream_sharding
from autotune.sources.samplers import EpochDistributedSampler, ShardSampler
from autotune.tuning.trial import _WholeEpochs, run_trial
from autotune.policy import rules
from autotune.system import distributed

from datasets import (EmptyStream, Indexed, SizedStream, Stream, StreamFailsAt, StuckStream,
                       UnshardedStream)
from fakes import fake_hardware

ROOT = Path(__file__).resolve().parent.parent


def items(loader) -> list[int]:
    return sorted(torch.cat([batch.view(-1) for batch in loader]).tolist())


@pytest.fixture
def factory() -> OptimalDataLoaderFactory:
    return OptimalDataLoaderFactory(seed=0)


def test_a_sharded_stream_with_two_workers_yields_each_item_once_per_epoch(factory):
    with factory.create_training_loader(Stream(96), batch_size=8, num_workers=2) as loader:
        assert loader.autotune_config.persistent_workers
        for _ in range(2):  # the second epoch reuses the persistent workers
            assert items(loader) == list(range(96))


def test_shard_iterable_splits_an_unsharded_stream_across_workers(factory):
    stream = shard_iterable(UnshardedStream(100))
    with factory.create_training_loader(stream, batch_size=8, num_workers=2,
                                        drop_last=False) as loader:
        assert items(loader) == list(range(100))
    assert shard_iterable(stream) is stream  # wrapping twice changes nothing


def test_an_unsharded_stream_is_refused_with_the_fix_before_workers_start(factory):
    with pytest.raises(WorkerSafetyError) as caught:
        factory.create_training_loader(UnshardedStream(), batch_size=8, num_workers=2)
    message = str(caught.value)
    assert "UnshardedStream" in message and "once per worker" in message
    assert "get_worker_info()" in message and "autotune.shard_iterable(dataset)" in message
    assert get_worker_info() is None  # the simulated worker info was taken back


def test_one_worker_needs_no_sharding(factory):
    with factory.create_training_loader(UnshardedStream(32), batch_size=8, num_workers=1,
                                        drop_last=False) as loader:
        assert items(loader) == list(range(32))


def test_a_stuck_stream_fails_the_sharding_check_in_bounded_time():
    with pytest.raises(autotune.AutotuneError, match=r"did not finish within 0\.5 s"):
        check_stream_sharding(StuckStream(), timeout_s=0.5)
    assert get_worker_info() is None


def test_a_stream_keeps_its_length_and_one_without_has_none(factory):
    sized = factory.create_validation_loader(SizedStream(50), batch_size=8, num_workers=0)
    assert len(sized) == 7 and len(sized.dataset) == 50
    unsized = factory.create_validation_loader(Stream(50), batch_size=8)
    with pytest.raises(TypeError):
        len(unsized)
    assert items(unsized) == list(range(50))


def test_a_stream_takes_no_sampler(factory):
    for keyword in ("sampler", "batch_sampler"):
        with pytest.raises(InvalidConfigError, match=f"{keyword}= was given for an "
                           "IterableDataset"):
            factory.create_training_loader(Stream(), batch_size=8, num_workers=0,
                                           **{keyword: [0, 1]})


def test_the_rules_size_a_stream_of_unknown_length():
    waits = autotune.WorkloadProfile(samples=16, sec_per_sample=0.005,
                                     cpu_sec_per_sample=1e-4, sample_bytes=8)
    hw = fake_hardware(cpus=2)
    stream = rules.recommend(hw, autotune.DatasetHints(dataset_size=None, batch_size=8), waits)
    short = rules.recommend(hw, autotune.DatasetHints(dataset_size=16, batch_size=8), waits)
    assert short.num_workers <= 2 < stream.num_workers  # no cap from batches per epoch
    assert "mostly wait on I/O" in stream.reasons["num_workers"]


def test_measure_workload_iterates_a_stream():
    profile = measure_workload(Stream(40, seconds=0.001), samples=16)
    assert profile.samples >= 8 and profile.sec_per_sample >= 0.001
    assert 1 - profile.cpu_fraction > 0.5  # it waits


def test_measure_workload_names_the_item_of_a_stream_that_fails():
    with pytest.raises(DatasetError, match=r"item \d+ of the stream raised ValueError: "
                                           "corrupt record"):
        measure_workload(StreamFailsAt(3))
    with pytest.raises(InvalidConfigError, match="EmptyStream yielded no items"):
        measure_workload(EmptyStream())
    with pytest.raises(DatasetError, match="item 1 of the stream raised TimeoutError"):
        measure_workload(StuckStream(), sample_timeout_s=0.5)


def test_an_error_in_a_worker_names_the_item_of_the_stream(factory):
    loader = factory.create_training_loader(StreamFailsAt(5), batch_size=2, num_workers=1)
    with loader, pytest.raises(ValueError, match="corrupt record") as caught:
        list(loader)
    assert "raised making item 5 in worker 0 of the stream (StreamFailsAt)" in str(caught.value)


def test_the_tuner_measures_a_stream_across_its_epochs():
    result = autotune.Autotuner(Stream(64, seconds=0.001), batch_size=8, budget_s=4,
                                max_workers=4).run()
    assert result.best_samples_per_s > 0 and all(t.ok for t in result.trials)


def test_the_tuner_refuses_an_unsharded_stream_before_any_trial():
    with pytest.raises(WorkerSafetyError, match="shard_iterable"):
        autotune.Autotuner(UnshardedStream(), batch_size=8, budget_s=4).run()


def test_cli_tune_on_an_unsharded_stream_is_one_line_not_a_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "autotune", "tune",
         f"{ROOT}/tests/datasets.py:make_unsharded_stream", "--batch-size", "8",
         "--budget-s", "4", "--profile-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("autotune: error: UnshardedStream yields the same items")
    assert "Traceback" not in done.stderr


def test_create_dataloaders_splits_reproducibly_and_shares_one_measurement(monkeypatch):
    calls = []
    real = autotune.factory.pipeline.measure_workload
    monkeypatch.setattr(autotune.factory.pipeline, "measure_workload",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    train, val, test = create_dataloaders(Indexed(103), 8, splits=(0.8, 0.1, 0.1), seed=3)
    assert len(calls) == 1
    parts = [list(loader.dataset.dataset.indices) for loader in (train, val, test)]
    assert sorted(sum(parts, [])) == list(range(103))  # disjoint and covering
    assert [len(p) for p in parts] == [83, 10, 10]
    again = create_dataloaders(Indexed(103), 8, splits=(0.8, 0.1, 0.1), seed=3,
                               num_workers=0)
    assert [list(loader.dataset.dataset.indices) for loader in again] == parts
    other = create_dataloaders(Indexed(103), 8, seed=4, num_workers=0)
    assert list(other[0].dataset.dataset.indices) != parts[0]
    assert train.autotune_config.drop_last and not val.autotune_config.drop_last


def test_create_dataloaders_leaves_out_a_split_of_none_or_zero():
    train, val, test = create_dataloaders(Indexed(50), 8, splits=(0.5, None, 0),
                                          num_workers=0)
    assert val is None and test is None and len(train.dataset) == 25


@pytest.mark.parametrize("splits, message", [
    ((0.8, 0.3, 0.1), "add up to 1.2 > 1"),
    ((0.8, 0.2), "must be three fractions"),
    ("0.8", "must be three fractions"),
    ((0.8, -0.1, 0.1), "val fraction -0.1 must be a number from 0 to 1"),
    ((0.8, 0.001, 0.1), "val 0.001 of 50 samples: less than one sample"),
    ((None, 0, None), "leaves every split out"),
])
def test_create_dataloaders_refuses_bad_splits(splits, message):
    with pytest.raises(InvalidConfigError, match=message):
        create_dataloaders(Indexed(50), 8, splits=splits, num_workers=0)


def test_create_dataloaders_cannot_split_a_stream():
    with pytest.raises(InvalidConfigError, match="cannot split an IterableDataset"):
        create_dataloaders(Stream(), 8)


def test_the_epoch_sampler_reshuffles_every_epoch_and_set_epoch_wins():
    sampler = EpochDistributedSampler(range(40), num_replicas=2, rank=0, seed=7)
    first, second = list(sampler), list(sampler)
    assert first != second and sorted(first) != sorted(range(40))
    sampler.set_epoch(0)
    assert list(sampler) == first
    other = EpochDistributedSampler(range(40), num_replicas=2, rank=1, seed=7)
    assert sorted(first + list(other)) == list(range(40))


def test_the_shard_sampler_keeps_order_without_padding():
    shards = [list(ShardSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert [len(ShardSampler(11, rank=r, world_size=3)) for r in range(3)] == [4, 4, 3]
    runs = [list(ShardSampler(11, rank=r, world_size=3, contiguous=True)) for r in range(3)]
    assert runs == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10]]
    assert [len(ShardSampler(11, rank=r, world_size=3, contiguous=True))
            for r in range(3)] == [3, 4, 4]


def test_torchrun_environment_alone_gives_each_rank_its_share(factory, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    train = factory.create_training_loader(Indexed(64), batch_size=8, num_workers=0)
    val = factory.create_validation_loader(Indexed(63), batch_size=8, num_workers=0)
    assert isinstance(train.sampler, EpochDistributedSampler) and train.sampler.rank == 1
    assert items(val) == list(range(1, 63, 2))
    explicit = factory.create_training_loader(Indexed(64), batch_size=8, num_workers=0,
                                              sampler=list(range(64)))
    assert explicit.sampler == list(range(64))  # an explicit sampler still wins
    ordered = factory.create_training_loader(Indexed(64), batch_size=8, num_workers=0,
                                             shuffle=False)
    in_order = torch.cat([batch.view(-1) for batch in ordered]).tolist()
    assert in_order == list(range(1, 64, 2))  # shuffle=False reaches the rank's sampler
    shuffled = factory.create_validation_loader(Indexed(64), batch_size=8, num_workers=0,
                                                shuffle=True)
    assert shuffled.sampler.shuffle and len(set(items(shuffled))) == 32



@pytest.mark.parametrize("env, named", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set without RANK or LOCAL_RANK"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
])
def test_half_a_torchrun_environment_warns_and_reads_the_whole_dataset(factory, monkeypatch,
                                                                     env, named):
    monkeypatch.setattr(distributed, "_warned", set())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.warns(UserWarning, match="rank 0 of 1") as caught:
        train = factory.create_training_loader(Indexed(64), batch_size=8, num_workers=0)
        val = factory.create_validation_loader(Indexed(63), batch_size=8, num_workers=0)
    assert named in str(caught[0].message) and len(caught) == 1  # once, for both loaders
    assert sorted(items(train)) == list(range(64)) and items(val) == list(range(63))


def test_torchrun_problem_reads_only_whole_jobs_as_jobs():
    assert distributed.torchrun_problem({}) is None
    assert distributed.torchrun_problem({"WORLD_SIZE": "1"}) is None
    assert distributed.torchrun_problem({"WORLD_SIZE": "4", "RANK": "3"}) is None
    assert distributed.torchrun_problem({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) is None  # Lightning
    assert "below 1" in distributed.torchrun_problem({"WORLD_SIZE": "0"})
    assert "LOCAL_RANK='x'" in distributed.torchrun_problem({"WORLD_SIZE": "2", "RANK": "0",
                                                             "LOCAL_RANK": "x"})

def test_a_trial_counts_a_short_stream_over_whole_epochs():
    trial = run_trial(Stream(96, seconds=0.001), 8, LoaderConfig(num_workers=2,
                      persistent_workers=True), phase="test", window_s=0.3, hang_s=10)
    assert trial.ok and trial.epoch_samples == 96 and trial.samples_drawn > 96
    counted = round(trial.samples_per_s * trial.window_s)
    assert counted % 96 == 0  # a whole number of epochs, wherever counting began


def test_whole_epochs_are_counted_only_when_reachable_in_time():
    short = _WholeEpochs(epoch=96)
    assert not short.done(counted=150, drawn=200, rate=1000.0, seconds_left=1.0)  # on to 192
    assert short.target == 192
    assert short.done(counted=192, drawn=242, rate=1000.0, seconds_left=0.8)
    long = _WholeEpochs(epoch=10**6)
    assert long.done(counted=5000, drawn=6000, rate=1000.0, seconds_left=4.0)  # the window
    seen = _WholeEpochs(epoch=10**6)
    seen.ended(drawn=300)  # this trial's own first epoch wins over earlier ones
    assert not seen.done(counted=400, drawn=500, rate=1000.0, seconds_left=1.0)
    assert seen.target == 600


def test_a_trial_waits_for_a_first_epoch_end_only_while_it_may_come():
    unknown = _WholeEpochs()
    assert not unknown.done(counted=500, drawn=600, rate=1000.0, seconds_left=1.0)
    drew_more = _WholeEpochs(at_least=50_000)  # an earlier trial drew 50,000 without an end
    assert drew_more.done(counted=500, drawn=600, rate=1000.0, seconds_left=10.0)
    assert not drew_more.done(counted=500, drawn=600, rate=10_000.0, seconds_left=10.0)
