"""What this process may really use: CPUs, memory, /dev/shm, GPUs, host and torchrun context.

The only module that reads the system. Every fact is a frozen record; an unknown fact is
``None``, never 0 or -1, and nothing here raises for a missing file, driver or library.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from collections.abc import Callable, Mapping
from typing import Any

from ..records import CpuInfo, DistributedInfo, GpuInfo, HardwareInfo, HostInfo, MemoryInfo
from . import _parse as parse

log = logging.getLogger(__name__)

_cached: HardwareInfo | None = None


def probe_hardware(*, refresh: bool = False) -> HardwareInfo:
    """Read this machine once per process; ``refresh=True`` reads it again.

    Never raises for a missing file, driver or library: a fact it cannot read is None.

    Args:
        refresh: read the machine again instead of returning the reading cached by the
            first call, e.g. after free memory, /dev/shm or the cgroup limits changed.

    Returns:
        The ``HardwareInfo``; the same object on every call until a refresh replaces it.
    """
    global _cached
    if _cached is None or refresh:
        _cached = read_hardware()
    return _cached


def read_hardware(root: str = "/", *, env: Mapping[str, str] | None = None,
                  affinity: set[int] | None = None, nvml: Any = None,
                  torch_accelerator: Callable[[], str | None] | None = None) -> HardwareInfo:
    """Read every fact. Tests pass a root of canned files, an env, an affinity and a fake NVML."""
    files = SystemFiles(root)
    real = root == "/"
    if affinity is None and real and hasattr(os, "sched_getaffinity"):
        affinity = os.sched_getaffinity(0)
    return HardwareInfo(
        cpu=_read_cpu(files, affinity, real),
        memory=_read_memory(files),
        gpus=_read_gpus(nvml if nvml is not None else _load_nvml() if real else None),
        accelerator=(torch_accelerator or (_torch_accelerator if real else lambda: None))(),
        host=_read_host(),
        distributed=_read_distributed(os.environ if env is None else env),
    )


class SystemFiles:
    """Reads files under a root; missing or unreadable is ``None``."""

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def read(self, path: str) -> str | None:
        try:
            with open(self.path(path), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def statvfs(self, path: str) -> tuple[int, int] | None:
        """(total, free) bytes of the filesystem at path."""
        try:
            st = os.statvfs(self.path(path))
        except OSError:
            return None
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def first_in(self, dirs: list[str], name: str,
                 parse_fn: Callable[[str | None], Any]) -> list[Any]:
        """``parse_fn`` over ``name`` in every dir that has it, innermost first."""
        values = (parse_fn(self.read(f"{d}/{name}")) for d in dirs)
        return [v for v in values if v is not None]


def _cgroup_dirs(files: SystemFiles, controller: str) -> list[str]:
    return parse.cgroup_dirs(
        controller,
        parse.parse_proc_cgroup(files.read("/proc/self/cgroup")),
        parse.parse_cgroup_mounts(files.read("/proc/self/mountinfo")),
    )


def _read_cpu(files: SystemFiles, affinity: set[int] | None, real: bool) -> CpuInfo:
    logical, physical, model = parse.parse_cpuinfo(files.read("/proc/cpuinfo"))
    if real:
        logical = os.cpu_count() or logical
        physical = physical or _psutil_physical()
    dirs = _cgroup_dirs(files, "cpu")
    quotas = files.first_in(dirs, "cpu.max", parse.parse_cpu_max) + [
        q for d in dirs
        if (q := parse.parse_cfs_quota(files.read(f"{d}/cpu.cfs_quota_us"),
                                       files.read(f"{d}/cpu.cfs_period_us"))) is not None
    ]
    quota = min(quotas) if quotas else None
    usable = len(affinity) if affinity else (logical or 1)
    if quota is not None:
        usable = min(usable, int(quota))
    return CpuInfo(logical=logical, physical=physical,
                   affinity=tuple(sorted(affinity)) if affinity else None,
                   quota=quota, usable=max(1, usable), model=model)


def _psutil_physical() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # psutil can fail on exotic kernels; unknown is fine
        return None


def _read_memory(files: SystemFiles) -> MemoryInfo:
    info = parse.parse_meminfo(files.read("/proc/meminfo"))
    total, host_available = info.get("MemTotal"), info.get("MemAvailable")
    limits, cgroup_free = [], []
    for d in _cgroup_dirs(files, "memory"):  # every limit on the path binds; the tightest wins
        limit = parse.parse_memory_limit(files.read(f"{d}/memory.max")
                                         or files.read(f"{d}/memory.limit_in_bytes"))
        if limit is None:
            continue
        limits.append(limit)
        usage = parse.parse_int(files.read(f"{d}/memory.current")
                                or files.read(f"{d}/memory.usage_in_bytes"))
        stat = parse.parse_keyed_ints(files.read(f"{d}/memory.stat"))
        # v1's usage covers child cgroups, and so does total_inactive_file (inactive_file
        # is this cgroup's own pages only); v2 has just inactive_file, hierarchical.
        reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0))
        if usage is not None:
            cgroup_free.append(max(0, limit - max(0, usage - reclaimable)))
    limit = min(limits) if limits else None
    cgroup_available = min(cgroup_free) if cgroup_free else None
    known = [v for v in (host_available, cgroup_available) if v is not None]
    shm = files.statvfs("/dev/shm")
    return MemoryInfo(
        total_bytes=total, host_available_bytes=host_available, limit_bytes=limit,
        available_bytes=min(known) if known else None,
        shm_total_bytes=shm[0] if shm else None, shm_free_bytes=shm[1] if shm else None,
    )


def _load_nvml() -> Any:
    try:
        import pynvml  # provided by nvidia-ml-py

        return pynvml
    except Exception:
        return None


def _read_gpus(nvml: Any) -> tuple[GpuInfo, ...]:
    """GPUs through NVML; () when NVML, its library or the driver is missing."""
    if nvml is None:
        return ()
    try:
        nvml.nvmlInit()
    except Exception as exc:
        log.debug("NVML unavailable: %s", exc)
        return ()
    try:
        return tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
    except Exception as exc:
        log.debug("NVML device query failed: %s", exc)
        return ()
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def _read_gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def ask(fn: str, *args: Any) -> Any:
        try:
            return getattr(nvml, fn)(handle, *args)
        except Exception:
            return None

    name = ask("nvmlDeviceGetName")
    memory = ask("nvmlDeviceGetMemoryInfo")
    capability = ask("nvmlDeviceGetCudaComputeCapability")
    return GpuInfo(
        index=index,
        name=name.decode() if isinstance(name, bytes) else name,
        memory_total_bytes=getattr(memory, "total", None),
        memory_free_bytes=getattr(memory, "free", None),
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        pcie_generation=ask("nvmlDeviceGetCurrPcieLinkGeneration"),
        pcie_width=ask("nvmlDeviceGetCurrPcieLinkWidth"),
    )


def _torch_accelerator() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
    except Exception as exc:
        log.debug("torch accelerator check failed: %s", exc)
    return None


def _read_host() -> HostInfo:
    try:
        import torch

        torch_version: str | None = str(torch.__version__)
    except Exception:
        torch_version = None
    return HostInfo(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        torch=torch_version,
    )


def _read_distributed(env: Mapping[str, str]) -> DistributedInfo:
    def number(name: str) -> int | None:
        value = env.get(name, "").strip()
        return int(value) if value.isdigit() else None

    return DistributedInfo(
        world_size=number("WORLD_SIZE"), local_world_size=number("LOCAL_WORLD_SIZE"),
        rank=number("RANK"), local_rank=number("LOCAL_RANK"),
    )


