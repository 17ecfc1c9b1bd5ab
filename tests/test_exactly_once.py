"""Exactly once, whatever changes between epochs: the factory's training loaders (persistent
workers, the next epoch drawn ahead) against torch's own ``DataLoader`` as the oracle.

Each test runs real loaders with real worker processes and changes something between two
epochs, after the previous epoch was consumed to its end: the dataset's length, the seed of
the sampler's generator, a ``WeightedRandomSampler``'s weights, an attribute of the dataset
(or of an object it holds). The factory's epoch must hold exactly the batches torch's loader
yields then. And with a seeded factory the batches are the same for any worker count.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import (DataLoader, RandomSampler, SequentialSampler,
                              WeightedRandomSampler)

from autotune import OptimalDataLoaderFactory
from autotune.policy import adapt

from datasets import Indexed, Sized


class Pictures(Sized):
    """Sample i is a 1 x size_px x size_px image full of float(i) (progressive resizing)."""

    def __init__(self, size: int = 12, size_px: int = 8) -> None:
        self.size, self.size_px = size, size_px

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((1, self.size_px, self.size_px), float(index))


class Scale:
    """A transform whose setting the training loop changes between epochs."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Transformed(Sized):
    """Sample i is float(i) three times, through ``self.transform`` (one level down)."""

    def __init__(self, size: int = 12) -> None:
        self.size, self.transform = size, Scale()

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(torch.full((3,), float(index)))


class Draws(Sized):
    """Sample i is (i, random's draw, numpy's global draw, torch's draw): no worker id."""

    def __init__(self, size: int = 30) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()],
                            dtype=torch.float64)


def epoch_of(loader) -> list[torch.Tensor]:
    return [batch for batch in loader]


def firsts(batches: list[torch.Tensor]) -> list[list[float]]:
    """Each batch's samples by their first element (the index), for failure messages."""
    return [batch.reshape(len(batch), -1)[:, 0].tolist() for batch in batches]


def assert_same_epoch(got: list[torch.Tensor], expected: list[torch.Tensor], what: str,
                      oracle: str = "torch") -> None:
    """The same number of batches, each of the same shape and bit-identical."""
    detail = f"{what}: got {firsts(got)}, {oracle} {firsts(expected)}"
    assert len(got) == len(expected), f"{len(got)} batches, {oracle} {len(expected)}; {detail}"
    for i, (ours, theirs) in enumerate(zip(got, expected)):
        assert ours.shape == theirs.shape, f"batch {i}: {ours.shape} vs {theirs.shape}; {detail}"
        same = torch.equal(ours, theirs)
        assert same, f"batch {i} differs: {ours.tolist()} vs {theirs.tolist()}; {detail}"


@contextmanager
def twin(loader, dataset, **kwargs):
    """torch's own DataLoader with ``loader``'s settings (``kwargs`` win); its persistent
    workers are shut down at the end."""
    settings = {"batch_size": loader.batch_size, "drop_last": loader.drop_last,
                "num_workers": loader.num_workers, "prefetch_factor": loader.prefetch_factor,
                "persistent_workers": loader.persistent_workers, **kwargs}
    reference = DataLoader(dataset, **settings)
    try:
        yield reference
    finally:
        if getattr(reference, "_iterator", None) is not None:
            reference._iterator._shutdown_workers()


def order(kind: str, dataset, seed: int = 7) -> dict:
    if kind == "shuffle=False":
        return {"shuffle": False}
    if kind == "SequentialSampler":
        return {"sampler": SequentialSampler(dataset)}
    return {"sampler": RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))}


def training_loader(dataset, batch_size: int, **kwargs):
    factory = OptimalDataLoaderFactory(measure=False, seed=0)
    return factory.create_training_loader(dataset, batch_size, num_workers=2, **kwargs)


# 1. the dataset's length changes between epochs


@pytest.mark.parametrize("sizes", [[10, 23, 30], [23, 7, 5]], ids=["grows", "shrinks"])
@pytest.mark.parametrize("kind", ["shuffle=False", "SequentialSampler", "RandomSampler"])
def test_a_length_changed_between_epochs_gives_torchs_epoch_of_that_length(kind, sizes):
    ours, theirs = Indexed(sizes[0]), Indexed(sizes[0])
    with training_loader(ours, 4, drop_last=False, **order(kind, ours)) as loader, \
            twin(loader, theirs, **order(kind, theirs)) as reference:
        for epoch, size in enumerate(sizes):
            ours.size = theirs.size = size
            assert_same_epoch(epoch_of(loader), epoch_of(reference),
                              f"epoch {epoch}, {size} samples ({kind})")


# 2. the user reseeds the order's generator before each epoch


