"""Records of what was read or measured: the machine, a workload, a trial.

Frozen, keyword-only dataclasses with ``to_dict``/``from_dict``, importing no code that
reads the system or builds a loader, so that the pure decisions (``policy/``) and the
results can use them from the ground floor. ``None`` is unknown or absent (no limit, not
measured), never 0 or -1.
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

    Attributes:
        logical: logical CPUs the host has (``os.cpu_count()``, else the processors in
            /proc/cpuinfo), whether or not this process may use them; None when unknown.
        physical: physical cores (distinct core ids in /proc/cpuinfo, else psutil's count);
            None when unknown.
        affinity: ids of the CPUs this process may run on (``os.sched_getaffinity``),
            sorted; None where the platform does not say.
        quota: the cgroup CPU quota in CPUs (quota / period, e.g. 1.5), the tightest on the
            cgroup's path, v1 or v2; None when there is no quota.
        usable: CPUs this process can keep busy: the affinity set's size (``logical``
            without one) capped by the quota, rounded down, at least 1.
            ``HardwareInfo.cpu_budget`` shares it among the ranks torchrun runs here.
        model: the CPU's model name from /proc/cpuinfo; None when it names none (or there
            is no /proc/cpuinfo: not Linux).
    """

    logical: int | None
    physical: int | None
    affinity: tuple[int, ...] | None
    quota: float | None
    usable: int
    model: str | None


@dataclass(frozen=True, kw_only=True)
class MemoryInfo:
    """RAM and /dev/shm in bytes. ``available_bytes`` is the smaller of host and cgroup.

    Attributes:
        total_bytes: the host's RAM (``MemTotal`` in /proc/meminfo), not capped by a
            cgroup limit; None when unknown.
        host_available_bytes: the kernel's estimate of RAM it can give without swapping
            (``MemAvailable``); None when unknown.
        limit_bytes: the cgroup memory limit, the tightest on the cgroup's path; None when
            there is none (or it cannot be read).
        available_bytes: what this process may still take: the smaller of
            ``host_available_bytes`` and the cgroup's headroom (limit minus usage, not
            counting reclaimable inactive file pages); None when neither is known. The rules
            size batches in flight and caches from it.
        shm_total_bytes, shm_free_bytes: size and free space of /dev/shm, through which
            worker processes hand batches to the main process; None when it is missing.
    """

    total_bytes: int | None
    host_available_bytes: int | None
    limit_bytes: int | None
    available_bytes: int | None
    shm_total_bytes: int | None
    shm_free_bytes: int | None


@dataclass(frozen=True, kw_only=True)
class GpuInfo:
    """One GPU as NVML reports it; a field NVML could not read is None.

    Attributes:
        index: NVML's index of the device. It need not be torch's ``cuda:N``: NVML lists
            every GPU, whatever ``CUDA_VISIBLE_DEVICES`` says.
        name: the product name, e.g. ``"NVIDIA H100 80GB HBM3"``.
        memory_total_bytes, memory_free_bytes: the device's memory in bytes, and how much
            of it was free when it was probed.
        compute_capability: ``"major.minor"``, e.g. ``"9.0"``.
        pcie_generation: the PCIe link's current generation, which an idle GPU may lower
            to save power.
        pcie_width: the PCIe link's current width in lanes, e.g. 16.
    """

    index: int
    name: str | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    compute_capability: str | None
    pcie_generation: int | None
    pcie_width: int | None


@dataclass(frozen=True, kw_only=True)
class DistributedInfo:
    """The torchrun variables; ``None`` where unset.

    A value that is not a non-negative integer counts as unset.

    Attributes:
        world_size: processes in the whole job (``WORLD_SIZE``).
        local_world_size: processes on this host (``LOCAL_WORLD_SIZE``); they share its
            CPUs, RAM and /dev/shm, so the rules divide those among them.
        rank: this process's rank in the job (``RANK``).
        local_rank: this process's rank on this host (``LOCAL_RANK``).
    """

    world_size: int | None = None
    local_world_size: int | None = None
    rank: int | None = None
    local_rank: int | None = None


@dataclass(frozen=True, kw_only=True)
class HostInfo:
    """The host and the software versions, recorded with a profile.

    Attributes:
        hostname: ``socket.gethostname()``; profiles are saved and looked up under it.
        os: system and kernel release, e.g. ``"Linux 6.8.0-45-generic"``.
        python: the Python version, e.g. ``"3.12.3"``.
        torch: ``torch.__version__``; None when torch cannot be imported.
    """

    hostname: str
    os: str
    python: str
    torch: str | None


