"""Epochs without a stop (``prefetch_across_epochs``): real loaders, real worker processes."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DistributedSampler

from autotune import LoaderConfig, OptimalDataLoaderFactory
from autotune.loading.builder import build_loader
from autotune.sources.samplers import EpochDistributedSampler

from datasets import Indexed, SleepyIndexed, Stream
from test_builder import only_this_tests_processes, wait_for_no_workers  # noqa: F401

AHEAD = LoaderConfig(num_workers=2, prefetch_factor=2, persistent_workers=True,
                     prefetch_across_epochs=True)


def indices(batches) -> list[int]:
    return [i for batch in batches for i in batch.view(-1).tolist()]


def first_batch_waits(loader, epochs: int, step_s: float) -> list[float]:
    """Seconds the loop waited for each epoch's first batch, with a simulated step."""
    waits = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i, _batch in enumerate(loader):
            if i == 0:
                waits.append(time.perf_counter() - start)
            time.sleep(step_s)
    return waits


@pytest.mark.serial
@pytest.mark.slow
def test_the_epoch_boundary_costs_no_more_than_a_step():
    """2 workers, a batch costs a worker 0.2 s, a step 0.15 s: the workers keep up, and
    with the next epoch drawn ahead its first batch is ready when the loop asks."""
    step_s = 0.15
    dataset = SleepyIndexed(24, seconds=0.05)  # 6 batches of 4 per epoch
    with build_loader(dataset, 4, AHEAD, shuffle=True) as ahead, \
            build_loader(dataset, 4, AHEAD.replace(prefetch_across_epochs=False),
                         shuffle=True) as plain:
        across = first_batch_waits(ahead, 5, step_s)
        stops = first_batch_waits(plain, 5, step_s)
    assert max(across[1:]) <= step_s, across
    assert min(stops[1:]) > max(across[1:]), (stops, across)  # torch: a whole batch's time


def test_every_epoch_once_and_reshuffled_through_the_factory():
    factory = OptimalDataLoaderFactory(measure=False, seed=3)
    with factory.create_training_loader(Indexed(72), batch_size=8, num_workers=2) as loader:
        assert loader.autotune_config.prefetch_across_epochs
        assert "no stop at the epoch boundary" in loader.autotune_config.explain()
        epochs = [indices(loader) for _ in range(5)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(72))
    assert len({tuple(e) for e in epochs}) == 5


@pytest.mark.parametrize("chosen", [(0, 1, 2, 3), (0, 4, 9, 9, 2)],
                         ids=["set_epoch matches the draw ahead", "set_epoch jumps"])
def test_set_epoch_by_hand_gets_that_epochs_order(chosen):
    sampler = EpochDistributedSampler(range(48), num_replicas=1, rank=0, seed=7)
    reference = DistributedSampler(range(48), num_replicas=1, rank=0, seed=7)
    with build_loader(Indexed(48), 8, AHEAD, shuffle=False,
                      extra={"sampler": sampler}) as loader:
        for epoch in chosen:
            loader.sampler.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert indices(loader) == list(reference), epoch


def test_without_set_epoch_the_factorys_sampler_counts_epochs_itself():
    sampler = EpochDistributedSampler(range(48), num_replicas=1, rank=0, seed=7)
    reference = DistributedSampler(range(48), num_replicas=1, rank=0, seed=7)
    with build_loader(Indexed(48), 8, AHEAD, shuffle=False,
                      extra={"sampler": sampler}) as loader:
        for epoch in range(4):
            reference.set_epoch(epoch)
            assert indices(loader) == list(reference), epoch


def test_torchs_distributed_sampler_keeps_torchs_meaning():
    """torch's own sampler orders by the epoch it was given: the same order until
    set_epoch, then that epoch's, never one drawn ahead with the old epoch."""
    sampler = DistributedSampler(range(48), num_replicas=1, rank=0, seed=7)
    reference = DistributedSampler(range(48), num_replicas=1, rank=0, seed=7)
    with build_loader(Indexed(48), 8, AHEAD, shuffle=False,
                      extra={"sampler": sampler}) as loader:
        assert indices(loader) == indices(loader) == list(reference)
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert indices(loader) == list(reference)


def test_break_then_a_whole_epoch_and_close_leaves_nothing_running():
    sampler = EpochDistributedSampler(range(40), num_replicas=1, rank=0, seed=1)
    reference = DistributedSampler(range(40), num_replicas=1, rank=0, seed=1)
    loader = build_loader(Indexed(40), 4, AHEAD, shuffle=False, extra={"sampler": sampler})
    for i, _ in enumerate(loader):  # epoch 0, left after 2 batches
        if i == 1:
            break
    reference.set_epoch(1)  # the next iter() is epoch 1, as in torch, not a later one
    assert indices(loader) == list(reference)
    reference.set_epoch(2)
    assert indices(loader) == list(reference)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    loader.close()
    assert wait_for_no_workers() == []
    reference.set_epoch(4)  # closed: iterating again starts fresh workers at the next epoch
    assert indices(loader) == list(reference)
    loader.close()
    assert wait_for_no_workers() == []