@pytest.mark.parametrize("where", ["RandomSampler(generator=g)", "generator=g, shuffle=True"])
def test_a_generator_reseeded_before_each_epoch_gives_torchs_order(where):
    """From the second epoch on (torch's first iter() also draws its workers' base seed from
    the loader's generator: not promised), the order torch draws after the reseed."""
    ours, theirs = Indexed(30), Indexed(30)
    g_ours, g_theirs = torch.Generator(), torch.Generator()

    def shuffled(dataset, generator) -> dict:
        if where.startswith("RandomSampler"):
            return {"sampler": RandomSampler(dataset, generator=generator)}
        return {"generator": generator, "shuffle": True}

    with training_loader(ours, 4, drop_last=False, **shuffled(ours, g_ours)) as loader, \
            twin(loader, theirs, **shuffled(theirs, g_theirs)) as reference:
        for epoch in range(4):
            g_ours.manual_seed(100 + epoch)
            g_theirs.manual_seed(100 + epoch)
            got, expected = epoch_of(loader), epoch_of(reference)
            if epoch > 0 or where.startswith("RandomSampler"):
                assert_same_epoch(got, expected, f"epoch {epoch} ({where})")


# 3. a WeightedRandomSampler's weights changed in place


def test_weights_changed_in_place_between_epochs_give_torchs_draws():
    ours, theirs = Indexed(40), Indexed(40)
    samplers = [WeightedRandomSampler(torch.ones(40, dtype=torch.float64), 40,
                                      generator=torch.Generator().manual_seed(5))
                for _ in range(2)]
    keep_below_20 = (torch.arange(40) < 20).to(torch.float64)
    with training_loader(ours, 6, drop_last=False, sampler=samplers[0]) as loader, \
            twin(loader, theirs, sampler=samplers[1]) as reference:
        assert_same_epoch(epoch_of(loader), epoch_of(reference), "epoch 0, equal weights")
        for sampler in samplers:
            sampler.weights[:10] = 0
        expected = epoch_of(reference)
        assert min(torch.cat(expected).view(-1).tolist()) >= 10  # torch draws with the new weights
        assert_same_epoch(epoch_of(loader), expected, "epoch 1, weights[:10] = 0")
        for sampler in samplers:
            sampler.weights.mul_(keep_below_20)
        expected = epoch_of(reference)
        assert set(torch.cat(expected).view(-1).tolist()) <= set(range(10, 20))
        assert_same_epoch(epoch_of(loader), expected, "epoch 2, weights.mul_(below 20)")


# 4. an attribute of the dataset changed between epochs reaches the workers


def set_path(obj, path: str, value) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        obj = getattr(obj, parent)
    setattr(obj, name, value)


@pytest.mark.parametrize("make, path, values", [
    (Pictures, "size_px", [8, 4, 6]),
    (Transformed, "transform.scale", [1.0, 3.0, 0.5]),
], ids=["progressive resizing", "an attribute one level down"])
def test_an_attribute_changed_between_epochs_reaches_the_workers(make, path, values, caplog):
    caplog.set_level(logging.INFO, logger="autotune")
    dataset = make()
    reference = DataLoader(dataset, batch_size=5, shuffle=False)  # torch's default: no workers
    with training_loader(dataset, 5, drop_last=False, shuffle=False) as loader:
        for epoch, value in enumerate(values):
            set_path(dataset, path, value)
            assert_same_epoch(epoch_of(loader), epoch_of(reference),
                              f"epoch {epoch}, {path} = {value}")
        explained = loader.autotune_config.explain()
    assert "restarted" in explained, explained
    assert any("restart" in record.getMessage().lower() for record in caplog.records
               if record.name.startswith("autotune") and record.levelno == logging.INFO)


def worker_pids(loader) -> list[int]:
    return [worker.pid for worker in loader._iterator._workers]  # torch's persistent iterator


def test_without_a_change_the_same_workers_run_on_and_nothing_restarts():
    dataset = Pictures()
    reference = DataLoader(dataset, batch_size=5, shuffle=False)
    with training_loader(dataset, 5, drop_last=False, shuffle=False) as loader:
        assert_same_epoch(epoch_of(loader), epoch_of(reference), "epoch 0")
        pids = worker_pids(loader)
        assert len(pids) == 2
        for epoch in (1, 2):
            assert_same_epoch(epoch_of(loader), epoch_of(reference), f"epoch {epoch}")
            assert worker_pids(loader) == pids
        assert "restarted" not in loader.autotune_config.explain()


# 5. a seeded factory: the same batches for any worker count


