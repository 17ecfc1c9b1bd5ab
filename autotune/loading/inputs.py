"""Reads of what decides an epoch and of what persistent workers copied (``policy.epochs``
judges them).

- ``epoch_inputs``: lengths, the known samplers' parameters (``WeightedRandomSampler``'s
  weights changed in place, ``SubsetRandomSampler``'s indices, a ``DistributedSampler``'s
  seed and epoch) and the state of the random source the sampler draws from.
- ``dataset_summary``: the dataset's attributes and those of the objects it holds one level
  down (lists, tuples and dicts do not count as a level), each as a comparable summary.
  Tensors by identity, shape and in-place version; numpy arrays up to 1 MiB by content;
  containers of more than 32 items by identity, length and their first and last items:
  reading every item would write to each one's reference count, and the memory pages the
  workers share with this process would be copied. Not seen: an item in the middle of a
  long container replaced in place, a change inside an object two levels down or inside a C
  extension, a numpy array over 1 MiB written in place, a file rewritten on disk.

Each read runs once per epoch, never per batch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DistributedSampler, RandomSampler,
                              SubsetRandomSampler, WeightedRandomSampler)

from ..policy.epochs import EpochInputs

_RANDOM = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
_SCALARS = (type(None), bool, int, complex, str, bytes, range)
_MANY = 32  # a container longer than this is summarised by its identity, length and ends
_ENDS = 4  # items read at each end of a long container
_ARRAY_BYTES = 1 << 20  # numpy arrays up to this size are summarised by their content


class RandomSource:
    """The generator a sampler draws its epochs from: its own, or torch's global one."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator

    @property
    def is_global(self) -> bool:
        return self.generator is None

    def get(self) -> bytes:
        state = torch.get_rng_state() if self.generator is None else self.generator.get_state()
        return state.numpy().tobytes()

    @staticmethod
    def copy_of(state: bytes) -> torch.Generator:
        """A new generator in ``state``."""
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        return generator

    def set(self, state: bytes) -> None:
        tensor = torch.frombuffer(bytearray(state), dtype=torch.uint8)
        if self.generator is None:
            torch.set_rng_state(tensor)
        else:
            self.generator.set_state(tensor)


def random_source(sampler: Any) -> RandomSource | None:
    """Where ``sampler`` draws from, for torch's random samplers (None: the others)."""
    return RandomSource(sampler.generator) if isinstance(sampler, _RANDOM) else None


def draws_as_it_runs(sampler: Any) -> bool:
    """A ``RandomSampler`` with its own generator that draws from it all epoch long (with
    replacement, or more samples than the data): its epochs cannot be drawn ahead."""
    return (isinstance(sampler, RandomSampler) and sampler.generator is not None
            and (sampler.replacement or sampler.num_samples != length_of(sampler.data_source)))


def epoch_inputs(batches: Any, order: Any, dataset: Any, random: bytes | None, *,
                 with_epoch: bool = True) -> EpochInputs:
    """What decides the next epoch of ``batches`` (a batch sampler) over ``order`` (its
    sampler), with ``random`` the state its random source draws from. ``with_epoch``: count
    the sampler's ``epoch`` in (False where the loader follows the epoch itself)."""
    params: list[tuple[str, Any]] = []
    if isinstance(batches, BatchSampler):
        params += [("batch_size", batches.batch_size), ("batch drop_last", batches.drop_last)]
    if isinstance(order, RandomSampler):
        params += [("replacement", order.replacement), ("num_samples", order.num_samples)]
    elif isinstance(order, SubsetRandomSampler):
        params.append(("indices", _digest(order.indices)))
    elif isinstance(order, WeightedRandomSampler):
        params += [("weights", _digest(order.weights)), ("num_samples", order.num_samples),
                   ("replacement", order.replacement)]
    elif isinstance(order, DistributedSampler):
        params += [(name, getattr(order, name, None)) for name in
                   ("seed", "shuffle", "num_replicas", "rank", "drop_last")]
        if with_epoch:
            params.append(("epoch", order.epoch))
    return EpochInputs(lengths=(length_of(dataset), length_of(order), length_of(batches)),
                       params=tuple(params), random=random)


def dataset_summary(dataset: Any) -> dict[str, Any]:
    """The dataset's attributes, summarised (see the module's docstring), and its length."""
    seen: set[int] = {id(dataset)}
    state = getattr(dataset, "__dict__", None)
    found = {"len()": length_of(dataset)}
    if isinstance(state, dict):
        found.update({name: _summary(value, 1, seen) for name, value in list(state.items())})
    return found


def _summary(value: Any, depth: int, seen: set[int]) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        return value.hex()  # nan equals itself here
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), tuple(value.shape), str(value.dtype), value._version)
    if isinstance(value, np.ndarray):
        content = _digest(value) if value.nbytes <= _ARRAY_BYTES else None
        return ("array", id(value), value.shape, str(value.dtype), content)
    if id(value) in seen:
        return ("seen", id(value))
    seen.add(id(value))
    if isinstance(value, (list, tuple)):
        if len(value) <= _MANY:
            return (type(value).__name__, tuple(_summary(v, depth, seen) for v in value))
        ends = [*value[:_ENDS], *value[-_ENDS:]]
        return (type(value).__name__, id(value), len(value),
                tuple(_summary(v, depth, seen) for v in ends))
    if isinstance(value, dict):
        if len(value) <= _MANY:
            return ("dict", tuple((repr(k), _summary(v, depth, seen))
                                  for k, v in list(value.items())))
        return ("dict", id(value), len(value))
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, id(value), len(value))
    state = getattr(value, "__dict__", None)
    if depth > 0 and isinstance(state, dict):
        return (type(value).__name__, tuple((name, _summary(v, depth - 1, seen))
                                            for name, v in list(state.items())))
    return (type(value).__name__, id(value))


def _digest(values: Any) -> bytes:
    """A short hash of a tensor's, an array's or a sequence's content."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    if not isinstance(values, np.ndarray):
        values = np.asarray(values)
    data = (repr(values.tolist()).encode() if values.dtype == object
            else np.ascontiguousarray(values).tobytes())
    return hashlib.blake2b(data, digest_size=16).digest()


def length_of(obj: Any) -> int | None:
    """``len(obj)``, or None when it has none."""
    try:
        return len(obj)
    except Exception:  # no len() (an endless or custom sampler): unknown
        return None
