from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from autotune import (InvalidConfigError, LoaderConfig, OptimalDataLoaderFactory,
                      TunedDataLoader, WorkloadProfile, probe_hardware)
from autotune.profiles import ProfileEntry, profile_path, save_entry

from datasets import Indexed, RandomDraws, ReportsWorker, Sleepy, TorchMatmul, set_flag

CHEAP = WorkloadProfile(samples=8, sec_per_sample=1e-5, cpu_sec_per_sample=1e-5, sample_bytes=8)


def epoch_indices(loader):
    return sorted(int(i) for batch in loader for i in batch.flatten())


def test_training_loader_two_workers_every_sample_once_per_epoch():
    factory = OptimalDataLoaderFactory(measure=False)
    loader = factory.create_training_loader(Indexed(256), batch_size=32, num_workers=2)
    assert isinstance(loader, DataLoader) and loader.num_workers == 2
    orders = []
    for _ in range(2):
        seen = [int(i) for batch in loader for i in batch.flatten()]
        assert sorted(seen) == list(range(256))
        orders.append(seen)
    assert orders[0] != orders[1]  # shuffled anew every epoch


def test_validation_loader_in_order_keeps_last_batch():
    loader = OptimalDataLoaderFactory(measure=False).create_validation_loader(
        Indexed(70), batch_size=32)
    batches = [batch.flatten().tolist() for batch in loader]
    assert [len(b) for b in batches] == [32, 32, 6]
    assert sum(batches, []) == list(range(70))
    assert not loader.autotune_config.persistent_workers


def test_seed_style_calls_on_the_class():
    dataset = Subset(Indexed(2000), range(1200))
    train = OptimalDataLoaderFactory.create_training_loader(
        dataset, batch_size=24, has_augmentation=True, has_standardization=True)
    val = OptimalDataLoaderFactory.create_validation_loader(
        dataset, batch_size=24, has_standardization=True)
    assert isinstance(train, DataLoader) and isinstance(val, DataLoader)
    config = OptimalDataLoaderFactory.get_optimal_config(len(dataset), True, True)
    assert isinstance(config, LoaderConfig)
    assert config["num_workers"] == config.num_workers
    loader = DataLoader(dataset, batch_size=24, **config)
    assert loader.num_workers == config.num_workers
    assert OptimalDataLoaderFactory.default() is OptimalDataLoaderFactory.default()


def test_every_setting_has_a_reason():
    config = OptimalDataLoaderFactory(measure=False).get_optimal_config(50_000, True)
    assert set(config.reasons) == set(config.settings())
    assert all(config.reasons.values())


def test_measures_unless_told_not_to():
    measured = OptimalDataLoaderFactory().create_training_loader(Sleepy(64), batch_size=8)
    assert "measured" in measured.autotune_config.reasons["num_workers"]
    unmeasured = OptimalDataLoaderFactory(measure=False).create_training_loader(
        Sleepy(64), batch_size=8)
    assert "measured" not in unmeasured.autotune_config.reasons["num_workers"]


def test_precedence_override_then_profile_then_rules(tmp_path):
    hw = probe_hardware()
    save_entry(hw, "Indexed", ProfileEntry(settings={"num_workers": 1, "prefetch_factor": 3},
                                           measured={"samples_per_s": 1234.0}))
    factory = OptimalDataLoaderFactory()
    tuned = factory.create_training_loader(Indexed(512), batch_size=32)
    assert (tuned.num_workers, tuned.prefetch_factor) == (1, 3)
    assert tuned.autotune_config.source == "profile"
    assert "tuned on this host" in tuned.autotune_config.reasons["num_workers"]
    explicit = factory.create_training_loader(Indexed(512), batch_size=32, prefetch_factor=5)
    assert explicit.autotune_config.source == "override" and explicit.prefetch_factor == 5
    other_key = factory.create_training_loader(Indexed(512), batch_size=32, profile_key="other",
                                               workload=CHEAP)
    assert other_key.autotune_config.source == "rules"


