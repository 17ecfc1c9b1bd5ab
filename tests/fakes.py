"""The one place test fakes live.

``FakeNvml``      an object shaped like the ``pynvml`` module (nvidia-ml-py) for
                  ``read_hardware(nvml=...)``.
``fake_hardware`` a ready ``HardwareInfo`` record for rule/factory tests, no probing.
``FakeGpuClock``  timing events shaped like ``torch.cuda.Event``, on a GPU that runs
                  each step for a set time after the host launched it.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autotune.records import CpuInfo, DistributedInfo, GpuInfo, HardwareInfo, HostInfo, MemoryInfo

GIB = 1 << 30

H100 = dict(name="NVIDIA H100 80GB HBM3", total=80 * GIB, free=79 * GIB, cc=(9, 0),
            pcie_gen=5, pcie_width=16)


# --- NVML -------------------------------------------------------------------------------

class NVMLError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


class NVMLError_LibraryNotFound(NVMLError):  # pynvml's own spelling
    """What ``nvmlInit`` raises where libnvidia-ml.so (the driver) is missing."""


class NVMLError_NotSupported(NVMLError):
    """What a query raises where the GPU or driver does not support it."""


@dataclass(frozen=True)
class FakeMemory:
    """Shaped like ``pynvml.c_nvmlMemory_t``."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeUtilization:
    """Shaped like ``pynvml.c_nvmlUtilization_t``: percent of time busy."""

    gpu: int
    memory: int


class FakeNvml:
    """A fake ``pynvml`` module.

    ``gpus``: one dict per GPU with keys name (str, or bytes like old pynvml), total, free
    (bytes), cc (major, minor), pcie_gen, pcie_width, util (percent busy, default 0, or a
    function of no arguments that returns it, for utilisation that changes over a run),
    uuid (default ``GPU-fake-<index>``); missing keys take the H100 values.
    ``init_error=True``: ``nvmlInit`` raises ``NVMLError_LibraryNotFound`` (no driver).
    ``failing``: names of functions that raise ``NVMLError_NotSupported``, for example
    ``{"nvmlDeviceGetCurrPcieLinkGeneration"}``.
    ``init_calls`` / ``shutdown_calls`` count the calls, to check NVML is closed again.
    """

    def __init__(self, gpus: Sequence[Mapping[str, Any]] = (), *, init_error: bool = False,
                 failing: Iterable[str] = ()) -> None:
        self.gpus = [{**H100, **gpu} for gpu in gpus]
        self.init_error = init_error
        self.failing = frozenset(failing)
        self.init_calls = self.shutdown_calls = 0

    def _check(self, fn: str) -> None:
        if fn in self.failing:
            raise NVMLError_NotSupported(f"{fn}: Not Supported")

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self._check("nvmlInit")

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._check("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(f"Invalid Argument: {index}")
        return index  # a handle: the fake's own index

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> int:
        self._check("nvmlDeviceGetHandleByUUID")
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for index, gpu in enumerate(self.gpus):
            if gpu.get("uuid", f"GPU-fake-{index}") == text:
                return index
        raise NVMLError(f"Not Found: {text}")

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        self._check("nvmlDeviceGetName")
        return self.gpus[handle]["name"]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeMemory:
        self._check("nvmlDeviceGetMemoryInfo")
        gpu = self.gpus[handle]
        return FakeMemory(total=gpu["total"], free=gpu["free"], used=gpu["total"] - gpu["free"])

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        self._check("nvmlDeviceGetCudaComputeCapability")
        return tuple(self.gpus[handle]["cc"])

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: int) -> int:
        self._check("nvmlDeviceGetCurrPcieLinkGeneration")
        return self.gpus[handle]["pcie_gen"]

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: int) -> int:
        self._check("nvmlDeviceGetCurrPcieLinkWidth")
        return self.gpus[handle]["pcie_width"]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> FakeUtilization:
        self._check("nvmlDeviceGetUtilizationRates")
        util = self.gpus[handle].get("util", 0)
        return FakeUtilization(gpu=util() if callable(util) else util, memory=0)


# --- HardwareInfo records -----------------------------------------------------------------

