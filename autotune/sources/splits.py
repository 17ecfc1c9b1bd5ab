"""Reproducible train/validation/test splits of one map-style dataset."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Subset

from .._check import check_int, dataset_size, is_stream
from ..errors import InvalidConfigError

DEFAULT_SPLITS = (0.8, 0.1, 0.1)
_NAMES = ("train", "val", "test")


def split_dataset(dataset: Any, splits: Sequence[float | None] = DEFAULT_SPLITS, *,
                  seed: int = 0) -> tuple[Subset[Any] | None, ...]:
    """One ``Subset`` per fraction in ``splits`` (``None`` for a split of ``None`` or 0).

    Samples are drawn by a permutation seeded with ``seed``, so the same seed gives the
    same split on every run and every rank. Fractions may add up to less than 1 (the rest
    is left out); when they add up to 1, every sample is in exactly one split.
    """
    if is_stream(dataset):
        raise InvalidConfigError(
            f"splits= cannot split an IterableDataset ({type(dataset).__name__}): its items "
            "come in the stream's order. Build a stream per split and pass train=, val=, test=")
    fractions = _check_splits(splits)
    check_int("seed", seed, minimum=0)
    size = dataset_size(dataset, who="splits=") or 0
    counts = [math.floor(f * size + 1e-9) for f in fractions]
    if math.isclose(sum(fractions), 1.0):  # hand the rounding remainder out, in order
        used = [i for i, f in enumerate(fractions) if f > 0]
        for i in range(size - sum(counts)):
            counts[used[i % len(used)]] += 1
    for name, fraction, count in zip(_NAMES, fractions, counts):
        if fraction > 0 and count == 0:
            raise InvalidConfigError(
                f"splits gives {name} {fraction:g} of {size} samples: less than one sample. "
                "Fix: a larger fraction, or None for no such split")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    subsets: list[Subset[Any] | None] = []
    start = 0
    for count in counts:
        subsets.append(Subset(dataset, order[start:start + count]) if count else None)
        start += count
    return tuple(subsets)


def _check_splits(splits: Any) -> list[float]:
    if isinstance(splits, (str, bytes)) or not isinstance(splits, Sequence) \
            or len(splits) != len(_NAMES):
        raise InvalidConfigError(
            f"splits={splits!r} must be three fractions (train, val, test), e.g. "
            f"{DEFAULT_SPLITS}; None or 0 leaves a split out")
    fractions = []
    for name, value in zip(_NAMES, splits):
        value = 0.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not 0 <= value <= 1:
            raise InvalidConfigError(
                f"splits {name} fraction {value!r} must be a number from 0 to 1, or None")
        fractions.append(float(value))
    if sum(fractions) > 1 + 1e-9:
        raise InvalidConfigError(f"splits={tuple(splits)!r} add up to {sum(fractions):g} > 1")
    if not any(fractions):
        raise InvalidConfigError(f"splits={tuple(splits)!r} leaves every split out")
    return fractions
