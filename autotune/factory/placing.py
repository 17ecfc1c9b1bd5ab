"""Where an ``ImageFolder`` decodes: measured here, decided by ``policy.placement``.

A few images are decoded both ways: on the CPU as a worker would (CPU seconds per image, in
this process at one torch thread, to the uint8 image a worker ships when the batches go to a
device), and as one batch of 64 on the device (after a warm-up batch, synchronised). The CPU
side's rate is the CPUs the workers may use over the seconds per image. The draws the
measurement makes come from a forked random state: the caller's seeds are untouched.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import InvalidConfigError
from ..policy.placement import Placement, choose_placement
from ..sources.images import ImageFolder

log = logging.getLogger(__name__)

SAMPLES = 16  # images timed on the CPU
DEVICE_BATCH = 64  # images in the batch timed on the device (a decoder is faster batched)


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
    transform(batch)  # the decoder's start-up (nvJPEG handles, kernels) is not its rate
    _synchronize(device)
    start = time.perf_counter()
    transform(batch)
    _synchronize(device)
    device_rate = DEVICE_BATCH / max(time.perf_counter() - start, 1e-6)
    return choose_placement(cpus / cpu_s, device_rate)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