def fake_gpu(index: int = 0, **overrides: Any) -> GpuInfo:
    """A ``GpuInfo`` for an H100 80GB on PCIe 5 x16; keyword overrides per field."""
    fields = dict(index=index, name=H100["name"], memory_total_bytes=H100["total"],
                  memory_free_bytes=H100["free"], compute_capability="9.0",
                  pcie_generation=5, pcie_width=16)
    return GpuInfo(**{**fields, **overrides})


def fake_hardware(*, cpus: int = 2, logical: int | None = None, quota: float | None = None,
                  cpu_model: str | None = "Fake CPU @ 3.00GHz",
                  total_bytes: int | None = 16 * GIB, available_bytes: int | None = None,
                  limit_bytes: int | None = None, shm_total_bytes: int | None = 8 * GIB,
                  shm_free_bytes: int | None = 8 * GIB,
                  gpus: int | Sequence[GpuInfo] = (), accelerator: str | None = None,
                  world_size: int | None = None, local_world_size: int | None = None,
                  rank: int | None = None, local_rank: int | None = None,
                  hostname: str = "testhost", torch: str | None = "2.3.0") -> HardwareInfo:
    """A ``HardwareInfo`` built directly, for tests of what is done with one.

    Defaults: 2 usable CPUs (affinity {0, 1}, no quota), 16 GiB RAM all available, 8 GiB
    /dev/shm free, no GPUs, no accelerator, not under torchrun, host "testhost".
    ``cpus`` is the usable count (``logical`` defaults to it); ``available_bytes`` defaults
    to ``total_bytes``; ``gpus`` is a count of H100s or a sequence of ``GpuInfo``
    (see ``fake_gpu``). Example::

        fake_hardware(cpus=64, shm_free_bytes=64 << 20, accelerator="cuda",
                      local_world_size=4, gpus=4)
    """
    if isinstance(gpus, int):
        gpus = [fake_gpu(i) for i in range(gpus)]
    return HardwareInfo(
        cpu=CpuInfo(logical=logical or cpus, physical=None, affinity=tuple(range(cpus)),
                    quota=quota, usable=cpus, model=cpu_model),
        memory=MemoryInfo(total_bytes=total_bytes, host_available_bytes=total_bytes,
                          limit_bytes=limit_bytes,
                          available_bytes=total_bytes if available_bytes is None
                          else available_bytes,
                          shm_total_bytes=shm_total_bytes, shm_free_bytes=shm_free_bytes),
        gpus=tuple(gpus),
        accelerator=accelerator,
        host=HostInfo(hostname=hostname, os="Linux 6.8.0", python=platform.python_version(),
                      torch=torch),
        distributed=DistributedInfo(world_size=world_size, local_world_size=local_world_size,
                                    rank=rank, local_rank=local_rank),
    )


# --- CUDA timing events -------------------------------------------------------------------

class FakeGpuClock:
    """A GPU that starts each queued step when it is free and runs it ``step_s`` seconds.

    ``event()`` makes an event shaped like ``torch.cuda.Event(enable_timing=True)``:
    ``record()`` queues it (a handed-over batch starts a step, the next request ends it),
    ``query()`` says whether the GPU has reached it by the host's clock, ``elapsed_time``
    is in milliseconds. Events alternate start, end, start, ... as ``DeviceSteps`` records.
    """

    def __init__(self, step_s: float, now: Any = None) -> None:
        import time

        self.step_s = step_s
        self.now = now or time.perf_counter
        self._free_at = 0.0  # when the GPU finishes what is queued
        self._recorded = 0

    def event(self) -> FakeEvent:
        return FakeEvent(self)

    def _record(self) -> float:
        """The GPU time at which this event is reached."""
        self._recorded += 1
        start = max(self.now(), self._free_at)
        if self._recorded % 2 == 1:  # a step starts: the GPU runs it next
            self._free_at = start + self.step_s
            return start
        return max(self.now(), self._free_at)  # the step ends when the GPU is done


class FakeEvent:
    def __init__(self, clock: FakeGpuClock) -> None:
        self.clock = clock
        self.at: float | None = None

    def record(self) -> None:
        self.at = self.clock._record()

    def query(self) -> bool:
        return self.at is not None and self.clock.now() >= self.at

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.at is not None and end.at is not None
        return (end.at - self.at) * 1e3
