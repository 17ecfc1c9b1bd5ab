"""Catch what would crash or quietly spoil a run with workers, before any worker starts.

- ``check_worker_safety``: under spawn or forkserver (forkserver is Python 3.14's default on
  Linux) every worker unpickles the dataset, collate_fn and worker_init_fn; a lambda or a
  local function there fails in the worker with an unhelpful traceback. This pickles them
  here and names the path to the offending object.
- ``check_stream_sharding``: an ``IterableDataset`` that ignores ``get_worker_info()``
  yields every item once per worker, a silent classic bug; caught by iterating its first
  items as two different workers; ``check_stream_ranks`` compares them across ranks.
- ``copy_on_read_risks``: large Python lists/dicts of objects in a dataset make every worker
  copy the memory pages it reads (reference counts are writes), so memory grows with workers
  and epochs. numpy arrays do not.
"""

from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing
import pickle
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from .._check import check_int
from ..errors import WorkerSafetyError

COPY_ON_READ_BYTES = 32 << 20  # Python objects taking this much are worth a warning
_SCAN_DEPTH = 3


def start_method(context: Any = None) -> str:
    """The start method workers will use: the given one, else the process default."""
    if context is None:
        return (multiprocessing.get_start_method(allow_none=True)
                or multiprocessing.get_all_start_methods()[0])
    return context if isinstance(context, str) else context.get_start_method()


def check_worker_safety(dataset: Any, *, collate_fn: Callable[..., Any] | None = None,
                        worker_init_fn: Callable[[int], Any] | None = None,
                        context: Any = None) -> None:
    """Raise ``WorkerSafetyError`` if workers under ``context`` could not receive these.

    Under spawn or forkserver every worker unpickles the dataset and the two functions, so
    each is pickled here (tensors and numeric arrays are skipped: they always pickle) and
    the error names the attribute path to what fails (a lambda, a local function, an open
    file, ...). Under fork nothing is pickled and nothing is checked.

    Args:
        dataset: the dataset the workers will get.
        collate_fn, worker_init_fn: the loader's functions, if any (None: not checked).
        context: the start method, a name (``"spawn"``) or a multiprocessing context;
            None: this process's default.
    """
    method = start_method(context)
    if method == "fork":
        return  # forked workers inherit memory; nothing is pickled
    for name, obj in (("dataset", dataset), ("collate_fn", collate_fn),
                      ("worker_init_fn", worker_init_fn)):
        if obj is None or _pickles(obj):
            continue
        path, problem = _culprit(obj, name, 0, set())
        raise WorkerSafetyError.unpicklable(path, problem, method)


