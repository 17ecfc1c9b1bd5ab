"""The same random draws for a sample whatever worker makes it: per-sample seeding.

torch seeds each worker once (base seed + worker id), so which random numbers a sample's
``__getitem__`` draws depends on which worker made it, and with it on the worker count.
With a seed, the factory's loaders tag each batch of indices with its epoch
(``TaggedBatch``) and seed torch's, ``random``'s and numpy's global generators from
(seed, epoch, index) before each sample: 0, 2 or 5 workers, a worker-count change and a
resumed run give the same samples. In the main process (no workers) the caller's generator
states are put back after the batch.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

_MASK = (1 << 64) - 1


class TaggedBatch(list):
    """A batch of indices that knows its epoch (pickles to the workers with it)."""

    epoch: int = 0

    def __init__(self, indices: Any, epoch: int) -> None:
        super().__init__(indices)
        self.epoch = epoch


def sample_seed(seed: int, epoch: int, index: Any) -> int:
    """A 64-bit seed for one sample of one epoch (splitmix64 over the three)."""
    if not isinstance(index, int):
        index = zlib.crc32(repr(index).encode())
    value = seed
    for part in (epoch, index):
        value = _mix((value ^ (part * 0x9E3779B97F4A7C15)) & _MASK)
    return value


def seed_sample(value: int) -> None:
    """Seed the generators a ``__getitem__`` draws from (not CUDA's: a worker has none)."""
    torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value & 0xFFFFFFFF)


def seeded_items(get: Callable[[Any], Any], indices: Sequence[Any], seed: int,
                 epoch: int) -> list[Any]:
    """``[get(i) for i in indices]``, each drawn from its own seed; the main process keeps
    its generators' states."""
    saved = None if get_worker_info() is not None else _states()
    try:
        items = []
        for index in indices:
            seed_sample(sample_seed(seed, epoch, index))
            items.append(get(index))
        return items
    finally:
        if saved is not None:
            _restore(saved)


def _mix(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def _states() -> tuple[Any, Any, Any]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _restore(states: tuple[Any, Any, Any]) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])