@dataclass(frozen=True, kw_only=True)
class HardwareInfo:
    """What this process may use, as ``probe_hardware`` read it; unknown facts are None.

    Attributes:
        cpu: the CPUs (``CpuInfo``).
        memory: RAM and /dev/shm (``MemoryInfo``).
        gpus: the GPUs NVML lists, by NVML index; () when NVML, its library or the driver
            is missing, or there is no GPU.
        accelerator: what torch can compute on: ``"cuda"``, ``"mps"``, or None for the CPU
            alone (or no torch). Where batches go unless the caller says: pinned memory
            only pays for ``"cuda"``.
        host: hostname and versions (``HostInfo``).
        distributed: the torchrun variables (``DistributedInfo``); all None outside torchrun.
    """

    cpu: CpuInfo
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...] = ()
    accelerator: str | None = None
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
    """What loading one sample costs, as ``measure_workload`` timed it in this process.

    Two passes: one with native thread pools (BLAS, OpenMP, torch) capped at one thread, as
    a worker process has them, and one with them as this process has them. The optional
    fields are None when not measured (a profile written by hand).

    Attributes:
        samples: how many samples were timed, both passes together (an index timed over
            repeated sweeps counts once).
        sec_per_sample: mean wall seconds per ``dataset[i]`` (a stream's ``next()``) in this
            process, thread pools as they are; the capped pass's when time ran out before
            this one.
        cpu_sec_per_sample: CPU seconds of this process (all its threads) per sample, in the
            same pass as ``sec_per_sample``.
        sample_bytes: mean size in bytes of one sample's tensors, arrays, bytes or images,
            over up to 16 of the timed samples.
        single_thread_sec_per_sample: mean wall seconds per sample, thread pools capped at
            one thread: what a worker will see.
        single_thread_cpu_sec_per_sample: CPU seconds per sample of the calling thread only,
            in the capped pass, so that idle pool threads that spin-wait do not count.
        collate_sec_per_sample: seconds per sample that ``collate_fn`` (``default_collate``
            unless given) takes to batch the kept samples; also None when they do not
            collate (ragged samples that need the user's ``collate_fn``).
        wall_log_mean, wall_log_std: mean and standard deviation of ln(wall seconds) of
            the individually timed calls: a lognormal fit that shows a heavy tail (storage
            latency) the mean may have missed; None when fewer than two calls were timed.
    """

    samples: int
    sec_per_sample: float
    cpu_sec_per_sample: float
    sample_bytes: int
    single_thread_sec_per_sample: float | None = None
    single_thread_cpu_sec_per_sample: float | None = None
    collate_sec_per_sample: float | None = None
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
    """What one configuration did.

    A failed trial has ``error`` set and no timings; it may still have its peak memory.
    Under torchrun every rank runs the trial at once and the record combines them: the
    slowest rank's timings, the busiest host's memory and CPU summed over its ranks.

    Attributes:
        config: the settings measured: a ``LoaderConfig``, or for a group
            (``run_group_trial``) a ``GroupConfig`` with each member's.
        phase: which step of the search asked for it: baseline, rules, ladder, refine,
            threads, prefetch, in_order, pin, recheck, confirm (a group's: baseline,
            rules, alone, scale, grow, trim).
        samples_per_s: samples per second over the counted window, after start-up and the
            prefetch burst (a group's: all its loaders together); None when it failed.
        first_batch_s: seconds from ``iter(loader)`` to the first batch, worker start-up
            included.
        peak_memory_bytes: peak PSS in bytes of this process and its children (the
            workers), sampled every 0.25 s while the trial ran, so shared pages count once.
        cpu_percent: CPU use over the window in percent of one CPU, main process plus
            workers (200 is two CPUs busy).
        stall_fraction: share of the window (0-1) spent waiting for data; None without a
            consumer (a training step), since without one the loop only waits.
        window_s: wall seconds the samples were counted over; up to 3 times the window
            asked for when rounds of workers, consumer steps or a stream's whole epochs
            needed longer.
        error: why it failed, on one line; None when it succeeded (``ok``).
        epoch_samples: a stream's samples in its first epoch, if the trial saw it end;
            None otherwise and for a map-style dataset.
        samples_drawn: a stream's samples drawn in all since the loader started, warm-up
            included, so later trials know how long an epoch end may take; None for a
            map-style dataset.
    """

    config: LoaderConfig | GroupConfig
    phase: str
    samples_per_s: float | None = None
    first_batch_s: float | None = None
    peak_memory_bytes: int | None = None
    cpu_percent: float | None = None
    stall_fraction: float | None = None
    window_s: float | None = None
    error: str | None = None
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