def _pickles(obj: Any) -> bool:
    try:
        _ArraysByReference(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return True
    except Exception:
        return False


class _ArraysByReference(pickle.Pickler):
    """Leaves numeric arrays and tensors out: they always pickle, and copying a preloaded
    dataset's gigabytes only to check it would cost seconds."""

    def persistent_id(self, obj: Any) -> Any:
        import numpy as np
        import torch

        if isinstance(obj, torch.Tensor) or (isinstance(obj, np.ndarray)
                                             and obj.dtype != object):
            return id(obj)
        return None


def _culprit(obj: Any, path: str, depth: int, seen: set[int]) -> tuple[str, str]:
    """The deepest attribute path that fails to pickle, and what it is."""
    seen.add(id(obj))
    if depth < 8:
        for child_path, child in _children(obj, path):
            if id(child) not in seen and not _pickles(child):
                return _culprit(child, child_path, depth + 1, seen)
    return path, _describe(obj)


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(obj, functools.partial):
        return [(f"{path}.func", obj.func), *((f"{path}.args[{i}]", a)
                                              for i, a in enumerate(obj.args)),
                *((f"{path}.keywords[{k!r}]", v) for k, v in obj.keywords.items())]
    if isinstance(obj, Mapping):
        return [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, types.MethodType):
        return [(f"{path}.__self__", obj.__self__)]
    state = getattr(obj, "__dict__", None)
    children = [(f"{path}.{k}", v) for k, v in (state or {}).items()]
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            children.append((f"{path}.{slot}", getattr(obj, slot)))
    return children


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", "")
    if getattr(obj, "__name__", "") == "<lambda>":
        return "is a lambda"
    if "<locals>" in name:
        return f"is a function defined inside another function ({name})"
    if isinstance(obj, types.GeneratorType):
        return "is a generator"
    if isinstance(obj, io.IOBase):
        return "is an open file (open it lazily in __getitem__ instead)"
    if isinstance(obj, types.ModuleType):
        return f"is a module ({obj.__name__})"
    return f"is a {type(obj).__qualname__} that cannot be pickled"


def copy_on_read_risks(dataset: Any, *, min_bytes: int = COPY_ON_READ_BYTES) -> list[str]:
    """Attribute paths of lists/dicts/tuples/sets of Python objects taking ``min_bytes`` or more.

    Each worker that reads such a container copies the memory pages it touches (reference
    counts are writes), so memory grows with workers and epochs; numpy arrays do not.
    Each risk reads like ``"dataset.items is a list of 1,000,000 Python objects (~148 MiB)"``;
    sizes are estimated from a sample of up to 100 elements.

    Args:
        dataset: the object to scan: its attributes and containers, three levels deep
            (the elements of a container of more than 64 are not scanned one by one).
        min_bytes: the smallest estimated size worth reporting, >= 0; default 32 MiB
            (``COPY_ON_READ_BYTES``).
    """
    check_int("min_bytes", min_bytes, minimum=0)
    found: list[str] = []
    _scan(dataset, "dataset", 0, min_bytes, found, set())
    return found


def _scan(obj: Any, path: str, depth: int, min_bytes: int, found: list[str],
          seen: set[int]) -> None:
    if id(obj) in seen or depth > _SCAN_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, dict, set)):
        size = _estimated_bytes(obj)
        if size >= min_bytes:
            found.append(f"{path} is a {type(obj).__name__} of {len(obj):,} Python objects "
                         f"(~{size / 2**20:,.0f} MiB)")
        if len(obj) > 64:
            return  # a big container's elements are not scanned one by one
    for child_path, child in _children(obj, path):
        if not isinstance(child, (str, bytes, int, float, bool, type(None))):
            _scan(child, child_path, depth + 1, min_bytes, found, seen)


