"""The rules against fake hardware and fake workloads: pure, no system reads, no GPU."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from autotune import DatasetHints, LoaderConfig, WorkloadProfile
from autotune.policy import rules
from autotune.policy.rules import recommend

from fakes import fake_hardware

MS = 1e-3

WORKLOADS = {
    # waits on storage: 5 ms wall, almost no CPU
    "io": WorkloadProfile(samples=32, sec_per_sample=5 * MS, cpu_sec_per_sample=0.05 * MS,
                          sample_bytes=256, single_thread_sec_per_sample=5 * MS,
                          single_thread_cpu_sec_per_sample=0.05 * MS,
                          collate_sec_per_sample=0.001 * MS),
    # a few microseconds: shipping batches between processes costs more than the work
    "tiny": WorkloadProfile(samples=32, sec_per_sample=0.003 * MS, cpu_sec_per_sample=0.003 * MS,
                            sample_bytes=4, single_thread_sec_per_sample=0.003 * MS,
                            single_thread_cpu_sec_per_sample=0.003 * MS,
                            collate_sec_per_sample=0.001 * MS),
    # 600 KB made cheaply: the copy through shared memory dominates
    "large": WorkloadProfile(samples=32, sec_per_sample=0.04 * MS, cpu_sec_per_sample=0.04 * MS,
                             sample_bytes=600_000, single_thread_sec_per_sample=0.04 * MS,
                             single_thread_cpu_sec_per_sample=0.04 * MS,
                             collate_sec_per_sample=0.3 * MS),
    # BLAS on 2 threads in-process: 1.5 ms wall, 3 ms CPU; 2.1 ms on one thread
    "blas": WorkloadProfile(samples=32, sec_per_sample=1.5 * MS, cpu_sec_per_sample=3 * MS,
                            sample_bytes=512, single_thread_sec_per_sample=2.1 * MS,
                            single_thread_cpu_sec_per_sample=2.1 * MS,
                            collate_sec_per_sample=0.001 * MS),
    # pure-Python compute on one thread
    "python": WorkloadProfile(samples=32, sec_per_sample=2 * MS, cpu_sec_per_sample=2 * MS,
                              sample_bytes=12_288, single_thread_sec_per_sample=2 * MS,
                              single_thread_cpu_sec_per_sample=2 * MS,
                              collate_sec_per_sample=0.005 * MS),
}


def assert_valid_config(config: LoaderConfig, hw, hints: DatasetHints) -> None:
    """The contract every recommendation keeps, whatever the inputs."""
    assert set(config.reasons) == set(config.settings()) and all(config.reasons.values())
    assert config.source == "rules"
    if config.num_workers:
        assert config.num_workers <= rules.MAX_WORKERS
        assert config.num_workers <= max(1, -(-hints.dataset_size // (hints.batch_size or 32)))
        if config.worker_threads is not None:
            assert config.num_workers * config.worker_threads <= max(hw.cpu_budget,
                                                                     config.num_workers)
        assert config.persistent_workers == hints.training
    else:
        assert config.prefetch_factor is None and not config.persistent_workers
    assert config.drop_last == hints.training


HARDWARE = {
    "2cpu": fake_hardware(cpus=2),
    "64cpu": fake_hardware(cpus=64),
    "container2of64": fake_hardware(cpus=2, logical=64, quota=2.0),
    "torchrun4": fake_hardware(cpus=64, local_world_size=4),
    "shm64mb": fake_hardware(cpus=8, shm_free_bytes=64 << 20),
    "cuda": fake_hardware(cpus=16, accelerator="cuda", gpus=1),
}


@pytest.mark.parametrize("hw_name, workload_name, training, size", list(itertools.product(
    HARDWARE, [*WORKLOADS, None], [True, False], [100, 50_000])))
def test_every_combination_keeps_the_contract(hw_name, workload_name, training, size):
    hw = HARDWARE[hw_name]
    hints = DatasetHints(dataset_size=size, batch_size=64, training=training)
    config = recommend(hw, hints, WORKLOADS.get(workload_name))
    assert_valid_config(config, hw, hints)


def choose(workload: str, hw=None, size: int = 50_000, batch: int = 64) -> LoaderConfig:
    return recommend(hw or fake_hardware(cpus=2),
                     DatasetHints(dataset_size=size, batch_size=batch), WORKLOADS[workload])


def test_io_bound_gets_more_workers_than_cpus():
    config = choose("io")
    assert config.num_workers > 8
    assert "wait" in config.reasons["num_workers"]
    assert config.worker_threads is None  # measured single-threaded: nothing to cap


def test_waiting_data_sizes_workers_from_the_slower_pass():
    # Heavy-tailed waits: one pass saw 2 ms per sample, the other 4 ms. Too few workers cost
    # far more than too many here, so the 4 ms figure sizes the pool.
    split = dataclasses.replace(WORKLOADS["io"], sec_per_sample=4 * MS,
                                single_thread_sec_per_sample=2 * MS)
    slow = dataclasses.replace(split, single_thread_sec_per_sample=4 * MS)
    fast = dataclasses.replace(split, sec_per_sample=2 * MS)
    hints = DatasetHints(dataset_size=40_000, batch_size=64)
    workers = {name: rules.num_workers(fake_hardware(cpus=2), hints, w)[0]
               for name, w in {"split": split, "slow": slow, "fast": fast}.items()}
    assert workers["split"] == workers["slow"] > workers["fast"], workers


def test_tiny_and_large_cheap_samples_stay_in_process():
    for name in ("tiny", "large"):
        config = choose(name)
        assert config.num_workers == 0, config.reasons["num_workers"]
        assert "in-process" in config.reasons["num_workers"]


def test_blas_gets_one_worker_per_cpu_with_capped_threads():
    config = choose("blas")
    assert config.num_workers == 2 and config.worker_threads == 1


def test_cpu_bound_uses_the_budget_not_more():
    assert choose("python").num_workers == 2
    assert choose("python", hw=fake_hardware(cpus=2, logical=64, quota=2.0)).num_workers == 2
    assert choose("python", hw=fake_hardware(cpus=64, local_world_size=4)).num_workers <= 16


def test_io_bound_is_capped_by_memory_and_batches():
    roomy = choose("io", hw=fake_hardware(cpus=2))
    tight = choose("io", hw=fake_hardware(cpus=2, available_bytes=1 << 30))
    assert tight.num_workers < roomy.num_workers
    assert tight.num_workers * rules.WORKER_MEMORY_BYTES <= 0.1 * (1 << 30) + rules.WORKER_MEMORY_BYTES
    assert choose("io", size=200, batch=64).num_workers <= 4  # 4 batches per epoch


@pytest.mark.parametrize("cpus, size, augment, expected", [
    (8, 500, False, 0),      # small dataset, nothing measured: no workers
    (8, 50_000, False, 7),   # one CPU left for the main process
    (8, 50_000, True, 8),    # augmentation: every CPU of the budget
    (2, 50_000, False, 1),
    (1, 50_000, True, 1),
])
def test_without_measurement(cpus, size, augment, expected):
    config = recommend(fake_hardware(cpus=cpus),
                       DatasetHints(dataset_size=size, batch_size=32, has_augmentation=augment))
    assert config.num_workers == expected


def test_container_quota_and_torchrun_budget():
    hints = DatasetHints(dataset_size=50_000, batch_size=32, has_augmentation=True)
    assert recommend(fake_hardware(cpus=2, logical=64, quota=2.0), hints).num_workers == 2
    assert recommend(fake_hardware(cpus=64, local_world_size=4), hints).num_workers == 16


def test_prefetch_bounded_by_small_shm():
    big = WorkloadProfile(samples=8, sec_per_sample=5 * MS, cpu_sec_per_sample=1 * MS,
                          sample_bytes=1 << 20)
    hints = DatasetHints(dataset_size=50_000, batch_size=64)
    small = recommend(fake_hardware(cpus=8, shm_free_bytes=64 << 20), hints, big, workers=2)
    assert small.prefetch_factor == 1 and "/dev/shm" in small.reasons["prefetch_factor"]
    roomy = recommend(fake_hardware(cpus=8), hints, big, workers=2)
    assert roomy.prefetch_factor == 2


def test_pin_memory_only_for_cuda():
    hints = DatasetHints(dataset_size=5000)
    assert recommend(fake_hardware(accelerator="cuda", gpus=1), hints).pin_memory
    assert not recommend(fake_hardware(), hints).pin_memory
    on_cpu = DatasetHints(dataset_size=5000, device="cpu")
    assert not recommend(fake_hardware(accelerator="cuda", gpus=1), on_cpu).pin_memory


def test_validation_workers_not_persistent():
    hints = DatasetHints(dataset_size=50_000, training=False)
    config = recommend(fake_hardware(cpus=8), hints)
    assert config.num_workers > 0 and not config.persistent_workers and not config.drop_last


def test_fixed_worker_count_keeps_other_rules():
    config = recommend(fake_hardware(cpus=8), DatasetHints(dataset_size=50_000), workers=4)
    assert config.num_workers == 4 and config.worker_threads == 1  # 8 // (4 + main)
    one = recommend(fake_hardware(cpus=16), DatasetHints(dataset_size=50_000), workers=1)
    assert one.worker_threads == 8
    assert config.reasons["num_workers"] == "set explicitly"


@pytest.mark.parametrize("bad", [{"dataset_size": 0}, {"dataset_size": 10, "batch_size": 0},
                                 {"dataset_size": "10"}])
def test_hints_validate(bad):
    with pytest.raises(ValueError):
        DatasetHints(**bad)
