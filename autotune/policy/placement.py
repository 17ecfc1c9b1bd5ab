"""Where images are decoded: on the CPUs (in the workers), on the device, or split between them.

A pure decision over three measured rates, in images per second:

- ``cpu_rate``: what the workers can decode and transform together (CPU seconds per image
  measured in one process, times the CPUs the workers may use);
- ``device_rate``: the device's batched decode and transform alone (``None``: no device
  decoder, or batches stay on the CPU);
- ``step_rate``: the training step's own rate, when known (``None``: not measured).

Decoding on the device takes the device's time from the step (its JPEG decoder shares the GPU
with the model unless the GPU has hardware JPEG engines), so one image costs the device
``1/device_rate + 1/step_rate`` seconds. With a share ``f`` of each batch decoded on the CPUs
the loop runs at ``min(cpu_rate / f, 1 / ((1 - f) / device_rate + 1 / step_rate))``, best
where the two meet. The CPU placement is kept unless another one is predicted faster by more
than ``MARGIN``: it needs no device memory and is the placement every loader is measured on.

While a training run adapts (``adapt=True``), ``reconsider`` asks again at an epoch boundary
with what the run measured: the step's time (which holds the device's decoding of its share
of the batch: the step's own rate is what remains) and, when the loop waits for the workers,
the rate the CPUs really delivered (the loop's rate times their share of each batch).
"""

from __future__ import annotations

import dataclasses
import math

from .stall import MODERATE

MARGIN = 0.10  # a placement must be predicted this much faster than decoding on the CPUs
SHARE_STEP = 0.15  # a split's share moves only by this much or more
PLACEMENTS = ("cpu", "device", "split")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where each image of a batch is decoded.

    Attributes:
        where: ``"cpu"`` (workers decode and transform), ``"device"`` (workers read the
            bytes, the device decodes) or ``"split"`` (a share of each batch on each side).
        cpu_share: the fraction of images the workers decode (1.0 for ``"cpu"``, 0.0 for
            ``"device"``).
        images_per_s: the rate the decision predicts (``None`` when a rate was not measured).
        reason: why, with the measured rates.
        cpu_rate, device_rate: the measured rates it was decided from (``None``: forced,
            or not measured); a placement without both is never reconsidered.
    """

    where: str
    cpu_share: float
    images_per_s: float | None
    reason: str
    cpu_rate: float | None = None
    device_rate: float | None = None


def _predicted(cpu_share: float, cpu_rate: float, device_rate: float,
               step_rate: float | None) -> float:
    """Images per second with ``cpu_share`` of each batch decoded by the workers."""
    step_s = 1.0 / step_rate if step_rate else 0.0
    device_s = (1.0 - cpu_share) / device_rate + step_s
    cpu_bound = cpu_rate / cpu_share if cpu_share > 0 else math.inf
    return min(cpu_bound, 1.0 / device_s if device_s > 0 else math.inf)


def best_split(cpu_rate: float, device_rate: float, step_rate: float | None) -> float:
    """The CPUs' share of each batch where the CPUs and the device finish together (0..1)."""
    step_s = 1.0 / step_rate if step_rate else 0.0
    share = (1.0 / device_rate + step_s) / (1.0 / cpu_rate + 1.0 / device_rate)
    return min(1.0, max(0.0, share))


def choose_placement(cpu_rate: float, device_rate: float | None,
                     step_rate: float | None = None) -> Placement:
    """Where to decode, from the measured rates (images/s; see the module docstring)."""
    placement = _chosen(cpu_rate, device_rate, step_rate)
    return dataclasses.replace(placement, cpu_rate=cpu_rate, device_rate=device_rate)


def reconsider(current: Placement, *, images_per_step: int, step_s: float, stall: float,
               images_per_s: float) -> Placement | None:
    """Where to decode from now on, from what a training run measured; ``None``: stay.

    Args:
        current: the placement in effect (its measured ``cpu_rate`` and ``device_rate``).
        images_per_step: images in a batch.
        step_s: seconds a step took (the device's time when longer than the host's).
        stall: the share of the loop's time spent waiting for batches.
        images_per_s: the rate the loop ran at.
    """
    if current.cpu_rate is None or current.device_rate is None or images_per_step < 1 \
            or step_s <= 0:
        return None  # forced, or never measured
    if current.where == "cpu" and stall < MODERATE:
        return None  # the CPUs keep the loop fed
    decoding_s = (1.0 - current.cpu_share) * images_per_step / current.device_rate
    own_s = step_s - decoding_s
    step_rate = images_per_step / own_s if own_s > 0 else None
    cpu_rate = current.cpu_rate
    if stall >= MODERATE and current.cpu_share > 0:  # the loop waited for the workers' share:
        cpu_rate = images_per_s * current.cpu_share  # what the CPUs really deliver
    new = choose_placement(cpu_rate, current.device_rate, step_rate)
    if new.where == current.where and abs(new.cpu_share - current.cpu_share) < SHARE_STEP:
        return None
    return dataclasses.replace(new, reason=(
        f"measured while training: a step takes {step_s * 1e3:.3g} ms and the loop waited "
        f"{stall:.0%} with the {current.where} placement; {new.reason}"))


def _chosen(cpu_rate: float, device_rate: float | None,
            step_rate: float | None) -> Placement:
    rates = f"CPUs {cpu_rate:,.0f} images/s"
    if device_rate is None or device_rate <= 0:
        return Placement("cpu", 1.0, min(cpu_rate, step_rate or math.inf),
                         f"decoded by the workers: {rates}, no device decoder to compare")
    rates += f", device decoder {device_rate:,.0f}"
    if step_rate:
        rates += f", step {step_rate:,.0f}"
    cpu = _predicted(1.0, cpu_rate, device_rate, step_rate)
    device = _predicted(0.0, cpu_rate, device_rate, step_rate)
    share = best_split(cpu_rate, device_rate, step_rate)
    split = _predicted(share, cpu_rate, device_rate, step_rate)
    if step_rate and cpu >= step_rate * (1 - MARGIN / 2):
        return Placement("cpu", 1.0, cpu, f"decoded by the workers: {rates}; the CPUs keep "
                         "up with the step, the device keeps its time for it")
    best = max(("device", 0.0, device), ("split", share, split), key=lambda c: c[2])
    if best[2] < cpu * (1 + MARGIN):
        return Placement("cpu", 1.0, cpu, f"decoded by the workers: {rates}; the device "
                         f"would give {best[2]:,.0f} images/s, not {MARGIN:.0%} more")
    if best[0] == "split" and share >= 0.05 and split > device * (1 + MARGIN / 2):
        return Placement("split", round(share, 3), split,
                         f"{share:.0%} of each batch decoded by the workers, the rest on the "
                         f"device: {rates}; predicted {split:,.0f} images/s against "
                         f"{cpu:,.0f} on the CPUs alone and {device:,.0f} on the device alone")
    return Placement("device", 0.0, device,
                     f"decoded on the device: {rates}; predicted {device:,.0f} images/s "
                     f"against {cpu:,.0f} on the CPUs")
