"""What a running job uses: CPU seconds and memory of this process's workers, GPU utilisation.

The trials and the stall monitor read these; reading the machine happens here only. Worker
processes are this process's children: their CPU time counts whether they are alive or
already reaped (a loader without persistent workers starts new ones every epoch), and
their memory is their PSS, so pages shared with the parent count once.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from .cuda import cuda_uuid

MEMORY_SAMPLE_S = 0.25
GPU_SAMPLE_S = 0.5  # NVML's own reading covers its last sample period (1/6 s to 1 s)
GPU_SAMPLES = 100_000  # readings kept: ~14 hours at GPU_SAMPLE_S


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's child processes: the reaped ones (which
    the kernel adds to the parent's ``children_*`` times) plus the live ones."""
    me = psutil.Process()
    times = me.cpu_times()
    total = times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # gone between listing and reading
            pass
    return total


def process_memory_bytes(*, children_only: bool = False) -> int:
    """PSS (RSS where PSS is unknown) of this process and its children, or the children only."""
    me = psutil.Process()
    total = 0
    for proc in me.children(recursive=True) + ([] if children_only else [me]):
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return total


class CpuClock:
    """CPU seconds of this process and its children (the workers) over a span."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.wall = time.perf_counter()
        self.cpu = self._total()

    def _total(self) -> float:
        return sum(self.me.cpu_times()[:2]) + children_cpu_seconds()

    def percent(self) -> float:
        return 100 * (self._total() - self.cpu) / max(1e-9, time.perf_counter() - self.wall)


class PeakMemory:
    """Samples the PSS of this process and its children until stopped; keeps the peak."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autotune-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak or 0, process_memory_bytes())
            if self._stop.wait(MEMORY_SAMPLE_S):
                return


class GpuUtilization:
    """NVML's utilisation (percent of time a kernel ran) of one GPU; ``read()`` is None where
    NVML, its driver or the GPU is missing. NVML stays initialised until ``close()``."""

    def __init__(self, index: int = 0, *, nvml: Any = None,
                 uuid: Callable[[int], str | None] | None = None) -> None:
        from .hardware import _load_nvml

        self._nvml = nvml if nvml is not None else _load_nvml()
        self._handle: Any = None
        if self._nvml is None:
            return
        try:
            self._nvml.nvmlInit()
            self._handle = _handle(self._nvml, index, (uuid or cuda_uuid)(index))
        except Exception:
            self._handle = None

    def read(self) -> float | None:
        if self._handle is None:
            return None
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except Exception:
            return None

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def _handle(nvml: Any, index: int, uuid: str | None) -> Any:
    """NVML's handle of torch's CUDA device ``index``: by its UUID (NVML counts every GPU of
    the machine, torch only those ``CUDA_VISIBLE_DEVICES`` shows), by the index without one."""
    if uuid is not None:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception:  # an NVML without the call, or a UUID it does not know
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


class GpuSampler:
    """GPU utilisation read every ``every_s`` seconds by a background thread while a loop
    runs: one reading is whatever the GPU did in NVML's last sample period (0% or 100% by
    chance in a step-by-step loop); many over the run give its mean and median. A thread
    that wakes twice a second costs the loop nothing measurable."""

    def __init__(self, index: int = 0, *, every_s: float | None = None, nvml: Any = None
                 ) -> None:
        self.every_s = GPU_SAMPLE_S if every_s is None else every_s
        self._gpu = GpuUtilization(index, nvml=nvml)
        self._samples: collections.deque[float] = collections.deque(maxlen=GPU_SAMPLES)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """One reading now, then one every ``every_s`` until ``stop()``."""
        if self._thread is not None or not self._read():
            return
        self._thread = threading.Thread(target=self._run, name="autotune-gpu", daemon=True)
        self._thread.start()

    def samples(self) -> list[float]:
        return list(self._samples)

    def clear(self) -> None:
        self._samples.clear()

    def stop(self) -> None:
        """Stop reading and release NVML (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._gpu.close()

    def _read(self) -> bool:
        busy = self._gpu.read()
        if busy is not None:
            self._samples.append(busy)
        return busy is not None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._read()