def _estimated_bytes(container: Any) -> int:
    """Container plus elements, from a sample of up to 100 elements (one level deep)."""
    items = list(container.items() if isinstance(container, dict) else container)
    if not items:
        return sys.getsizeof(container)
    step = max(1, len(items) // 100)
    sample = items[::step][:100]
    per_item = sum(_shallow(x) for x in sample) / len(sample)
    return int(sys.getsizeof(container) + per_item * len(items))


def _shallow(obj: Any) -> int:
    if isinstance(obj, (tuple, list)):
        return sys.getsizeof(obj) + sum(sys.getsizeof(x) for x in obj)
    if isinstance(obj, dict):
        return sys.getsizeof(obj) + sum(sys.getsizeof(k) + sys.getsizeof(v)
                                        for k, v in obj.items())
    return sys.getsizeof(obj)


SHARD_CHECK_ITEMS = 8  # items compared between two simulated workers
SHARD_CHECK_TIMEOUT_S = 30.0
RANK_CHECK_WAIT_S = 10.0  # how long a rank waits for the others' first items


def check_stream_sharding(dataset: Any, *, items: int = SHARD_CHECK_ITEMS,
                          timeout_s: float = SHARD_CHECK_TIMEOUT_S) -> None:
    """Raise ``WorkerSafetyError`` if an ``IterableDataset`` ignores ``get_worker_info()``.

    Iterates the first ``items`` items twice in this process, once as worker 0 of 2 and
    once as worker 1 of 2; identical items mean every worker would yield the whole stream
    (each item once per worker per epoch). Streams that shard, or draw at random, differ.
    Bounded: a stream that does not yield ``items`` items within ``timeout_s`` raises.
    """
    from ..sources.sharding import ShardedIterable

    if isinstance(dataset, ShardedIterable):
        return
    seen = [_first_items(dataset, items, timeout_s, worker) for worker in (0, 1)]
    if seen[0] and seen[0] == seen[1]:
        raise WorkerSafetyError(
            f"{type(dataset).__name__} yields the same items in every DataLoader worker (its "
            f"first {len(seen[0])} items as worker 0 of 2 and as worker 1 of 2 are identical), "
            "so an epoch would repeat each item once per worker. Fix: split the items by "
            "torch.utils.data.get_worker_info() in __iter__, or wrap it: "
            "autotune.shard_iterable(dataset); or use num_workers=0 or 1")


def check_stream_ranks(dataset: Any, *, items: int = SHARD_CHECK_ITEMS,
                       timeout_s: float = SHARD_CHECK_TIMEOUT_S,
                       wait_s: float | None = None) -> bool:
    """Under a process group: raise ``WorkerSafetyError`` if every rank's stream starts with
    the same items (each rank would train on the same data). ``False`` when the other ranks
    did not build a loader within ``wait_s`` (default ``RANK_CHECK_WAIT_S``; nothing to
    compare), else ``True``."""
    from ..sources.sharding import ShardedIterable
    from ..system.distributed import exchange

    if isinstance(dataset, ShardedIterable):
        return True
    mine = _first_items(dataset, items, timeout_s)
    everyone = exchange("\n".join(mine).encode(),
                        RANK_CHECK_WAIT_S if wait_s is None else wait_s)
    if everyone is None:
        return False
    if mine and len(set(everyone)) == 1:
        raise WorkerSafetyError(
            f"{type(dataset).__name__} yields the same items on all {len(everyone)} ranks (the "
            f"first {len(mine)} are identical), so every rank would train on the same data. "
            "Fix: split the items by torch.distributed.get_rank() in __iter__ (as well as by "
            "worker), or wrap it: autotune.shard_iterable(dataset)")
    return True


def _first_items(dataset: Any, items: int, timeout_s: float,
                 worker: int | None = None) -> list[str]:
    """Fingerprints of the first items the stream yields (as worker ``worker`` of 2)."""
    from torch.utils.data import _utils

    from .._bounded import run_bounded

    def first() -> list[str]:
        found = []
        for item in dataset:
            found.append(fingerprint(item))
            if len(found) >= items:
                break
        return found

    state = _utils.worker._worker_info  # what get_worker_info() returns, process-wide
    if worker is not None:
        _utils.worker._worker_info = _utils.worker.WorkerInfo(
            id=worker, num_workers=2, seed=worker, dataset=dataset)
    try:
        return run_bounded(first, timeout_s, f"iterating the first {items} items of "
                           f"{type(dataset).__name__} (to check that workers and ranks get "
                           "different items)")
    finally:
        _utils.worker._worker_info = state


def fingerprint(item: Any) -> str:
    """A digest of an item's content: tensors and arrays by dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, item)
    return digest.hexdigest()


def _feed(digest: Any, item: Any) -> None:
    import torch

    if isinstance(item, torch.Tensor):
        data = item.detach().cpu().contiguous()
        digest.update(f"T{data.dtype}{tuple(data.shape)}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif hasattr(item, "tobytes") and hasattr(item, "dtype"):  # numpy
        digest.update(f"A{item.dtype}{getattr(item, 'shape', '')}".encode())
        digest.update(item.tobytes())
    elif isinstance(item, Mapping):
        for key, value in item.items():
            digest.update(repr(key).encode())
            _feed(digest, value)
    elif isinstance(item, (list, tuple)):
        digest.update(f"L{len(item)}".encode())
        for value in item:
            _feed(digest, value)
    elif isinstance(item, (bytes, bytearray)):
        digest.update(bytes(item))
    else:
        digest.update(repr(item).encode())
