from __future__ import annotations

import math
import re
import threading
import time

import pytest
import torch
from threadpoolctl import threadpool_info

from autotune import (AutotuneError, DatasetError, InvalidConfigError, WorkloadProfile,
                      measure_workload)

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


# --- a sample that never returns -------------------------------------------------------------

class Blocks(Indexed):
    """``dataset[bad_index]`` waits on an event nobody sets (until the test lets it go)."""

    def __init__(self, bad_index: int, size: int = 16) -> None:
        super().__init__(size)
        self.bad_index = bad_index
        self.release = threading.Event()

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad_index:
            self.release.wait()
        return super().__getitem__(index)


def _pool_sizes() -> tuple[int, list[int]]:
    """torch's thread count as a new thread sees it, and every native pool's size."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0], [pool["num_threads"] for pool in threadpool_info()]


_EARLIER: set[threading.Thread] = set()


def _measuring_threads() -> list[threading.Thread]:
    """Measuring threads of this test (other tests may have abandoned theirs for good)."""
    return [t for t in threading.enumerate()
            if t.name == "autotune-measure-workload" and t not in _EARLIER]


@pytest.mark.timeout(30)  # without the bound this would hang: fail instead
@pytest.mark.parametrize("bad_index", [0, 7])  # 0: the warm-up, thread pools capped; 7: timed
def test_a_sample_that_never_returns_is_abandoned(bad_index):
    dataset = Blocks(bad_index)
    _EARLIER.update(threading.enumerate())
    before = _pool_sizes()
    start = time.perf_counter()
    try:
        with pytest.raises(DatasetError) as err:
            measure_workload(dataset, samples=16, max_seconds=5.0, sample_timeout_s=1.0)
        took = time.perf_counter() - start
        assert 1.0 <= took < 2.0
        message = str(err.value)
        assert err.value.index == bad_index and f"dataset[{bad_index}]" in message
        assert isinstance(err.value.original, TimeoutError)
        assert re.search(r"did not return within 1\.\d s", message), message
        assert "sample_timeout_s=1" in message and "measure=False" in message
        # the process-wide limits of the capped pass are undone though the thread still hangs
        assert _measuring_threads()
        assert _pool_sizes() == before
    finally:
        dataset.release.set()
    deadline = time.perf_counter() + 5
    while _measuring_threads() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not _measuring_threads()  # let go, the abandoned thread stops at its next step
    assert _pool_sizes() == before  # ... and leaves the limits alone


@pytest.mark.timeout(30)
def test_a_collate_fn_that_never_returns_is_abandoned():
    never = threading.Event()
    start = time.perf_counter()
    try:
        with pytest.raises(AutotuneError, match=r"collate_fn did not return within 0\.\d s"):
            measure_workload(Indexed(8), samples=8, sample_timeout_s=0.5,
                             collate_fn=lambda batch: never.wait())
    finally:
        never.set()
    assert time.perf_counter() - start < 1.5


def test_slow_samples_within_the_bound_are_measured():
    profile = measure_workload(Sleepy(size=8, seconds=0.05), samples=4, sample_timeout_s=0.5)
    assert profile.sec_per_sample >= 0.045


def test_per_sample_walls_fit_a_lognormal():
    profile = measure_workload(Sleepy(size=64, seconds=0.002), samples=32)
    assert profile.wall_log_mean is not None and profile.wall_log_std is not None
    assert abs(profile.wall_log_mean - math.log(0.002)) < 1.0
    assert 0.0015 <= profile.lognormal_sec_per_sample < 0.02
    assert WorkloadProfile.from_dict(profile.to_dict()) == profile
    # profiles written before these fields existed still load
    old = {k: v for k, v in profile.to_dict().items() if not k.startswith("wall_log")}
    assert WorkloadProfile.from_dict(old).lognormal_sec_per_sample is None


@pytest.mark.parametrize("field", ["max_seconds", "sample_timeout_s"])
@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "1", True, None])
def test_seconds_must_be_finite_and_positive(field, value):
    with pytest.raises(InvalidConfigError, match=rf"{field}=.* must be a finite number"):
        measure_workload(Indexed(4), samples=4, **{field: value})


@pytest.mark.parametrize("samples", [0, -3, 1.5, True, "8"])
def test_samples_must_be_a_positive_integer(samples):
    with pytest.raises(InvalidConfigError, match=r"samples=.* must be an integer >= 1"):
        measure_workload(Indexed(4), samples=samples)


class RecordsThreads(Sleepy):
    """Sleepy that notes which thread made each call."""

    def __init__(self, seconds: float) -> None:
        super().__init__(size=32, seconds=seconds)
        self.threads: set[str] = set()

    def __getitem__(self, index: int) -> torch.Tensor:
        self.threads.add(threading.current_thread().name)
        return super().__getitem__(index)


@pytest.mark.parametrize("seconds, callers", [
    (0.002, {"autotune-measure-workload"}),  # slow: timed in the measuring thread only
    (0.0, {"autotune-measure-workload", "MainThread"}),  # cheap: again where loading runs
])
def test_cheap_samples_are_timed_again_in_the_calling_thread(seconds, callers):
    dataset = RecordsThreads(seconds)
    measure_workload(dataset, samples=16)
    assert dataset.threads == callers