def test_epochs_smaller_than_what_is_in_flight():
    """One batch per epoch, 4 batches in flight: several epochs are drawn ahead."""
    with build_loader(Indexed(5), 8, AHEAD, shuffle=True) as loader:
        epochs = [indices(loader) for _ in range(6)]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_an_empty_dataset_yields_empty_epochs():
    with build_loader(Indexed(0), 4, AHEAD, shuffle=False) as loader:
        assert [indices(loader) for _ in range(3)] == [[], [], []]


@pytest.mark.parametrize("config, extra, dataset, why", [
    (AHEAD.replace(persistent_workers=False), {}, Indexed(8), "persistent workers"),
    (AHEAD.replace(in_order=False), {}, Indexed(8), "in_order=False"),
    (AHEAD, {"batch_sampler": [[0, 1], [2, 3]]}, Indexed(8), "batch sampler list"),
    (AHEAD, {"sampler": [3, 2, 1, 0]}, Indexed(8), "sampler list"),
    (AHEAD, {}, Stream(8), "a stream keeps its own epochs"),
])
def test_off_where_it_cannot_hold_and_explain_says_why(config, extra, dataset, why):
    with build_loader(dataset, 2, config, shuffle=False, extra=extra) as loader:
        assert not loader.autotune_config.prefetch_across_epochs
        assert why in loader.autotune_config.reasons["prefetch_across_epochs"]
        first, second = indices(loader), indices(loader)
    assert sorted(first) == sorted(second)  # plain epochs, as torch gives them


def test_the_keyword_turns_it_off():
    factory = OptimalDataLoaderFactory(measure=False)
    with factory.create_training_loader(Indexed(16), batch_size=4, num_workers=1,
                                        prefetch_across_epochs=False) as loader:
        assert not loader.autotune_config.prefetch_across_epochs
        assert loader.autotune_config.reasons["prefetch_across_epochs"] == "set explicitly"
    validation = factory.create_validation_loader(Indexed(16), batch_size=4, num_workers=1)
    assert not validation.autotune_config.prefetch_across_epochs


def test_a_failing_sample_then_a_fresh_epoch():
    class FailsOnce(Indexed):
        failed = False

        def __getitem__(self, index: int) -> torch.Tensor:
            if index == 5 and not type(self).failed:
                type(self).failed = True
                raise ValueError("corrupt record")
            return super().__getitem__(index)

    with build_loader(FailsOnce(16), 4, AHEAD, shuffle=False) as loader:
        with pytest.raises(ValueError, match="corrupt record"):
            indices(loader)
        assert indices(loader) == list(range(16))


def test_a_multiloader_of_loaders_that_run_across_epochs():
    factory = OptimalDataLoaderFactory(measure=False, seed=2)
    multi = factory.create_training_loaders({"a": Indexed(48), "b": Indexed(24)}, batch_size=4,
                                            strategy="round_robin", stop="max", num_workers=1)
    assert all(loader.autotune_config.prefetch_across_epochs
               for loader in multi.loaders.values())
    for _ in range(3):
        seen: dict[str, list[int]] = {"a": [], "b": []}
        for name, batch in multi:
            seen[name] += batch.view(-1).tolist()
        assert sorted(seen["a"]) == list(range(48)) and sorted(seen["b"]) == list(range(24))
    multi.close()
    assert wait_for_no_workers() == []


@pytest.mark.slow
def test_adapt_runs_across_epochs_too(tmp_path):
    """The adaptive loader draws the next epoch ahead itself: the same boundary as above,
    every sample once per epoch, each epoch its own order."""
    factory = OptimalDataLoaderFactory(profile_dir=tmp_path, measure=False, seed=4)
    loader = factory.create_training_loader(SleepyIndexed(24, seconds=0.05), batch_size=4,
                                            num_workers=2, adapt=True, adapt_every=1000)
    assert loader.autotune_config.prefetch_across_epochs
    waits, epochs = [], []
    for _ in range(5):
        start, seen = time.perf_counter(), []
        for i, batch in enumerate(loader):
            if i == 0:
                waits.append(time.perf_counter() - start)
            seen += batch.view(-1).tolist()
            time.sleep(0.15)
        epochs.append(seen)
    loader.close()
    assert wait_for_no_workers() == []
    assert all(sorted(e) == list(range(24)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 5
    assert max(waits[1:]) <= 0.15, waits
