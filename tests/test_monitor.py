"""StallMonitor on real DataLoaders and a sleeping step: the stall it reports is the stall
measured around the loop, and its verdict follows TensorFlow's thresholds."""

from __future__ import annotations

import json
import logging
import time

import pytest
from torch.utils.data import DataLoader

from autotune import InvalidConfigError, StallMonitor
from autotune.feed.monitor import StallClock
from autotune.policy import stall
from datasets import Indexed, Sleepy


def run_loop(monitor: StallMonitor, step_s: float, epochs: int = 2) -> float:
    """The loop's true share of time waiting: total time around it minus the steps."""
    stepping = 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        for _batch in monitor:
            began = time.perf_counter()
            time.sleep(step_s)
            stepping += time.perf_counter() - began
    total = time.perf_counter() - start
    return 1 - stepping / total


@pytest.mark.parametrize("batch_size, sample_s, step_s, verdict", [
    (4, 0.0, 0.050, "not input-bound"),  # ~0% (about 1 ms of overhead per batch)
    # one 4 ms sleep of 34 ms: ~12%, mid-band, so a loaded machine's late wake-ups (+1-2 ms a
    # sleep; four 0.5 ms sleeps took 4.5 ms on CI) keep it within 5-20%
    (1, 0.004, 0.030, "moderately input-bound"),
    (4, 0.005, 0.020, "input-bound"),  # 4 x 5 ms of 40 ms: ~50%
])
@pytest.mark.serial
def test_stall_fraction_matches_the_loop(batch_size: int, sample_s: float, step_s: float,
                                         verdict: str) -> None:
    loader = DataLoader(Sleepy(size=12 * batch_size, seconds=sample_s), batch_size=batch_size)
    monitor = StallMonitor(loader, name="train", log_every_s=None)
    true_share = run_loop(monitor, step_s)
    report = monitor.report()
    assert report.stall_fraction == pytest.approx(true_share, abs=0.03)
    assert report.verdict == verdict
    assert report.steps == 24 and report.passes == 2
    assert report.wall_s == pytest.approx(report.wait_s + report.step_s)
    assert report.step_p50_s == pytest.approx(step_s, abs=0.01)


def test_verdict_thresholds() -> None:
    assert stall.verdict(0.0) == stall.verdict(0.049) == "not input-bound"
    assert stall.verdict(0.05) == stall.verdict(0.20) == "moderately input-bound"
    assert stall.verdict(0.2001) == stall.verdict(1.0) == "input-bound"


def test_workers_are_reported_and_epochs_count_as_waiting() -> None:
    loader = DataLoader(Sleepy(size=32, seconds=0.002), batch_size=4, num_workers=2)
    monitor = StallMonitor(loader, device="cpu", log_every_s=None)  # a CPU loop, GPU or not
    run_loop(monitor, 0.001, epochs=2)
    report = monitor.report()
    assert report.num_workers == 2
    assert report.workers_cpu is not None and report.workers_cpu >= 0
    assert report.workers_memory_bytes is None or report.workers_memory_bytes >= 0
    # starting two workers twice is waiting: the first batch of a pass waits longest
    assert max(monitor.history()[0]) >= report.wait_p50_s
    assert report.gpu_utilization is None


def test_report_is_plain_data() -> None:
    monitor = StallMonitor(DataLoader(Indexed(8), batch_size=2), log_every_s=None)
    run_loop(monitor, 0.0, epochs=1)
    data = monitor.report().to_dict()
    assert json.loads(json.dumps(data)) == data
    assert {"steps", "stall_fraction", "verdict", "wait_p95_s", "step_mean_s",
            "workers_cpu", "gpu_utilization", "suggestion"} <= set(data)


def test_yields_the_same_batches_and_passes_attributes_through() -> None:
    loader = DataLoader(Indexed(10), batch_size=3)
    monitor = StallMonitor(loader, log_every_s=None)
    assert [b.tolist() for b in monitor] == [b.tolist() for b in loader]
    assert len(monitor) == 4 and monitor.batch_size == 3 and monitor.dataset is loader.dataset


