"""Where images are decoded: the pure rule, as a table (``policy.placement``)."""

from __future__ import annotations

import pytest

from autotune.policy.placement import (SHARE_STEP, Placement, best_split, choose_placement,
                                       reconsider)

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


def measured(where: str, share: float, cpu: float, device: float) -> Placement:
    return Placement(where, share, None, "measured (test)", cpu_rate=cpu, device_rate=device)


# placement in effect, batch, step seconds, stall, loop images/s -> where (None: stays), words
RECONSIDERED = [
    # forced, or never measured: never moves
    (Placement("device", 0.0, None, "asked for"), 256, 0.2, 0.5, 1_000, None, ""),
    # the CPUs keep the loop fed: nothing to gain
    (measured("cpu", 1.0, 3_000, 10_800), 256, 0.054, 0.01, 4_600, None, ""),
    # the GPU issue's run: the loop waits 55% for CPUs delivering 2,100 images/s, a step
    # of 54 ms (4,700 images/s): the device takes part of each batch
    (measured("cpu", 1.0, 3_000, 10_800), 256, 0.054, 0.55, 2_100, "split",
     "waited 55% with the cpu placement"),
    # on the device, the step measured 78 ms: 24 ms of it the decoder's; the step's own
    # 4,700 images/s are within the CPUs' reach: back to the CPUs
    (measured("device", 0.0, 5_000, 10_800), 256, 0.078, 0.0, 3_280, "cpu",
     "keep up with the step"),
    # few CPUs, the step needs the device's decoding: it stays
    (measured("device", 0.0, 400, 10_000), 256, 0.1, 0.0, 2_560, None, ""),
    # the decoder's share ran beside the step (longer than the step measured): the step
    # counts as free, and the CPUs take their share
    (measured("device", 0.0, 3_000, 10_000), 256, 0.01, 0.3, 9_000, "split", "step"),
]


@pytest.mark.parametrize(("current", "batch", "step_s", "stall", "rate", "where", "words"),
                         RECONSIDERED)
def test_reconsidering_the_placement_with_the_step_measured(current, batch, step_s, stall,
                                                            rate, where, words) -> None:
    new = reconsider(current, images_per_step=batch, step_s=step_s, stall=stall,
                     images_per_s=rate)
    assert (new.where if new is not None else None) == where, new
    if new is not None:
        assert words in new.reason and "measured while training" in new.reason
        assert new.cpu_rate is not None and new.device_rate == current.device_rate


def test_a_split_moves_only_by_a_real_step() -> None:
    cpu, device, step = 3_030, 10_800, 4_700
    split = choose_placement(cpu, device, step)
    batch = 256
    step_s = batch / step + (1 - split.cpu_share) * batch / device  # as measured on the split
    assert reconsider(split, images_per_step=batch, step_s=step_s, stall=0.0,
                      images_per_s=4_000) is None
    faster_step = batch / 9_000 + (1 - split.cpu_share) * batch / device
    moved = reconsider(split, images_per_step=batch, step_s=faster_step, stall=0.3,
                       images_per_s=3_000)
    assert moved is not None and moved.cpu_share < split.cpu_share - SHARE_STEP


def test_a_waiting_split_reads_the_cpus_real_rate() -> None:
    # the machine with the CPUs estimated at 3,000 images/s but delivering 2,100: the
    # split at 71% waits on them (30%); their real rate gives the share where both finish
    cpu_real, device, step, batch = 2_100, 10_800, 4_740, 256
    split = measured("split", 0.713, 3_000, device)
    rate = cpu_real / split.cpu_share  # the loop runs at what the CPUs' share allows
    step_s = batch / step + (1 - split.cpu_share) * batch / device
    moved = reconsider(split, images_per_step=batch, step_s=step_s, stall=0.3,
                       images_per_s=rate)
    assert moved is not None and moved.where == "split"
    assert moved.cpu_share == pytest.approx(best_split(cpu_real, device, step), abs=0.01)
    assert moved.cpu_rate == pytest.approx(cpu_real)
