"""``measure_workload``: time a few samples in this process to learn what kind of data this is.

Wall and CPU seconds per sample tell waiting (storage, network) apart from computing; a
second pass with native thread pools capped at one thread shows what a worker process,
which gets one core's share, will see. Bounded in time: slow samples stop it early, and a
sample that never returns is abandoned after ``sample_timeout_s`` with an error naming it
(the timing runs in a daemon thread the caller watches).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._check import check_int, check_seconds, dataset_size, is_stream
from ..errors import AutotuneError, DatasetError, InvalidConfigError
from ..records import WorkloadProfile

DEFAULT_SAMPLES = 128  # waits with a heavy tail need this many for a mean within ~10%
DEFAULT_MAX_SECONDS = 1.0
DEFAULT_SAMPLE_TIMEOUT_S = 30.0  # one dataset[i] slower than this is taken for a hang
POLL_S = 0.05  # how often the caller looks at the measuring thread
# Samples cheaper than this, once all have returned in the measuring thread, are measured
# again in the calling thread, where in-process loading runs them: a second thread allocates
# from a fresh malloc arena and runs torch ops on a second OpenMP team, which cost a 600 KB
# sample ~50 us more there on 2 CPUs; negligible next to a slower sample.
RETIME_BELOW_S = 1e-3
MIN_TIMED_S = 0.01  # time cheap samples over at least this long
KEEP_SAMPLES = 16  # per pass, for their size and collate cost; holding more (600 KB each)
                   # changes how the allocator serves the next ones and what they cost


def measure_workload(dataset: Any, samples: int = DEFAULT_SAMPLES, *,
                     max_seconds: float = DEFAULT_MAX_SECONDS,
                     sample_timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S,
                     collate_fn: Callable[[list[Any]], Any] | None = None) -> WorkloadProfile:
    """Time up to ``samples`` ``dataset[i]`` calls, spread over the whole dataset (for an
    ``IterableDataset``: its first items, iterated as one process would, starting over at
    the end of the stream; for a chunked one, with ``chunk_ranges``: consecutive samples
    from its middle, timed with their chunks already read, plus each chunk's first read
    spread over its samples, as ``ChunkShuffleSampler`` has them read).

    Half run with native thread pools capped at one thread (as in a worker), half as this
    process has them. Stops once ``max_seconds`` have passed (after at least one sample).
    The calls run in a separate daemon thread of this process, so that one that never
    returns cannot hang the caller; a dataset must not hold objects tied to the thread that
    made them (an ``sqlite3`` connection with ``check_same_thread=True``). Cheap samples
    (under ``RETIME_BELOW_S``), once every one has returned there, are timed again in the
    calling thread, where in-process loading would run them.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) or an
            ``IterableDataset``.
        samples: how many indices to time, at most; spread evenly over the dataset.
        max_seconds: stop timing after this long (the slow samples' bound).
        sample_timeout_s: give up on one ``dataset[i]`` call (or the ``collate_fn`` call)
            that has not returned after this long, and raise ``DatasetError`` naming the
            index. The call is left running in a daemon thread; it cannot be stopped.
        collate_fn: what batches the samples (``default_collate`` when ``None``), to time it.

    Raises:
        InvalidConfigError: an argument is out of range, or the dataset is empty or has no
            ``__len__``.
        DatasetError: ``dataset[i]`` raised, or did not return within ``sample_timeout_s``.
        AutotuneError: ``collate_fn`` did not return within ``sample_timeout_s``.

    Example::

        profile = measure_workload(dataset, samples=64, sample_timeout_s=10.0)
        profile.sec_per_sample, profile.cpu_fraction, profile.lognormal_sec_per_sample
    """
    check_int("samples", samples, minimum=1)
    check_seconds("max_seconds", max_seconds)
    check_seconds("sample_timeout_s", sample_timeout_s)
    size = dataset_size(dataset, who="measure_workload (pass workload=... or measure=False "
                                     "to skip it)")
    stream = is_stream(dataset)
    count = min(samples, size) if size is not None else samples
    chunks = None if stream else getattr(dataset, "chunk_ranges", None)
    reads = None
    if stream:  # the first items, in the stream's own order
        indices = list(range(count))
    elif chunks:  # a run from the middle, its chunks' reads spread over all their samples
        assert size is not None  # a map-style dataset has a length
        middle = len(chunks) // 2
        start = max(0, min(chunks[middle].start, size - count))
        indices = list(range(start, start + count))
        reads = _ChunkReads(chunks[middle - 1].start if middle else None,
                            [r for r in chunks if r.start <= indices[-1] and r.stop > start])
    else:
        assert size is not None
        indices = sorted({round(i * (size - 1) / max(1, count - 1)) for i in range(count)})
    run = _Measurement(dataset, indices, max_seconds, collate_fn or _default_collate(),
                       stream=stream, reads=reads)
    thread = threading.Thread(target=run.run, name="autotune-measure-workload", daemon=True)
    thread.start()
    try:
        run.watch(sample_timeout_s)
    finally:
        if not run.done.is_set():  # timed out, or the caller was interrupted (Ctrl-C)
            run.abandon()
    if run.error is not None:
        raise run.error
    thread.join(timeout=1.0)  # done: let it exit before anything is timed here
    return run.result()


class _AbandonedError(Exception):
    """Unwinds the measuring thread once the caller has given up on it."""


class _Measurement:
    """One measurement, run by a daemon thread and watched by the caller.

    The thread records what it is doing (``doing``: the index, or ``None`` for the
    collate call, and since when); the caller polls it and gives up on a call that takes
    longer than the bound. An abandoned thread stops at its next step; the process-wide
    thread-pool limits it set are restored by the caller, not left to it.
    """

    def __init__(self, dataset: Any, indices: list[int], max_seconds: float,
                 collate_fn: Callable[[list[Any]], Any], *, stream: bool = False,
                 reads: _ChunkReads | None = None) -> None:
        self.dataset, self.indices, self.max_seconds = dataset, indices, max_seconds
        self.stream = stream
        self.reads = reads
        self._read: tuple[float, float] | None = None
        self._items: Any = None  # the stream's iterator
        self.collate_fn = collate_fn
        self.doing: tuple[int | None, float] | None = None
        self.done = threading.Event()
        self.abandoned = False
        self.capping = _SingleThread()
        self.profile: WorkloadProfile | None = None
        self.error: BaseException | None = None
        self.complete = False  # every index returned

    # --- the measuring thread ---------------------------------------------------------

    def run(self) -> None:
        try:
            self.profile = self._measure()
        except _AbandonedError:
            pass
        except BaseException as exc:  # handed to the caller, raised there
            self.error = exc
        finally:
            self.done.set()

    def _measure(self) -> WorkloadProfile:
        indices, max_seconds = self.indices, self.max_seconds
        deadline = time.perf_counter() + max_seconds
        # The capped pass first: once a BLAS pool has run multi-threaded its idle threads
        # spin for a while, and would slow a single-threaded pass run right after it.
        with self.capping:
            if self.reads is None:
                self.get(indices[0])  # warm-up: lazy opens and first touches are not per-sample
                read = (0.0, 0.0)
            else:  # timed once: a second measurement (``result``) finds them cached
                read = self._read = self._read or self._time_reads(self.reads)
            capped = _spread(read, _time_pass(self.get, indices[1::2] or indices,
                                              deadline - max_seconds / 2,
                                              cpu_clock=time.thread_time))
        default = None
        if time.perf_counter() < deadline and not self.abandoned:
            default = _spread(read, _time_pass(self.get, indices[0::2], deadline))
        self.complete = (capped[3] == len(indices[1::2] or indices)
                         and default is not None and default[3] == len(indices[0::2]))
        wall, cpu, kept, _, _ = default or capped
        log_mean, log_std = _log_stats(capped[4] + (default[4] if default else []))
        return WorkloadProfile(
            samples=capped[3] + (default[3] if default else 0),
            sec_per_sample=wall,
            cpu_sec_per_sample=cpu,
            sample_bytes=sum(sample_nbytes(s) for s in kept) // len(kept),
            single_thread_sec_per_sample=capped[0],
            single_thread_cpu_sec_per_sample=capped[1],
            collate_sec_per_sample=self._time_collate(kept),
            wall_log_mean=log_mean,
            wall_log_std=log_std,
        )

    def _time_reads(self, reads: _ChunkReads) -> tuple[float, float]:
        """(wall, CPU) seconds per sample of reading the run's chunks: each chunk's first
        sample, timed after a warm-up in another chunk, over the chunk's samples."""
        clear = getattr(self.dataset, "clear_cache", None)
        if clear is not None:  # a read timed from the cache would cost nothing
            clear()
        if reads.warm_up is not None:
            self.get(reads.warm_up)
        began, cpu0 = time.perf_counter(), time.thread_time()
        for chunk in reads.chunks:
            self.get(chunk.start)
        rows = sum(len(chunk) for chunk in reads.chunks)
        return ((time.perf_counter() - began) / rows, (time.thread_time() - cpu0) / rows)

    def get(self, index: int) -> tuple[Any, float]:
        """``dataset[index]`` and the clock when it returned, watched by the caller."""
        since = time.perf_counter()
        self.doing = (index, since)
        try:
            sample = self._next_item() if self.stream else self.dataset[index]
        except AutotuneError:
            raise
        except Exception as exc:
            raise DatasetError(index, exc, stream=self.stream) from exc
        finally:
            self.doing = None
        if self.abandoned:
            raise _AbandonedError
        return sample, since

    def _next_item(self) -> Any:
        """The stream's next item; at its end, the first item of a new pass."""
        for _ in range(2):
            if self._items is None:
                self._items = iter(self.dataset)
            try:
                return next(self._items)
            except StopIteration:
                self._items = None
        raise InvalidConfigError(
            f"the IterableDataset {type(self.dataset).__name__} yielded no items")

    def _time_collate(self, samples: list[Any]) -> float | None:
        """Seconds per sample to collate these samples; ``None`` if they do not collate."""
        calls = 0
        start = time.perf_counter()
        while calls == 0 or time.perf_counter() - start < MIN_TIMED_S / 2:
            self.doing = (None, time.perf_counter())
            try:
                self.collate_fn(samples)
            except Exception:  # ragged samples need the user's collate_fn; cost unknown then
                return None
            finally:
                self.doing = None
            if self.abandoned:
                raise _AbandonedError
            calls += 1
        return (time.perf_counter() - start) / calls / len(samples)

    # --- the caller ---------------------------------------------------------------------

    def result(self) -> WorkloadProfile:
        """The measured profile; measured again in the calling thread if samples are cheap
        (``RETIME_BELOW_S``) and every index has returned in the measuring thread."""
        profile = self.profile
        if profile is None:
            raise AutotuneError("the measuring thread ended without a result")
        cheap = max(profile.sec_per_sample,
                    profile.single_thread_sec_per_sample or 0.0) < RETIME_BELOW_S
        return self._measure() if cheap and self.complete else profile

    def watch(self, timeout_s: float) -> None:
        """Wait for the thread; raise once one call has taken longer than ``timeout_s``."""
        poll = min(POLL_S, timeout_s / 4)
        while not self.done.wait(poll):
            doing = self.doing
            if doing is None:
                continue
            index, since = doing
            waited = time.perf_counter() - since
            if waited <= timeout_s:
                continue
            fix = ("fix the dataset (or pass a larger sample_timeout_s if it is just slow), "
                   "or pass workload=... / measure=False to skip measuring")
            if index is None:
                raise AutotuneError(
                    f"collate_fn did not return within {waited:.1f} s while autotune "
                    f"measured the workload (sample_timeout_s={timeout_s:g}); "
                    f"{fix.replace('the dataset', 'the collate_fn')}")
            raise DatasetError(index, TimeoutError(
                f"did not return within {waited:.1f} s while autotune measured it "
                f"(sample_timeout_s={timeout_s:g}); {fix}"), stream=self.stream) from None

    def abandon(self) -> None:
        """Stop at the thread's next step; undo its thread-pool limits now."""
        self.abandoned = True
        self.capping.close()


def _time_pass(get: Callable[[int], tuple[Any, float]], indices: list[int], deadline: float,
               cpu_clock: Callable[[], float] = time.process_time,
               ) -> tuple[float, float, list[Any], int, list[float]]:
    """(mean wall s, mean CPU s, some of the samples, how many indices were timed, the
    wall seconds of each call in the first sweep).

    Cheap samples are timed over repeated sweeps (at least ``MIN_TIMED_S``), since the
    mean of one sweep's calls would be mostly clock reads; slow ones stop at the deadline.
    """
    kept: list[Any] = []
    walls: list[float] = []
    calls = 0
    wall0, cpu0 = time.perf_counter(), cpu_clock()
    while True:
        for index in indices:
            sample, since = get(index)
            now = time.perf_counter()
            if calls < len(indices):
                walls.append(now - since)
            if len(kept) < min(len(indices), KEEP_SAMPLES):
                kept.append(sample)
            calls += 1
            if now >= deadline:
                break
        wall = time.perf_counter() - wall0
        if wall >= MIN_TIMED_S or time.perf_counter() >= deadline:
            return (wall / calls, (cpu_clock() - cpu0) / calls, kept, min(calls, len(indices)),
                    walls)


@dataclass(frozen=True)
class _ChunkReads:
    warm_up: int | None  # a sample in another chunk: opens the file
    chunks: list[range]  # the chunks the timed run reads


def _spread(read: tuple[float, float], timed: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pass's (wall, CPU) per sample with the chunk reads' share added."""
    return (timed[0] + read[0], timed[1] + read[1], *timed[2:])


def _log_stats(walls: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of ln(wall seconds); ``None`` under two calls."""
    if len(walls) < 2:
        return None, None
    logs = [math.log(max(w, 1e-9)) for w in walls]
    mean = sum(logs) / len(logs)
    var = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
    return mean, math.sqrt(var)


class _SingleThread:
    """Cap native thread pools and torch's to one thread, as a worker would have them.

    The limits are process-wide, so ``close`` (from any thread) undoes them at once and
    keeps a late ``__enter__`` from applying them: the caller restores them when it gives
    up on a measuring thread that may never come back.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._undo: tuple[int, Any, threading.Thread] | None = None
        self._closed = False

    def __enter__(self) -> None:
        import torch
        from threadpoolctl import threadpool_limits

        with self._lock:
            if self._closed:
                return
            threads = torch.get_num_threads()
            limits = threadpool_limits(limits=1)
            torch.set_num_threads(1)
            self._undo = (threads, limits, threading.current_thread())

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._restore()

    def _restore(self) -> None:
        import torch

        with self._lock:
            undo, self._undo = self._undo, None
            if undo is None:
                return
            threads, limits, owner = undo
            elsewhere = threading.current_thread() is not owner
            if elsewhere:  # threadpoolctl lets only the thread that set OpenBLAS's limit
                _release_openblas(force=True)  # change it while that thread lives
            torch.set_num_threads(threads)
            limits.restore_original_limits()
            _release_openblas(force=elsewhere)


def _release_openblas(force: bool) -> None:
    """Let any thread set OpenBLAS's (process-wide) limit again (threadpoolctl >= 3.6)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=force)


def _default_collate() -> Callable[[list[Any]], Any]:
    from torch.utils.data import default_collate

    return default_collate


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
    if dataclasses.is_dataclass(sample) and not isinstance(sample, type):
        return sum(sample_nbytes(getattr(sample, f.name)) for f in dataclasses.fields(sample))
    if hasattr(sample, "getbands") and hasattr(sample, "size"):  # a PIL image
        width, height = sample.size
        return width * height * len(sample.getbands())
    if isinstance(sample, (int, float, bool)) or sample is None:
        return 8
    return sys.getsizeof(sample)
