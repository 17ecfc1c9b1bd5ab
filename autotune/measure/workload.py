"""``measure_workload``: time a few samples in this process to learn what kind of data this is.

Wall and CPU seconds per sample tell waiting (storage, network) apart from computing; a
second pass with native thread pools capped at one thread shows what a worker process,
which gets one core's share, will see. Bounded in time: slow samples stop it early.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DatasetError, InvalidConfigError

DEFAULT_SAMPLES = 128  # waits with a heavy tail need this many for a mean within ~10%
DEFAULT_MAX_SECONDS = 1.0
MIN_TIMED_S = 0.01  # time cheap samples over at least this long
KEEP_SAMPLES = 16  # per pass, for their size and collate cost; holding more (600 KB each)
                   # changes how the allocator serves the next ones and what they cost


@dataclass(frozen=True, kw_only=True)
class WorkloadProfile:
    samples: int  # how many samples were timed
    sec_per_sample: float  # wall seconds per __getitem__ in this process
    cpu_sec_per_sample: float  # CPU seconds of this process (all its threads) per sample
    sample_bytes: int  # mean size of one sample's tensors/arrays/bytes
    single_thread_sec_per_sample: float | None = None  # wall, thread pools capped at 1
    single_thread_cpu_sec_per_sample: float | None = None  # the calling thread's CPU only
    collate_sec_per_sample: float | None = None  # default_collate cost, per sample

    @property
    def cpu_fraction(self) -> float:
        """Share of a sample's time spent computing: ~0 waits on I/O, ~1 computes.

        From the single-threaded pass, counting only the calling thread's CPU: idle BLAS
        threads that spin-wait would otherwise look like work.
        """
        wall, cpu = self.single_thread_sec_per_sample, self.single_thread_cpu_sec_per_sample
        if wall is None or cpu is None:
            wall, cpu = self.sec_per_sample, self.cpu_sec_per_sample
        return min(1.0, cpu / wall) if wall > 0 else 1.0

    @property
    def parallelism(self) -> float:
        """Process CPU over wall time with thread pools as they are: >1 means several threads."""
        return self.cpu_sec_per_sample / self.sec_per_sample if self.sec_per_sample > 0 else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_fraction": self.cpu_fraction,
                "parallelism": self.parallelism}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkloadProfile:
        return cls(**{k: v for k, v in data.items() if k not in ("cpu_fraction", "parallelism")})


def measure_workload(dataset: Any, samples: int = DEFAULT_SAMPLES, *,
                     max_seconds: float = DEFAULT_MAX_SECONDS,
                     collate_fn: Callable[[list[Any]], Any] | None = None) -> WorkloadProfile:
    """Time up to ``samples`` ``dataset[i]`` calls, spread over the whole dataset.

    Half run with native thread pools capped at one thread (as in a worker), half as this
    process has them. Stops once ``max_seconds`` have passed (after at least one sample).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidConfigError(f"samples={samples!r} must be an integer >= 1")
    try:
        size = len(dataset)
    except TypeError:
        raise InvalidConfigError(
            f"measure_workload needs a map-style dataset with __len__, got "
            f"{type(dataset).__name__}; pass workload=... or measure=False") from None
    if size < 1:
        raise InvalidConfigError(f"len(dataset)={size}: the dataset is empty")
    count = min(samples, size)
    indices = sorted({round(i * (size - 1) / max(1, count - 1)) for i in range(count)})
    deadline = time.perf_counter() + max_seconds
    # The capped pass first: once a BLAS pool has run multi-threaded its idle threads spin
    # for a while, and would slow a single-threaded pass run right after it.
    with _single_thread():
        _get(dataset, indices[0])  # warm-up: lazy opens and first touches are not per-sample
        capped = _time_pass(dataset, indices[1::2] or indices, deadline - max_seconds / 2,
                            cpu_clock=time.thread_time)
    default = None
    if time.perf_counter() < deadline:
        default = _time_pass(dataset, indices[0::2], deadline)
    wall, cpu, kept, _ = default or capped
    return WorkloadProfile(
        samples=capped[3] + (default[3] if default else 0),
        sec_per_sample=wall,
        cpu_sec_per_sample=cpu,
        sample_bytes=sum(sample_nbytes(s) for s in kept) // len(kept),
        single_thread_sec_per_sample=capped[0],
        single_thread_cpu_sec_per_sample=capped[1],
        collate_sec_per_sample=_time_collate(kept, collate_fn or _default_collate()),
    )


def _get(dataset: Any, index: int) -> Any:
    try:
        return dataset[index]
    except Exception as exc:
        raise DatasetError(index, exc) from exc


def _time_pass(dataset: Any, indices: list[int], deadline: float,
               cpu_clock: Callable[[], float] = time.process_time,
               ) -> tuple[float, float, list[Any], int]:
    """(mean wall s, mean CPU s, some of the samples, how many indices were timed).

    Cheap samples are timed over repeated passes (at least ``MIN_TIMED_S``), since a
    clock read per call would cost more than the call; slow ones stop at the deadline.
    """
    kept: list[Any] = []
    calls = 0
    wall0, cpu0 = time.perf_counter(), cpu_clock()
    while True:
        for index in indices:
            sample = _get(dataset, index)
            if len(kept) < min(len(indices), KEEP_SAMPLES):
                kept.append(sample)
            calls += 1
            if time.perf_counter() >= deadline:
                break
        wall = time.perf_counter() - wall0
        if wall >= MIN_TIMED_S or time.perf_counter() >= deadline:
            return wall / calls, (cpu_clock() - cpu0) / calls, kept, min(calls, len(indices))


class _single_thread:
    """Cap native thread pools and torch's to one thread, as a worker would have them."""

    def __enter__(self) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        self._torch_threads = torch.get_num_threads()
        self._limits = threadpool_limits(limits=1)
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self._torch_threads)
        self._limits.restore_original_limits()


def _default_collate() -> Callable[[list[Any]], Any]:
    from torch.utils.data import default_collate

    return default_collate


def _time_collate(samples: list[Any], collate_fn: Callable[[list[Any]], Any]) -> float | None:
    """Seconds per sample to collate these samples; ``None`` if they do not collate."""
    calls = 0
    start = time.perf_counter()
    while calls == 0 or time.perf_counter() - start < MIN_TIMED_S / 2:
        try:
            collate_fn(samples)
        except Exception:  # ragged samples need the user's collate_fn; cost unknown then
            return None
        calls += 1
    return (time.perf_counter() - start) / calls / len(samples)


def sample_nbytes(sample: Any) -> int:
    """Bytes of the data a sample carries (tensors, arrays, bytes, images), recursively."""
    if hasattr(sample, "element_size") and hasattr(sample, "nelement"):
        return int(sample.element_size() * sample.nelement())
    if hasattr(sample, "nbytes") and isinstance(sample.nbytes, int):
        return int(sample.nbytes)
    if isinstance(sample, (bytes, bytearray, memoryview, str)):
        return len(sample)
    if isinstance(sample, Mapping):
        return sum(sample_nbytes(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(sample_nbytes(v) for v in sample)
    if hasattr(sample, "getbands") and hasattr(sample, "size"):  # a PIL image
        width, height = sample.size
        return width * height * len(sample.getbands())
    if isinstance(sample, (int, float, bool)) or sample is None:
        return 8
    return sys.getsizeof(sample)
