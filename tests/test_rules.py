"""The rules against fake hardware and fake workloads: pure, no system reads, no GPU."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import pytest

from autotune import DatasetHints, InvalidConfigError, LoaderConfig, WorkloadProfile
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
    # network storage with a heavy tail (lognormal, median 1 ms, sigma 1.5: mean 3.1 ms)
    # and 0.2 ms of CPU: 128 samples missed the tail and measured 2 ms on average
    "io_tail": WorkloadProfile(samples=128, sec_per_sample=2 * MS, cpu_sec_per_sample=0.2 * MS,
                               sample_bytes=1024, single_thread_sec_per_sample=2 * MS,
                               single_thread_cpu_sec_per_sample=0.2 * MS,
                               collate_sec_per_sample=0.001 * MS,
                               wall_log_mean=math.log(1 * MS), wall_log_std=1.5),
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


def _workers(workload: WorkloadProfile, hw=None, size: int = 40_000) -> int:
    return rules.num_workers(hw or fake_hardware(cpus=2),
                             DatasetHints(dataset_size=size, batch_size=64), workload)[0]


def test_waiting_data_sizes_workers_from_the_slower_pass():
    # Heavy-tailed waits: one pass saw 2 ms per sample, the other 4 ms. Too few workers cost
    # far more than too many here, so the 4 ms figure sizes the pool. (0.2 ms of CPU per
    # sample keeps the counts under the caps.)
    split = dataclasses.replace(WORKLOADS["io"], sec_per_sample=4 * MS,
                                single_thread_sec_per_sample=2 * MS,
                                cpu_sec_per_sample=0.2 * MS,
                                single_thread_cpu_sec_per_sample=0.2 * MS)
    slow = dataclasses.replace(split, single_thread_sec_per_sample=4 * MS)
    fast = dataclasses.replace(split, sec_per_sample=2 * MS)
    workers = {name: _workers(w)
               for name, w in {"split": split, "slow": slow, "fast": fast}.items()}
    assert workers["split"] == workers["slow"] > workers["fast"], workers
    assert workers["slow"] < rules.MAX_WORKERS


def test_a_heavy_tail_gets_more_workers_than_its_mean_would():
    tail = WORKLOADS["io_tail"]
    mean_only = dataclasses.replace(tail, wall_log_mean=None, wall_log_std=None)
    assert tail.lognormal_sec_per_sample == pytest.approx(3.08 * MS, rel=0.01)
    assert rules._worker_wall_s(tail) == pytest.approx(3.08 * MS, rel=0.01)
    assert rules._worker_wall_s(mean_only) == pytest.approx(2 * MS)
    with_tail, without = _workers(tail), _workers(mean_only)
    assert without < with_tail < rules.MAX_WORKERS, (without, with_tail)
    assert with_tail >= 1.4 * without
    reason = rules.num_workers(fake_hardware(cpus=2),
                               DatasetHints(dataset_size=40_000, batch_size=64), tail)[1]
    assert "heavy tail" in reason and "sigma 1.50" in reason and "3.080 ms" in reason


def test_a_fitted_tail_raises_the_mean_wait_at_most_twofold():
    # Not lognormal (a cache: most samples fast, some slow) can fit an absurd tail.
    absurd = dataclasses.replace(WORKLOADS["io_tail"], wall_log_std=4.0)
    doubled = dataclasses.replace(WORKLOADS["io_tail"], sec_per_sample=3.8 * MS,
                                  single_thread_sec_per_sample=3.8 * MS,
                                  wall_log_mean=None, wall_log_std=None)  # 2 x 1.8 ms waiting
    assert rules._worker_wall_s(absurd) == pytest.approx(rules._worker_wall_s(doubled))
    # a fit below the measured mean changes nothing
    light = dataclasses.replace(WORKLOADS["io_tail"], wall_log_std=0.1)
    assert rules._worker_wall_s(light) == pytest.approx(2 * MS)


def test_waiting_data_gets_margin_above_the_models_count():
    hw, hints = fake_hardware(cpus=2), DatasetHints(dataset_size=40_000, batch_size=64)
    tail = WORKLOADS["io_tail"]
    workers, reason = rules.num_workers(hw, hints, tail)
    knee = int(re.search(r"the cost model's (\d+) and (\d+) more as margin", reason)[1])
    rates = rules.predicted_rates(hw, tail, 64, rules.max_workers(hw, hints, tail))
    assert rates[knee] >= max(rates.values()) / rules.NEAR_BEST  # where the CPUs limit it
    wait = 1 - 0.2 / 3.08  # a worker would wait 2.88 ms of 3.08: 1.47 x the model's count
    assert workers == round(knee * (1 + (rules.WAIT_HEADROOM - 1) * wait)), (workers, knee)
    assert f"the cost model's {knee} and {workers - knee} more as margin" in reason
    assert "mostly wait on I/O" in reason
    # within the caps: batches per epoch and RAM
    assert _workers(tail, size=64 * 20) == 20
    small_ram = fake_hardware(cpus=2, available_bytes=1 << 30)
    assert _workers(tail, hw=small_ram) <= rules.max_workers(small_ram, hints, tail) < workers


@pytest.mark.parametrize("name, expected", [("tiny", 0), ("large", 0), ("python", 2),
                                            ("blas", 2)])
def test_computing_data_keeps_its_count_whatever_its_spread(name, expected):
    # per-sample times of cheap or computing samples vary with the machine's load; a
    # fitted tail must not move them, nor does the margin for waiting data apply
    for spread in (None, 0.5, 2.5):
        workload = dataclasses.replace(WORKLOADS[name], wall_log_std=spread,
                                       wall_log_mean=None if spread is None else math.log(
                                           WORKLOADS[name].sec_per_sample))
        assert choose_profile(workload).num_workers == expected, spread


def choose_profile(workload: WorkloadProfile) -> LoaderConfig:
    return recommend(fake_hardware(cpus=2), DatasetHints(dataset_size=50_000, batch_size=64),
                     workload)


@pytest.mark.parametrize("workers", [-1, 1.5, True, "2"])
def test_a_fixed_worker_count_must_be_a_non_negative_integer(workers):
    with pytest.raises(InvalidConfigError, match=rf"num_workers={workers!r} must be "):
        recommend(fake_hardware(cpus=2), DatasetHints(dataset_size=1000), workers=workers)


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
    assert tight.num_workers * rules.WORKER_MEMORY_BYTES \
        <= 0.1 * (1 << 30) + rules.WORKER_MEMORY_BYTES
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
    assert config.reasons["num_workers"].startswith("fixed by the caller")


@pytest.mark.parametrize("bad", [{"dataset_size": 0}, {"dataset_size": 10, "batch_size": 0},
                                 {"dataset_size": "10"}])
def test_hints_validate(bad):
    with pytest.raises(ValueError):
        DatasetHints(**bad)


def test_ranks_on_one_host_share_its_memory_and_shm():
    big = WorkloadProfile(samples=8, sec_per_sample=0.01, cpu_sec_per_sample=1e-4,
                          sample_bytes=4 << 20)
    hints = DatasetHints(dataset_size=10**6, batch_size=64)
    alone = fake_hardware(cpus=64, shm_free_bytes=4 << 30)
    four = fake_hardware(cpus=64, shm_free_bytes=4 << 30, local_world_size=4)
    assert rules.memory_budget_bytes(four) == rules.memory_budget_bytes(alone) // 4
    assert rules.max_workers(four, hints, big) == rules.max_workers(alone, hints, big) // 4


def test_a_stream_says_what_drop_last_costs_it():
    value, why = rules.drop_last(DatasetHints(dataset_size=None, stream=True))
    assert value and "each worker drops its own partial last batch" in why