def seeded_epochs(factory: OptimalDataLoaderFactory, workers: int) -> list[list[torch.Tensor]]:
    """Three epochs of a shuffled training loader (drop_last: 7 batches of 30 samples)."""
    with factory.create_training_loader(Draws(30), 4, num_workers=workers) as loader:
        return [epoch_of(loader) for _ in range(3)]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 5 worker processes")
def test_a_seeded_factory_gives_the_same_batches_for_any_worker_count():
    factory = OptimalDataLoaderFactory(measure=False, seed=0)
    runs = {workers: seeded_epochs(factory, workers) for workers in (0, 2, 5)}
    assert not torch.equal(torch.cat(runs[0][0]), torch.cat(runs[0][1]))  # reshuffled
    for workers in (2, 5):
        for epoch in range(3):
            assert_same_epoch(runs[workers][epoch], runs[0][epoch],
                              f"{workers} workers, epoch {epoch}", oracle="0 workers")


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    first, again, other = (seeded_epochs(OptimalDataLoaderFactory(measure=False, seed=seed), 2)
                           for seed in (0, 0, 1))
    for epoch in range(3):
        assert_same_epoch(again[epoch], first[epoch], f"seed 0 again, epoch {epoch}",
                          oracle="seed 0")
    assert any(not torch.equal(a, b) for epoch in range(3)
               for a, b in zip(first[epoch], other[epoch]))


# The same guarantees for create_training_loader(..., adapt=True): an AdaptiveLoader draws its
# own epoch order ahead (loading.draws) and may change its worker count between any two steps


def adaptive_loader(dataset, batch_size: int, **kwargs):
    """Starts at 2 workers; ``adapt_every`` large: no change unless a test forces one."""
    factory = OptimalDataLoaderFactory(measure=False, seed=0)
    return factory.create_training_loader(dataset, batch_size, num_workers=2, adapt=True,
                                          adapt_every=1000, **kwargs)


def settings_of(loader) -> SimpleNamespace:
    """What ``twin`` reads off a loader, for an ``AdaptiveLoader`` (from its settings now)."""
    config = loader.autotune_config
    return SimpleNamespace(batch_size=loader.batch_size, drop_last=config.drop_last,
                           num_workers=config.num_workers,
                           prefetch_factor=config.prefetch_factor,
                           persistent_workers=config.persistent_workers)


def forced(loader, script: dict[int, int]) -> None:
    """After the step that makes ``loader.steps`` a key of ``script``, the loader moves to
    that many workers, through its own path for a change it decided (``_watch``)."""
    def watch():
        workers = script.get(loader.steps)
        return None if workers is None else adapt.Change(workers=workers, reason="forced")

    loader._watch = watch


@pytest.mark.parametrize("sizes", [[10, 23, 30], [23, 7, 5]], ids=["grows", "shrinks"])
@pytest.mark.parametrize("kind", ["shuffle=False", "RandomSampler"])
def test_adaptive_a_length_changed_between_epochs_gives_torchs_epoch_of_that_length(kind,
                                                                                     sizes):
    ours, theirs = Indexed(sizes[0]), Indexed(sizes[0])
    with adaptive_loader(ours, 4, drop_last=False, **order(kind, ours)) as loader, \
            twin(settings_of(loader), theirs, **order(kind, theirs)) as reference:
        for epoch, size in enumerate(sizes):
            ours.size = theirs.size = size
            assert_same_epoch(epoch_of(loader), epoch_of(reference),
                              f"adapt=True, epoch {epoch}, {size} samples ({kind})")
        assert not loader.changes


def test_adaptive_a_generator_reseeded_before_each_epoch_gives_torchs_order():
    ours, theirs = Indexed(30), Indexed(30)
    g_ours, g_theirs = torch.Generator(), torch.Generator()
    with adaptive_loader(ours, 4, drop_last=False,
                         sampler=RandomSampler(ours, generator=g_ours)) as loader, \
            twin(settings_of(loader), theirs,
                 sampler=RandomSampler(theirs, generator=g_theirs)) as reference:
        for epoch in range(4):
            g_ours.manual_seed(100 + epoch)
            g_theirs.manual_seed(100 + epoch)
            assert_same_epoch(epoch_of(loader), epoch_of(reference),
                              f"adapt=True, epoch {epoch}, seed {100 + epoch}")
        assert not loader.changes


