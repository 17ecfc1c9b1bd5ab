"""Worker-safe dataset wrappers: standardization with statistics computed once, and
augmentation that draws from its own per-worker random generator.

Both pickle (module-level classes holding plain data), so they work under fork, spawn and
forkserver; neither holds a generator or lambda of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._check import check_int
from ..errors import InvalidConfigError

STATS_CHUNK = 1024


def compute_stats(dataset: Any, *, chunk_size: int = STATS_CHUNK, item: int | None = 0,
                  channel_dim: int | None = None) -> tuple[Any, Any]:
    """Mean and standard deviation of a dataset's inputs, in one pass over chunks.

    Accumulates in float64, chunk by chunk (Chan et al.'s parallel update), so memory stays
    at one chunk. The standard deviation is the sample one (divided by n - 1).

    Args:
        dataset: a non-empty map-style dataset (``len`` and indexing); every sample is read.
        chunk_size: samples stacked at a time, >= 1 (default 1024): memory vs. speed.
        item: the index of the input in tuple or list samples (default 0: ``(x, y)``);
            None: the sample is the input.
        channel_dim: the channel dimension of an input for per-channel statistics (e.g. 0
            for CxHxW); None (default): one scalar over all values.

    Returns:
        ``(mean, std)``: two floats, or two float32 tensors of one value per channel with
        ``channel_dim``; ready for ``StandardizedDataset``.
    """
    check_int("chunk_size", chunk_size, minimum=1)
    if item is not None:
        check_int("item", item, minimum=0, hint=" (or None: the sample is the input)")
    if channel_dim is not None:
        check_int("channel_dim", channel_dim, minimum=0, hint=" (or None: one scalar)")
    size = len(dataset)
    if size == 0:
        raise InvalidConfigError("compute_stats needs a non-empty dataset")
    count, mean, m2 = 0, torch.zeros(()), torch.zeros(())
    for start in range(0, size, chunk_size):
        chunk = torch.stack([_input(dataset[i], item).to(torch.float64)
                             for i in range(start, min(size, start + chunk_size))])
        values = (chunk.reshape(-1) if channel_dim is None
                  else chunk.movedim(channel_dim + 1, 0).reshape(chunk.shape[channel_dim + 1], -1))
        n = values.shape[-1]
        chunk_mean = values.mean(dim=-1)
        chunk_m2 = ((values - chunk_mean.unsqueeze(-1)) ** 2).sum(dim=-1)
        if count == 0:
            count, mean, m2 = n, chunk_mean, chunk_m2
        else:
            delta = chunk_mean - mean
            total = count + n
            mean = mean + delta * n / total
            m2 = m2 + chunk_m2 + delta ** 2 * count * n / total
            count = total
    std = (m2 / max(1, count - 1)).sqrt()
    if channel_dim is None:
        return float(mean), float(std)
    return mean.to(torch.float32), std.to(torch.float32)


def _input(sample: Any, item: int | None) -> torch.Tensor:
    value = sample if item is None else sample[item]
    return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)


class StandardizedDataset(Dataset):
    """``(x - mean) / std`` on each sample's input, statistics given (see ``compute_stats``).

    The input comes out as float32; the rest of the sample is passed through unchanged.

    Args:
        base: the map-style dataset to wrap (``len`` and indexing).
        mean, std: a number each, or one value per channel (a 1-D tensor, array or list)
            broadcast over the trailing dimensions of CxHxW inputs.
        item: where the input is in each sample: an index of a tuple or list sample, or a
            key of a dict sample (default 0: ``(x, y)``); None: the sample is the input.
        eps: added to ``std``, so a constant channel (std 0) does not divide by zero.
    """

    def __init__(self, base: Any, mean: Any, std: Any, *, item: int | None = 0,
                 eps: float = 1e-8) -> None:
        self.base = base
        mean = mean if isinstance(mean, (int, float)) else torch.as_tensor(mean)
        std = std if isinstance(std, (int, float)) else torch.as_tensor(std)
        if isinstance(mean, torch.Tensor) and mean.dim() == 1:
            # per-channel statistics broadcast over the trailing dimensions of CxHxW inputs
            mean = mean.reshape(-1, 1, 1)
            if isinstance(std, torch.Tensor) and std.dim() == 1:
                std = std.reshape(-1, 1, 1)
        self.mean, self.std = mean, std
        self.item = item
        self.eps = eps

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        x = _input(sample, self.item).to(torch.float32)
        x = (x - self.mean) / (self.std + self.eps)
        return _replace(sample, self.item, x)


class AugmentedDataset(Dataset):
    """Applies ``augment(x, rng)`` to each sample's input while ``training``.

    ``rng`` is a ``numpy.random.Generator`` owned by this process and seeded from torch's
    seed for it (in a worker: the loader's base seed + worker id), so workers draw different
    augmentations, epochs differ, and a seeded loader repeats.

    Args:
        base: the map-style dataset to wrap (``len`` and indexing).
        augment: called as ``augment(x, rng)``, returns the new input. It must pickle (for
            spawned workers): a module-level function or an object of a module-level class.
        training: augment only while True (default); False passes samples through as they
            are, e.g. for validation. A plain attribute: it may be switched later.
        item: where the input is in each sample: an index of a tuple or list sample, or a
            key of a dict sample (default 0: ``(x, y)``); None: the sample is the input.
    """

    def __init__(self, base: Any, augment: Callable[[Any, np.random.Generator], Any],
                 training: bool = True, *, item: int | None = 0) -> None:
        if not callable(augment):
            raise InvalidConfigError(f"augment={augment!r} must be callable as augment(x, rng)")
        self.base = base
        self.augment = augment
        self.training = training
        self.item = item
        self._rng: np.random.Generator | None = None
        self._seed: int | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        if not self.training:
            return sample
        x = sample if self.item is None else sample[self.item]
        return _replace(sample, self.item, self.augment(x, self.rng))

    @property
    def rng(self) -> np.random.Generator:
        """This process's generator, re-created whenever torch's seed for it changes."""
        seed = torch.initial_seed()
        if self._rng is None or seed != self._seed:
            self._rng, self._seed = np.random.default_rng(seed), seed
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_rng": None, "_seed": None}


def _replace(sample: Any, item: int | None, value: Any) -> Any:
    if item is None:
        return value
    if isinstance(sample, tuple):
        return (*sample[:item], value, *sample[item + 1:])
    if isinstance(sample, list):
        return [*sample[:item], value, *sample[item + 1:]]
    sample = dict(sample)
    sample[item] = value
    return sample
