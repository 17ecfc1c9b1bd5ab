"""Records of what was read or measured: the machine, a workload, a trial.

Frozen, keyword-only dataclasses with ``to_dict``/``from_dict``, importing no code that
reads the system or builds a loader, so that the pure decisions (``policy/``) and the
results can use them from the ground floor. ``None`` is unknown, never 0 or -1.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import GroupConfig, LoaderConfig

GIB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class CpuInfo:
    """CPUs. ``usable`` = the affinity set capped by the cgroup quota, rounded down, >= 1.

    Rounding down: a quota of 1.5 CPUs gives 1 usable, since a second busy thread would
    be throttled for part of every period.
    """

    logical: int | None
    physical: int | None
    affinity: tuple[int, ...] | None
    quota: float | None
    usable: int
    model: str | None


@dataclass(frozen=True, kw_only=True)
class MemoryInfo:
    """RAM and /dev/shm in bytes. ``available_bytes`` is the smaller of host and cgroup."""

    total_bytes: int | None
    host_available_bytes: int | None
    limit_bytes: int | None  # cgroup memory limit; None when there is none
    available_bytes: int | None
    shm_total_bytes: int | None
    shm_free_bytes: int | None


@dataclass(frozen=True, kw_only=True)
class GpuInfo:
    index: int
    name: str | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    compute_capability: str | None
    pcie_generation: int | None
    pcie_width: int | None


@dataclass(frozen=True, kw_only=True)
class DistributedInfo:
    """The torchrun variables; ``None`` where unset."""

    world_size: int | None = None
    local_world_size: int | None = None
    rank: int | None = None
    local_rank: int | None = None


@dataclass(frozen=True, kw_only=True)
class HostInfo:
    hostname: str
    os: str
    python: str
    torch: str | None


@dataclass(frozen=True, kw_only=True)
class HardwareInfo:
    cpu: CpuInfo
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...] = ()
    accelerator: str | None = None  # "cuda", "mps" or None: what torch can compute on
    host: HostInfo
    distributed: DistributedInfo = field(default_factory=DistributedInfo)

    @property
    def cpu_budget(self) -> int:
        """CPUs for this process: usable CPUs shared among the processes torchrun put here."""
        return max(1, self.cpu.usable // (self.distributed.local_world_size or 1))

    @property
    def fingerprint(self) -> str:
        """Stable id of the hardware a profile was tuned on (not of the hostname)."""
        total = self.memory.total_bytes
        if total is not None and self.memory.limit_bytes is not None:
            total = min(total, self.memory.limit_bytes)
        facts = {
            "cpu_model": self.cpu.model,
            "cpus": self.cpu.usable,
            "memory_gib": None if total is None else round(total / GIB),
            "gpus": [gpu.name for gpu in self.gpus],
        }
        return hashlib.sha256(repr(sorted(facts.items())).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``autotune probe --json`` prints)."""
        data = asdict(self)
        data["cpu"]["affinity"] = list(self.cpu.affinity) if self.cpu.affinity else None
        data["gpus"] = [asdict(gpu) for gpu in self.gpus]
        data["cpu_budget"] = self.cpu_budget
        data["fingerprint"] = self.fingerprint
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HardwareInfo:
        cpu = dict(data["cpu"])
        cpu["affinity"] = tuple(cpu["affinity"]) if cpu.get("affinity") else None
        return cls(
            cpu=CpuInfo(**cpu),
            memory=MemoryInfo(**data["memory"]),
            gpus=tuple(GpuInfo(**gpu) for gpu in data.get("gpus") or ()),
            accelerator=data.get("accelerator"),
            host=HostInfo(**data["host"]),
            distributed=DistributedInfo(**(data.get("distributed") or {})),
        )


@dataclass(frozen=True, kw_only=True)
class WorkloadProfile:
    samples: int  # how many samples were timed
    sec_per_sample: float  # wall seconds per __getitem__ in this process
    cpu_sec_per_sample: float  # CPU seconds of this process (all its threads) per sample
    sample_bytes: int  # mean size of one sample's tensors/arrays/bytes
    single_thread_sec_per_sample: float | None = None  # wall, thread pools capped at 1
    single_thread_cpu_sec_per_sample: float | None = None  # the calling thread's CPU only
    collate_sec_per_sample: float | None = None  # default_collate cost, per sample
    # mean and standard deviation of ln(wall seconds) of the individually timed samples:
    # a lognormal fit that shows a heavy tail (storage latency) the mean may have missed
    wall_log_mean: float | None = None
    wall_log_std: float | None = None

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
    def lognormal_sec_per_sample(self) -> float | None:
        """Mean wall seconds per sample of a lognormal fitted to the timed samples.

        ``exp(mu + sigma^2 / 2)``: with a heavy tail (sigma >= 1) a sample of 64-128 calls
        usually misses the rare slow ones, and its plain mean is low more often than high.
        ``None`` when fewer than two samples were timed one by one.
        """
        if self.wall_log_mean is None or self.wall_log_std is None:
            return None
        return math.exp(self.wall_log_mean + self.wall_log_std ** 2 / 2)

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


@dataclass(frozen=True, kw_only=True)
class Trial:
    """What one configuration did."""

    config: LoaderConfig | GroupConfig  # a group's (``run_group_trial``): each member's
    phase: str  # which step of the search asked for it: baseline, rules, ladder, ...
    samples_per_s: float | None = None
    first_batch_s: float | None = None
    peak_memory_bytes: int | None = None
    cpu_percent: float | None = None  # of one CPU, main process plus workers
    stall_fraction: float | None = None  # of the window spent waiting for data
    window_s: float | None = None
    error: str | None = None
    # a stream's: samples in its first epoch if the trial saw it end; samples drawn in all
    epoch_samples: int | None = None
    samples_drawn: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.config.settings(), "phase": self.phase,
                "samples_per_s": self.samples_per_s, "first_batch_s": self.first_batch_s,
                "peak_memory_bytes": self.peak_memory_bytes, "cpu_percent": self.cpu_percent,
                "stall_fraction": self.stall_fraction, "window_s": self.window_s,
                "error": self.error, "epoch_samples": self.epoch_samples,
                "samples_drawn": self.samples_drawn}
