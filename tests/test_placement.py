"""Where images are decoded: the pure rule, as a table (``policy.placement``)."""

from __future__ import annotations

import pytest

from autotune.policy.placement import best_split, choose_placement

# cpu_rate, device_rate, step_rate -> where, cpu_share (None: any), words in the reason
TABLE = [
    # no device decoder: the CPUs, whatever they give
    (3_000, None, None, "cpu", 1.0, "no device decoder"),
    (3_000, None, 4_700, "cpu", 1.0, "no device decoder"),
    # the GPU issue's machine: 16 CPUs at 5.3 ms per image, nvJPEG 10,800/s, step 4,700/s:
    # the CPUs decode ~72% of each batch, the GPU the rest, ~4,180 images/s
    (3_030, 10_800, 4_700, "split", 0.72, "of each batch decoded by the workers"),
    # the CPUs keep up with the step: the device keeps its time for the step
    (5_000, 10_800, 4_700, "cpu", 1.0, "keep up with the step"),
    # step unknown (counted as free): a device decoder as fast as the CPUs doubles the rate
    (3_000, 3_200, None, "split", 0.48, "of each batch decoded by the workers"),
    # a slow device decoder beside a known step gains less than the margin
    (3_000, 800, 4_700, "cpu", 1.0, "not 10% more"),
    # a slow device decoder never wins
    (3_000, 500, 4_700, "cpu", 1.0, "not 10% more"),
    # a few CPUs and a fast decoder, step unknown: the CPUs' share is too small to matter
    (400, 10_000, None, "device", 0.0, "decoded on the device"),
    # step unknown, CPUs and device alike: decoding on both sides doubles the rate
    (3_000, 4_000, None, "split", 0.43, "of each batch decoded by the workers"),
    # the step is the bottleneck whatever decodes: the CPUs feed it within half the margin
    (960, 100_000, 1_000, "cpu", 1.0, "keep up with the step"),
    # a little short of it: moving all decoding gains under the margin
    (920, 100_000, 1_000, "cpu", 1.0, "not 10% more"),
]


@pytest.mark.parametrize(("cpu", "device", "step", "where", "share", "words"), TABLE)
def test_the_placement_table(cpu, device, step, where, share, words) -> None:
    placement = choose_placement(cpu, device, step)
    assert placement.where == where, placement.reason
    assert placement.cpu_share == pytest.approx(share, abs=0.01)
    assert words in placement.reason
    assert f"{cpu:,.0f}" in placement.reason  # the measured rates are in the reason


def test_the_split_is_where_both_sides_finish_together() -> None:
    cpu, device, step = 3_030, 10_800, 4_700
    share = best_split(cpu, device, step)
    cpu_time = share / cpu
    device_time = (1 - share) / device + 1 / step
    assert cpu_time == pytest.approx(device_time)
    predicted = choose_placement(cpu, device, step).images_per_s
    assert predicted == pytest.approx(1 / cpu_time)
    assert 4_000 < predicted < 4_400  # the estimate: about 4,000
    assert best_split(10_000, 1_000, 100) == 1.0  # never more than the whole batch


def test_a_forced_or_unmeasured_placement_predicts_nothing_it_did_not_measure() -> None:
    assert choose_placement(3_000, None).images_per_s == 3_000
    assert choose_placement(3_000, None, 1_000).images_per_s == 1_000