def test_breaking_out_of_a_pass_then_iterating_again() -> None:
    monitor = StallMonitor(DataLoader(Indexed(12), batch_size=2), log_every_s=None)
    for i, _ in enumerate(monitor):
        if i == 2:
            break
    assert len(list(monitor)) == 6
    report = monitor.report()
    assert report.passes == 2 and report.steps == 9


def test_a_report_inside_a_step_counts_the_running_step() -> None:
    monitor = StallMonitor(DataLoader(Indexed(4), batch_size=1), log_every_s=None)
    for _ in monitor:
        time.sleep(0.02)
        report = monitor.report()
        break
    assert report.steps == 0 and report.step_s >= 0.015


def test_periodic_summaries_go_to_logging(caplog: pytest.LogCaptureFixture) -> None:
    monitor = StallMonitor(DataLoader(Sleepy(16, 0.001), batch_size=2), name="train",
                           log_every_s=0.005)
    with caplog.at_level(logging.INFO, logger="autotune.monitor"):
        run_loop(monitor, 0.004, epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "autotune.monitor"]
    assert lines and all(line.startswith("autotune stall train: ") for line in lines)
    assert "stall" in lines[-1] and "input-bound" in lines[-1]


def test_suggestions_follow_what_was_seen() -> None:
    assert "step is the bottleneck" in stall.suggestion(
        0.01, num_workers=4, workers_cpu=0.1, cpu_budget=2, wait_p50_s=0, wait_p95_s=0)
    assert "worker processes" in stall.suggestion(
        0.5, num_workers=0, workers_cpu=None, cpu_budget=2, wait_p50_s=0.1, wait_p95_s=0.1)
    assert "will not help" in stall.suggestion(
        0.5, num_workers=4, workers_cpu=1.9, cpu_budget=2, wait_p50_s=0.1, wait_p95_s=0.1)
    assert "prefetch" in stall.suggestion(
        0.1, num_workers=4, workers_cpu=0.2, cpu_budget=2, wait_p50_s=0.001, wait_p95_s=0.05)
    assert "more workers" in stall.suggestion(
        0.5, num_workers=4, workers_cpu=0.2, cpu_budget=2, wait_p50_s=0.1, wait_p95_s=0.1)
    assert "first batch (150 ms a pass)" in stall.suggestion(
        0.1, num_workers=4, workers_cpu=0.2, cpu_budget=2, wait_p50_s=0.002, wait_p95_s=0.01,
        wait_s=0.4, start_wait_s=0.3, passes=2)


def test_clock_from_timestamps() -> None:
    clock = StallClock()
    clock.began(0.0, 1.0)  # iter() took 1 s
    clock.waited(1.0, 2.0, True)  # the first batch waited 1 s more
    clock.waited(5.0, 5.5, True)  # a 3 s step, then 0.5 s wait
    clock.waited(6.5, 6.5, False)  # a 1 s step, then the pass ended
    assert clock.totals() == (2, 2.5, 4.0) and clock.start_wait_s == 2.0
    assert list(clock.waits) == [2.0, 0.5] and list(clock.step_times) == [3.0, 1.0]


@pytest.mark.parametrize("kwargs, named", [
    (dict(iterable=5), "iterable=5"),
    (dict(iterable=[], name=3), "name=3"),
    (dict(iterable=[], log_every_s=0), "log_every_s=0"),
    (dict(iterable=[], device="nonsense"), "device='nonsense'"),
])
def test_bad_arguments_name_themselves(kwargs: dict, named: str) -> None:
    iterable = kwargs.pop("iterable")
    with pytest.raises(InvalidConfigError, match=named.replace("(", r"\(")):
        StallMonitor(iterable, **kwargs)


