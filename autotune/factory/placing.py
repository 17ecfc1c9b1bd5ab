"""Where an ``ImageFolder`` decodes: measured here, decided by ``policy.placement``.

A few images are decoded both ways: on the CPU as a worker would (CPU seconds per image, in
this process at one torch thread, to the uint8 image a worker ships when the batches go to a
device), and in batches of 64 on the device. On CUDA the device side is what decoding takes
from a step that keeps the GPU busy: a few batches through a ``DeviceLoader`` (its thread,
its side stream) under matrix products as long as one decode, less the same products alone;
elsewhere one batch, synchronised, after a warm-up batch. The CPU side's rate is the CPUs
the workers may use over the seconds per image. The draws the
measurement makes come from a forked random state: the caller's seeds are untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import InvalidConfigError
from ..feed.device import DeviceLoader
from ..policy.placement import Placement, choose_placement
from ..sources.images import ImageFolder

log = logging.getLogger(__name__)

SAMPLES = 16  # images timed on the CPU
DEVICE_BATCH = 64  # images in the batch timed on the device (a decoder is faster batched)
REPEATS = 4  # batches timed through a DeviceLoader under a busy step (CUDA)


def place_images(dataset: ImageFolder, device: torch.device | None, cpus: int, *,
                 collate_given: bool) -> Placement:
    """The placement for ``dataset`` whose batches go to ``device`` (``None``: they stay
    where the loader makes them), with the workers on ``cpus`` CPUs. Measured once per
    folder and device: the loaders of its splits agree."""
    asked = dataset.placement
    if asked == "device" and device is None:
        raise InvalidConfigError("ImageFolder(placement='device') decodes on the device the "
                                 "batches go to: pass device='cuda' to the factory's loader, "
                                 "or placement='cpu'")
    if asked is not None and asked != "cpu" and collate_given:
        raise InvalidConfigError("ImageFolder(placement='device') batches are packed by "
                                 "ImageFolder.collate: drop collate_fn=, or pass "
                                 "placement='cpu'")
    if asked is not None:
        placement = Placement(asked, 1.0 if asked == "cpu" else 0.0, None,
                              f"placement={asked!r} asked for")
    elif collate_given:
        placement = Placement("cpu", 1.0, None, "decoded by the workers: a collate_fn was "
                              "given (the device placement packs batches itself)")
    elif device is not None and str(device) in dataset.measured:
        placement = dataset.measured[str(device)]
    elif device is None or device.type == "cpu":
        placement = Placement("cpu", 1.0, None, "decoded by the workers: the batches stay on "
                              "the CPU")
    else:
        placement = dataset.measured[str(device)] = _measured(dataset, device, cpus)
    log.info("ImageFolder %s: %s", placement.where, placement.reason)
    return placement


def _measured(dataset: ImageFolder, device: torch.device, cpus: int) -> Placement:
    count = min(SAMPLES, len(dataset))
    indices = [i * len(dataset) // count for i in range(count)]
    try:
        transform = dataset.device_transform(device)
    except InvalidConfigError as exc:
        return Placement("cpu", 1.0, None, f"decoded by the workers: {exc}")
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)  # as in a worker (torch's DataLoader sets it there)
        try:
            start = time.process_time()
            for i in indices:
                dataset.pixels_on_cpu(i)
            cpu_s = max(time.process_time() - start, 1e-6) / count
        finally:
            torch.set_num_threads(threads)
        encoded = dataset.placed(Placement("device", 0.0, None, "measuring"))
        samples = [encoded[i] for i in indices]
    batch = dataset.collate([samples[i % count] for i in range(DEVICE_BATCH)])
    return choose_placement(cpus / cpu_s, DEVICE_BATCH / _device_seconds(transform, batch,
                                                                         device))


def _device_seconds(transform: Callable[[Any], Any], batch: Any,
                    device: torch.device) -> float:
    """Device seconds a batch's decoding costs: on CUDA what it adds to a busy GPU's steps
    (at least 5% of its time alone: never free), elsewhere its time alone."""
    transform(batch)  # the decoder's start-up (nvJPEG handles, kernels) is not its rate
    _synchronize(device)
    start = time.perf_counter()
    transform(batch)
    _synchronize(device)
    alone = max(time.perf_counter() - start, 1e-6)
    if device.type != "cuda":
        return alone
    step = _busy_step(device, alone)

    def timed(batches: Any) -> float:
        """Seconds of REPEATS steps from the first batch's arrival (the loader makes the
        first one before any step: not a cost the steps hide)."""
        start = None
        for _batch in batches:
            if start is None:
                _synchronize(device)
                start = time.perf_counter()
            step()
        _synchronize(device)
        return time.perf_counter() - (start or time.perf_counter())

    pinned = (batch[0].pin_memory(), *batch[1:])
    steps = timed([None] * (REPEATS + 1))
    both = timed(DeviceLoader([pinned] * (REPEATS + 1), device, transform=transform))
    return max((both - steps) / REPEATS, 0.05 * alone)


def _busy_step(device: torch.device, seconds: float) -> Callable[[], None]:
    """A step of matrix products that keeps ``device`` busy about ``seconds``."""
    a = torch.randn(1024, 1024, device=device)
    torch.mm(a, a)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        torch.mm(a, a)
    _synchronize(device)
    count = max(1, round(seconds / max((time.perf_counter() - start) / 10, 1e-7)))

    def step() -> None:
        for _ in range(count):
            torch.mm(a, a)

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
