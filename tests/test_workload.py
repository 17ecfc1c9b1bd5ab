from __future__ import annotations

import time

import pytest

from autotune import DatasetError, InvalidConfigError, WorkloadProfile, measure_workload

from datasets import Busy, Empty, FailsAt, Indexed, Sleepy


def test_waiting_is_told_apart_from_computing():
    waiting = measure_workload(Sleepy(size=16, seconds=0.005), samples=8)
    computing = measure_workload(Busy(size=16), samples=8)
    assert waiting.sec_per_sample >= 0.004
    assert waiting.cpu_fraction < 0.5
    # relative, so a loaded machine (which stretches wall time) cannot flip it
    assert computing.cpu_fraction > 4 * waiting.cpu_fraction
    assert waiting.single_thread_sec_per_sample >= 0.004


def test_sample_bytes_and_count():
    profile = measure_workload(Indexed(100), samples=10)
    assert profile.sample_bytes == 8  # one int64
    assert 1 <= profile.samples <= 10
    assert profile.collate_sec_per_sample is not None
    assert WorkloadProfile.from_dict(profile.to_dict()) == profile


def test_bounded_in_time_on_slow_samples():
    start = time.perf_counter()
    profile = measure_workload(Sleepy(size=100, seconds=0.2), samples=32, max_seconds=0.5)
    assert time.perf_counter() - start < 1.5
    assert profile.samples < 10


def test_dataset_error_names_index():
    with pytest.raises(DatasetError) as err:
        measure_workload(FailsAt(bad_index=15, size=16), samples=16)
    assert err.value.index == 15
    assert "dataset[15]" in str(err.value) and "corrupt record" in str(err.value)
    assert isinstance(err.value.__cause__, ValueError)


@pytest.mark.parametrize("dataset, samples, match", [
    (Empty(), 4, "empty"), (Indexed(4), 0, "samples=0"), (object(), 4, "map-style"),
])
def test_bad_input(dataset, samples, match):
    with pytest.raises(InvalidConfigError, match=match):
        measure_workload(dataset, samples=samples)