def test_gpu_utilisation_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML is faked at its boundary (no GPU here): the report averages its readings."""
    import autotune.system.hardware
    from fakes import FakeNvml

    nvml = FakeNvml([{}, {"util": 73}])
    monkeypatch.setattr(autotune.system.hardware, "_load_nvml", lambda: nvml)
    monitor = StallMonitor(DataLoader(Indexed(4), batch_size=2), device="cuda:1",
                           log_every_s=None)
    run_loop(monitor, 0.0, epochs=1)
    assert monitor.report().gpu_utilization == 73.0
    assert "GPU 73% busy" in monitor.report().summary()
    monitor.close()
    assert nvml.shutdown_calls == nvml.init_calls >= 1  # closed again (a CUDA host probes too)
    failing = FakeNvml([{}], failing={"nvmlDeviceGetUtilizationRates"})
    monkeypatch.setattr(autotune.system.hardware, "_load_nvml", lambda: failing)
    monitor = StallMonitor([1], device="cuda", log_every_s=None)
    list(monitor)
    assert monitor.report().gpu_utilization is None
    assert StallMonitor([1], device="cpu", log_every_s=None).report().gpu_utilization is None


def test_gpu_utilisation_is_sampled_over_the_whole_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU busy 20% for the first half of the run and 80% for the second: the mean over
    the run is 50%, whatever the GPU does at the moment of the report."""
    import autotune.system.hardware
    import autotune.system.usage
    from fakes import FakeNvml

    start = time.perf_counter()
    nvml = FakeNvml([{"util": lambda: 20 if time.perf_counter() - start < 0.6 else 80}])
    monkeypatch.setattr(autotune.system.hardware, "_load_nvml", lambda: nvml)
    monkeypatch.setattr(autotune.system.usage, "GPU_SAMPLE_S", 0.02)
    monitor = StallMonitor(range(120), device="cuda:0", log_every_s=None)
    for _ in monitor:
        time.sleep(0.01)  # 1.2 s in all
        if time.perf_counter() - start > 1.2:
            break
    report = monitor.report()
    monitor.close()
    assert abs(report.gpu_utilization - 50) <= 5, report.gpu_utilization
    assert report.gpu_utilization_p50 in (20.0, 80.0)
    assert nvml.shutdown_calls == nvml.init_calls


def test_leaving_a_pass_early_ends_its_step_there() -> None:
    monitor = StallMonitor(DataLoader(Indexed(20), batch_size=2), log_every_s=None)
    for i, _ in enumerate(monitor):
        time.sleep(0.01)
        if i == 3:
            break
    time.sleep(0.3)  # after the loop: neither waiting nor stepping
    report = monitor.report()
    assert report.steps == 4 and report.step_s < 0.2


def test_a_failing_loader_counts_its_wait_and_no_step() -> None:
    def batches():
        yield 1
        time.sleep(0.1)
        raise OSError("disk gone")

    monitor = StallMonitor(_Iterable(batches), log_every_s=None)
    with pytest.raises(OSError):
        for _ in monitor:
            pass
    time.sleep(0.2)
    report = monitor.report()
    assert report.wait_s >= 0.09 and report.step_s < 0.05


class _Iterable:
    def __init__(self, make) -> None:
        self.make = make

    def __iter__(self):
        return self.make()


def test_a_report_before_any_step_says_so() -> None:
    report = StallMonitor([1, 2], log_every_s=None).report()
    assert report.steps == 0 and report.suggestion.startswith("no step timed yet")


def test_nvml_is_asked_for_the_gpu_torch_uses_by_its_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CUDA_VISIBLE_DEVICES=1 torch's cuda:0 is NVML's GPU 1: the UUID finds it (torch
    is faked at the boundary: no GPU here); without a UUID the index is used, as before."""
    import autotune.system.hardware
    import autotune.system.usage
    from fakes import FakeNvml

    nvml = FakeNvml([{"util": 10}, {"util": 90}])
    monkeypatch.setattr(autotune.system.hardware, "_load_nvml", lambda: nvml)
    monkeypatch.setattr(autotune.system.usage, "cuda_uuid",
                        lambda index: f"GPU-fake-{index + 1}")
    assert autotune.system.usage.GpuUtilization(0).read() == 90.0
    monkeypatch.setattr(autotune.system.usage, "cuda_uuid", lambda index: None)
    assert autotune.system.usage.GpuUtilization(0).read() == 10.0
    monkeypatch.setattr(autotune.system.usage, "cuda_uuid", lambda index: "GPU-unknown")
    assert autotune.system.usage.GpuUtilization(1).read() == 90.0  # not found: the index