def test_profile_from_other_hardware_is_not_applied_calmly(caplog):
    # The quick start on a new kind of machine meets the developers' committed profile:
    # one calm log line, no warning.
    hw = probe_hardware()
    path = save_entry(hw, "Indexed", ProfileEntry(settings={"num_workers": 1}))
    path.write_text(path.read_text().replace(hw.fingerprint, "ffffffffffffffff"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level("INFO", logger="autotune"):
            loader = OptimalDataLoaderFactory().create_training_loader(
                Indexed(512), batch_size=32, workload=CHEAP)
    assert loader.autotune_config.source == "rules"
    assert any("other hardware" in r.getMessage() for r in caplog.records)


def test_profile_of_another_hostname_with_this_hardware_applies():
    # A Kubernetes pod or Slurm job gets a new hostname every run.
    hw = probe_hardware()
    other = dataclasses.replace(hw, host=dataclasses.replace(hw.host, hostname="pod-7f9c"))
    path = save_entry(other, "Indexed", ProfileEntry(settings={"num_workers": 1,
                                                               "prefetch_factor": 3}))
    assert path.name == "pod-7f9c.yaml"
    loader = OptimalDataLoaderFactory().create_training_loader(Indexed(512), batch_size=32)
    assert (loader.num_workers, loader.prefetch_factor) == (1, 3)
    assert "pod-7f9c.yaml" in loader.autotune_config.reasons["num_workers"]


def test_malformed_profile_falls_back_to_rules_with_warning():
    path = profile_path(probe_hardware().host.hostname)
    path.parent.mkdir(parents=True)
    path.write_text("schema_version: 1\nhostname: [broken\n")
    with pytest.warns(UserWarning, match="not valid YAML.*using the rules"):
        loader = OptimalDataLoaderFactory().create_training_loader(
            Indexed(64), batch_size=8, workload=CHEAP)
    assert loader.autotune_config.source == "rules"


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": -4}, "batch_size=-4"),
    ({"batch_size": 4, "prefetch_factor": 0}, "prefetch_factor=0"),
    ({"batch_size": 4, "num_wrokers": 2}, "num_wrokers"),
    ({"batch_size": 4, "num_workers": 1.5}, "num_workers=1.5"),
    ({"batch_size": 4, "profile_key": "../x"}, "profile key"),
    ({"batch_size": 4, "num_workers": -1}, "num_workers=-1 must be an integer >= 0"),
    ({"batch_size": 4, "timeout": -2}, "timeout=-2"),
    ({"batch_size": True}, "batch_size=True"),
    ({"batch_size": 4, "has_augmentation": "yes"}, "has_augmentation='yes'"),
    ({"batch_size": 16}, r"batch_size=16 with drop_last=True over a dataset of 8"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        OptimalDataLoaderFactory(measure=False).create_training_loader(Indexed(8), **kwargs)


def test_a_validation_loader_keeps_a_partial_only_batch():
    loader = OptimalDataLoaderFactory(measure=False).create_validation_loader(
        Indexed(8), batch_size=16)
    assert [len(b) for b in loader] == [8]


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": -1}, "seed=-1"), ({"measure": "no"}, "measure='no'"), ({"device": 0}, "device=0"),
])
def test_factory_arguments_are_checked(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        OptimalDataLoaderFactory(**kwargs)


def test_dataset_size_zero():
    with pytest.raises(InvalidConfigError, match="dataset_size=0"):
        OptimalDataLoaderFactory(measure=False).get_optimal_config(0)


def test_worker_init_applies_thread_budget_then_user_fn():
    loader = OptimalDataLoaderFactory(measure=False).create_training_loader(
        ReportsWorker(8), batch_size=2, num_workers=2, worker_threads=1, worker_init_fn=set_flag)
    rows = torch.cat(list(loader))
    assert set(rows[:, 0].tolist()) <= {100, 101}  # the user's fn ran in each worker
    assert rows[:, 1].max() == 1 and rows[:, 2].max() <= 1


def test_workers_draw_differently_and_seed_reproduces():
    def draws(seed):
        factory = OptimalDataLoaderFactory(measure=False, seed=seed)
        loader = factory.create_training_loader(RandomDraws(32), batch_size=4, num_workers=2)
        return torch.cat(list(loader))

    first, again, other = draws(7), draws(7), draws(8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    worker0 = first[first[:, 1] == 0][:, 2:]
    worker1 = first[first[:, 1] == 1][:, 2:]
    assert not torch.equal(worker0[:4], worker1[:4])  # random, numpy and torch differ


def test_torch_worker_warning_only_for_explicit_counts():
    factory = OptimalDataLoaderFactory(measure=False)
    many = len(os.sched_getaffinity(0)) + 2  # torch warns above the affinity set, not the quota
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_entry(probe_hardware(), "Indexed", ProfileEntry(settings={"num_workers": many}))
        loader = OptimalDataLoaderFactory().create_training_loader(Indexed(64), batch_size=8)
        assert isinstance(loader, TunedDataLoader) and loader.num_workers == many
    with pytest.warns(UserWarning, match="worker"):
        factory.create_training_loader(Indexed(64), batch_size=8, num_workers=many)


def test_forked_worker_with_a_thread_budget_does_not_deadlock():
    # Raising torch/OpenMP threads in a forked worker deadlocks GNU OpenMP once the parent
    # has used its pool; the budget sizes BLAS pools and keeps torch at one thread.
    x = torch.ones(512, 512)
    (x @ x).sum()  # the parent's OpenMP pool is now running
    loader = OptimalDataLoaderFactory(measure=False).create_training_loader(
        TorchMatmul(4), batch_size=2, num_workers=1, worker_threads=2, timeout=30)
    assert len(list(loader)) == 2


def test_an_entry_tuned_with_other_ranks_per_host_warns_once_and_still_applies(monkeypatch):
    import autotune.factory.pipeline as factory_module

    monkeypatch.setattr(factory_module, "_warned", set())
    save_entry(probe_hardware(), "Indexed", ProfileEntry(
        settings={"num_workers": 1}, measured={"local_world_size": 2}))
    with pytest.warns(UserWarning, match=r"tuned with 2 rank\(s\) on this host and this run "
                                         r"has 1.*torchrun --nproc_per_node 1"):
        loader = OptimalDataLoaderFactory().create_training_loader(Indexed(512), batch_size=32)
    assert loader.autotune_config.source == "profile" and loader.num_workers == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        OptimalDataLoaderFactory().create_training_loader(Indexed(512), batch_size=32)