def test_adaptive_weights_changed_in_place_between_epochs_give_torchs_draws():
    ours, theirs = Indexed(40), Indexed(40)
    samplers = [WeightedRandomSampler(torch.ones(40, dtype=torch.float64), 40,
                                      generator=torch.Generator().manual_seed(5))
                for _ in range(2)]
    keep_below_20 = (torch.arange(40) < 20).to(torch.float64)
    with adaptive_loader(ours, 6, drop_last=False, sampler=samplers[0]) as loader, \
            twin(settings_of(loader), theirs, sampler=samplers[1]) as reference:
        assert_same_epoch(epoch_of(loader), epoch_of(reference),
                          "adapt=True, epoch 0, equal weights")
        for sampler in samplers:
            sampler.weights[:10] = 0
        expected = epoch_of(reference)
        assert min(torch.cat(expected).view(-1).tolist()) >= 10  # torch draws with the new weights
        assert_same_epoch(epoch_of(loader), expected, "adapt=True, epoch 1, weights[:10] = 0")
        for sampler in samplers:
            sampler.weights.mul_(keep_below_20)
        expected = epoch_of(reference)
        assert set(torch.cat(expected).view(-1).tolist()) <= set(range(10, 20))
        assert_same_epoch(epoch_of(loader), expected,
                          "adapt=True, epoch 2, weights.mul_(below 20)")
        assert not loader.changes


@pytest.mark.parametrize("make, path, values", [
    (Pictures, "size_px", [8, 4, 6]),
    (Transformed, "transform.scale", [1.0, 3.0, 0.5]),
], ids=["progressive resizing", "an attribute one level down"])
def test_adaptive_an_attribute_changed_between_epochs_reaches_the_workers(make, path, values,
                                                                          caplog):
    """The restart is logged, and ``explain()`` says so."""
    caplog.set_level(logging.INFO, logger="autotune")
    dataset = make()
    reference = DataLoader(dataset, batch_size=5, shuffle=False)  # torch's default: no workers
    with adaptive_loader(dataset, 5, drop_last=False, shuffle=False) as loader:
        assert loader.num_workers == 2 and loader.autotune_config.persistent_workers
        for epoch, value in enumerate(values):
            set_path(dataset, path, value)
            assert_same_epoch(epoch_of(loader), epoch_of(reference),
                              f"adapt=True, epoch {epoch}, {path} = {value}")
        assert not loader.changes
        assert "restarted" in loader.autotune_config.explain()
    restarts = [record.getMessage() for record in caplog.records
                if record.name.startswith("autotune") and record.levelno == logging.INFO
                and "restart" in record.getMessage().lower()]
    assert len(restarts) == len(values) - 1, restarts


def test_adaptive_without_a_change_the_same_workers_run_on():
    dataset = Pictures()
    reference = DataLoader(dataset, batch_size=5, shuffle=False)
    with adaptive_loader(dataset, 5, drop_last=False, shuffle=False) as loader:
        assert_same_epoch(epoch_of(loader), epoch_of(reference), "adapt=True, epoch 0")
        pids = worker_pids(loader._loader)  # the DataLoader it holds
        assert len(pids) == 2
        for epoch in (1, 2):
            assert_same_epoch(epoch_of(loader), epoch_of(reference), f"adapt=True, epoch {epoch}")
            assert worker_pids(loader._loader) == pids
        assert not loader.changes


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_an_adaptive_loader_changing_its_workers_gives_a_seeded_factorys_batches():
    """Three epochs of 7 batches (Draws(30), batch 4, drop_last) from 2 workers: to 0 and back
    up to 3 mid-epoch, to 1 on epoch 0's last batch, to 4 between epochs (``_apply`` once the
    epoch ended), to 2 mid-epoch, to 5 as a change waiting for the next epoch (a stream's
    path), to 0 and to 1 mid-epoch. The batches are those of a plain seeded loader with 0
    workers and with 2, bit for bit."""
    factory = OptimalDataLoaderFactory(measure=False, seed=0)
    runs = {workers: seeded_epochs(factory, workers) for workers in (0, 2)}
    epochs = []
    with factory.create_training_loader(Draws(30), 4, num_workers=2, adapt=True,
                                        adapt_every=1000) as loader:
        forced(loader, {3: 0, 5: 3, 7: 1, 11: 2, 16: 0, 19: 1})
        for epoch in range(3):
            if epoch == 1:
                assert loader._apply(adapt.Change(workers=4, reason="forced between epochs"))
            if epoch == 2:
                loader._pending = adapt.Change(workers=5, reason="forced, pending")
            epochs.append(epoch_of(loader))
    made = [(change.step, change.from_workers, change.to_workers) for change in loader.changes]
    assert made == [(3, 2, 0), (5, 0, 3), (7, 3, 1), (7, 1, 4), (11, 4, 2), (14, 2, 5),
                    (16, 5, 0), (19, 0, 1)], loader.changes
    assert not torch.equal(torch.cat(epochs[0]), torch.cat(epochs[1]))  # reshuffled
    for workers in (0, 2):
        for epoch in range(3):
            assert_same_epoch(epochs[epoch], runs[workers][epoch],
                              f"adapt=True with changes, epoch {epoch}",
                              oracle=f"{workers} workers")
