"""Small real datasets the tests load through real DataLoaders (module-level: picklable)."""

from __future__ import annotations

import gc
import os
import random
import resource
import signal
import threading
import time

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset


class Sized(Dataset):
    """A map-style dataset of ``self.size`` samples."""

    size: int

    def __len__(self) -> int:
        return self.size


class Indexed(Sized):
    """Sample i is tensor([i]): lets a test check every sample arrives exactly once."""

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index])


class Sleepy(Sized):
    """Waits like storage does: almost no CPU per sample."""

    def __init__(self, size: int = 64, seconds: float = 0.004) -> None:
        self.size, self.seconds = size, seconds

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.zeros(8)


class Busy(Sized):
    """Computes in pure Python: CPU time close to wall time."""

    def __init__(self, size: int = 64, loops: int = 20_000) -> None:
        self.size, self.loops = size, loops

    def __getitem__(self, index: int) -> torch.Tensor:
        total = 0
        for i in range(self.loops):
            total += i * i
        return torch.tensor([float(total % 7)])


class RandomDraws(Sized):
    """Returns draws from random, numpy's legacy RNG, a numpy Generator and torch."""

    def __init__(self, size: int = 32) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        return torch.tensor([index, -1 if info is None else info.id, random.random(),
                             np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


class FailsAt(Sized):
    def __init__(self, bad_index: int, size: int = 16, error: type = ValueError) -> None:
        self.bad_index, self.size, self.error = bad_index, size, error

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == self.bad_index:
            raise self.error("corrupt record")
        return torch.zeros(2)


class Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> torch.Tensor:
        raise IndexError(index)


_FLAG = 0


def set_flag(worker_id: int) -> None:
    """A user worker_init_fn: marks the worker so samples can show it ran."""
    global _FLAG
    _FLAG = 100 + worker_id


class ReportsWorker(Sized):
    """Returns (flag set by the user's init fn, torch threads, largest native pool size)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        from threadpoolctl import threadpool_info

        pools = [p["num_threads"] for p in threadpool_info()] or [0]
        return torch.tensor([_FLAG, torch.get_num_threads(), max(pools)])


class TorchMatmul(Sized):
    """A torch op big enough for torch to want a parallel region."""

    def __init__(self, size: int = 4) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        x = torch.ones(256, 256)
        return (x @ x).sum().reshape(1)


class KillsWorker(Sized):
    """Fine in the main process; a worker process that touches it dies (like the OOM killer)."""

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        import os
        import signal

        import torch.utils.data

        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(4)


class DiesInWorker(Sized):
    """The worker process that loads ``bad_index`` dies of signal ``sig`` (SIGKILL is what the
    out-of-memory killer sends), or exits with code 3 when ``sig`` is None. Each sample takes
    10 ms, so the main process is waiting on the loader when the worker dies."""

    def __init__(self, bad_index: int, sig: int | None = signal.SIGKILL, size: int = 32) -> None:
        self.bad_index, self.sig, self.size = bad_index, sig, size

    def __getitem__(self, index: int) -> torch.Tensor:
        import torch.utils.data

        time.sleep(0.01)
        if index == self.bad_index and torch.utils.data.get_worker_info() is not None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from SIGSEGV
            if self.sig is None:
                os._exit(3)
            os.kill(os.getpid(), self.sig)
        return torch.zeros(4)


class GcInWorker(Sized):
    """Returns the worker's USS before and after a full garbage collection."""

    def __init__(self, size: int = 2) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        import psutil

        before = psutil.Process().memory_full_info().uss
        gc.collect()
        after = psutil.Process().memory_full_info().uss
        return torch.tensor([before, after], dtype=torch.int64)


class HangsInWorker(Sized):
    """Fine in the main process; never returns in a worker."""

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        import torch.utils.data

        if torch.utils.data.get_worker_info() is not None:
            time.sleep(3600)
        return torch.zeros(4)


def make_small() -> Sleepy:
    """For `autotune tune tests/datasets.py:make_small`."""
    return Sleepy(size=256, seconds=0.002)


def add_noise(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A module-level augmentation: picklable, draws from the rng it is given."""
    return x + torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))


class Pairs(Sized):
    """(input, label) pairs of known statistics: input i is full of float(i)."""

    def __init__(self, size: int = 64, shape: tuple[int, ...] = (3, 4, 4)) -> None:
        self.size, self.shape = size, shape

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full(self.shape, float(index)), index % 3


class NaiveAugmented(Dataset):
    """The bug AugmentedDataset fixes: one Generator made in __init__, copied into every worker."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return add_noise(x, self.rng), y


class WithLambda(Sized):
    """A transform holding a lambda: fine under fork, fails to pickle under spawn."""

    class Transform:
        def __init__(self, fn) -> None:
            self.fn = fn

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.transform = WithLambda.Transform(lambda x: x * 2)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform.fn(torch.tensor([index]))


class ManyPaths(Dataset):
    """File paths kept as a Python list: the copy-on-read pattern."""

    def __init__(self, size: int = 600_000) -> None:
        self.paths = [f"/data/images/{i:08d}.jpg" for i in range(size)]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([len(self.paths[index])])


class ArrayBacked(Dataset):
    """The same data as a numpy array: workers read it without copying pages."""

    def __init__(self, size: int = 600_000) -> None:
        self.lengths = np.full(size, 23, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([int(self.lengths[index])])


class NeverReturns(Sized):
    """One sample (index 0) that never returns, anywhere: a stuck network read."""

    def __init__(self, size: int = 64) -> None:
        self.size = size

    def __getitem__(self, index: int) -> torch.Tensor:
        if index == 0:
            threading.Event().wait()
        return torch.zeros(4)


def make_never_returns() -> NeverReturns:
    """For `autotune tune tests/datasets.py:make_never_returns`."""
    return NeverReturns()


class Stream(IterableDataset):
    """Items tensor([i]) for i < size, split across workers by get_worker_info()."""

    def __init__(self, size: int = 96, seconds: float = 0.0) -> None:
        self.size, self.seconds = size, seconds

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i in range(worker, self.size, workers):
            if self.seconds:
                time.sleep(self.seconds)
            yield torch.tensor([i])


class SizedStream(Stream):
    """A stream that knows its length."""

    def __len__(self) -> int:
        return self.size


class UnshardedStream(IterableDataset):
    """The classic bug: every worker yields the whole stream."""

    def __init__(self, size: int = 96) -> None:
        self.size = size

    def __iter__(self):
        return (torch.tensor([i]) for i in range(self.size))


class StreamFailsAt(IterableDataset):
    def __init__(self, bad_item: int, size: int = 32) -> None:
        self.bad_item, self.size = bad_item, size

    def __iter__(self):
        for i in range(self.size):
            if i == self.bad_item:
                raise ValueError("corrupt record")
            yield torch.tensor([i])


class EmptyStream(IterableDataset):
    def __iter__(self):
        return iter(())


class StuckStream(IterableDataset):
    """Yields one item, then blocks forever (a stuck network read)."""

    def __iter__(self):
        yield torch.tensor([0])
        threading.Event().wait()


def make_stream() -> Stream:
    """For `autotune tune tests/datasets.py:make_stream`."""
    return Stream(size=512, seconds=0.001)


def make_unsharded_stream() -> UnshardedStream:
    return UnshardedStream()


class RankStream(IterableDataset):
    """Splits its items by rank and by worker itself (as WebDataset's split_by_node does)."""

    def __init__(self, size: int = 40) -> None:
        self.size = size

    def __iter__(self):
        import torch.distributed as dist
        import torch.utils.data

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() \
            else (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        yield from (torch.tensor([i]) for i in range(rank * workers + worker, self.size,
                                                     world * workers))


class SleepyIndexed(Sized):
    """Waits like storage (``seconds`` per sample), then returns tensor([i])."""

    def __init__(self, size: int = 64, seconds: float = 0.004) -> None:
        self.size, self.seconds = size, seconds

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.tensor([index])


def make_pair() -> dict[str, Dataset]:
    """For `autotune tune tests/datasets.py:make_pair --strategy weighted`: one loop, two
    datasets (storage waits and pure-Python work)."""
    return {"io": Sleepy(size=512, seconds=0.002), "cpu": Busy(size=512, loops=2_000)}
