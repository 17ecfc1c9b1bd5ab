"""The rule engine: pure functions from (hardware, dataset hints, workload) to settings.

One small function per setting, each returning ``(value, reason)``. Nothing here reads the
system or the dataset; tests feed fake ``HardwareInfo`` and ``WorkloadProfile`` records.

With a measured workload the worker count comes from a small cost model: a worker spends
(its per-sample time + collate + the cost of shipping the batch back) per sample, N workers
run N of those at once, and all of them together cannot use more than the CPU budget. The
count with the shortest predicted epoch (start-up included) wins, the smallest within 5%.

Data that mostly waits is sized with margin, because the misses cost far more than the
extra workers: the wait per sample is the larger of the measured mean and a lognormal fit of
the timed samples (a heavy tail's mean is usually under-measured), and the pool gets up to
``WAIT_HEADROOM`` times the count the model needs (a pool at the model's knee, where the
CPUs start to limit it, delivers less than predicted: waits vary, batches come in bursts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .._check import check_bool, check_int
from ..config import LoaderConfig
from ..records import HardwareInfo, WorkloadProfile

# Costs measured on a 2-CPU AMD EPYC VM, torch 2.13 CPU (bench/RESULTS.md has the runs):
TRANSFER_S_PER_BATCH = 1e-3  # CPU seconds to send one batch from a worker to the main process
TRANSFER_S_PER_BYTE = 1e-9  # ... plus ~1 ms per MB through shared memory
WORKER_START_S = {"fork": 0.03, "forkserver": 0.3, "spawn": 1.5}  # per worker
WORKER_MEMORY_BYTES = 24 << 20  # PSS of one forked torch worker: ~13 MB measured, with margin

MAX_WORKERS = 64  # waiting-bound data may want many more workers than CPUs, up to this
MAX_WORKERS_PER_CPU = 32
SMALL_DATASET = 1024  # without a measurement, fewer samples than this get no workers
STREAM_SAMPLES = 1_000_000  # a stream of unknown length: worker start-up is negligible
ASSUMED_BATCH_SIZE = 32  # for estimates when no batch size is given
ASSUMED_EPOCHS = 10  # persistent workers' start-up is spread over this many epochs
RAM_FRACTION = 0.10  # batches in flight may take this much of available RAM ...
SHM_FRACTION = 0.50  # ... and this much of free /dev/shm
DEFAULT_PREFETCH = 2  # torch's own default
PARALLEL_THRESHOLD = 1.1  # process CPU/wall above this: samples use several threads
NEAR_BEST = 1.05  # the fewest workers whose predicted epoch is within 5% of the best
# Waiting data (bench/RESULTS.md, storage latency with lognormal waits):
WAIT_HEADROOM = 1.5  # workers for data that only waits, as a multiple of the model's count;
                     # less in proportion to the share of time samples compute
TAIL_MIN_WAIT = 0.5  # fit a heavy tail only to samples that wait at least this share of time
TAIL_MAX_FACTOR = 2.0  # the fit may raise the measured mean wait at most this many times


@dataclass(frozen=True, kw_only=True)
class DatasetHints:
    """What the caller tells us about the data and how it will be used.

    Attributes:
        dataset_size: samples per epoch (``len(dataset)``; this rank's share under
            torch.distributed), >= 1; None: a stream of unknown length (estimates assume
            ``STREAM_SAMPLES``). Required.
        batch_size: samples per batch, >= 1; None: ``ASSUMED_BATCH_SIZE`` (32) for estimates.
        has_augmentation, has_standardization: the samples get per-sample transforms;
            without a measurement the rules give them a worker per CPU of the budget.
        training: a training loader (default): persistent workers, full batches only, and
            worker start-up spread over many epochs. False: evaluation, where every sample
            counts, workers are freed between passes, and a profile entry's
            ``persistent_workers`` and ``in_order`` do not apply.
        device: where batches go (``"cuda:0"``): a CUDA device gets pinned memory; None:
            the accelerator torch sees, else the CPU.
        stream: an ``IterableDataset``: items come from ``iter()``, split per worker, so in
            training each worker drops its own partial last batch.
    """

    dataset_size: int | None
    batch_size: int | None = None
    has_augmentation: bool = False
    has_standardization: bool = False
    training: bool = True
    device: str | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        if self.dataset_size is not None:
            check_int("dataset_size", self.dataset_size, minimum=1, hint=" (len(dataset))")
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        for name in ("has_augmentation", "has_standardization", "training", "stream"):
            check_bool(name, getattr(self, name))


def recommend(hw: HardwareInfo, hints: DatasetHints, workload: WorkloadProfile | None = None,
              *, workers: int | None = None) -> LoaderConfig:
    """Every setting for this hardware, data and workload, each with its reason.

    ``workers`` fixes the worker count (a user's or a profile's); the rest follows from it.
    """
    if workers is None:
        workers, why_workers = num_workers(hw, hints, workload)
    else:
        check_int("num_workers", workers, minimum=0)
        why_workers = "fixed by the caller; the other settings follow from it"
    prefetch, why_prefetch = prefetch_factor(hw, hints, workload, workers)
    threads, why_threads = worker_threads(hw, workers, workload)
    pin, why_pin = pin_memory(hw, hints)
    persistent, why_persistent = persistent_workers(hints, workers)
    ahead, why_ahead = prefetch_across_epochs(hints, persistent)
    drop, why_drop = drop_last(hints)
    return LoaderConfig(
        num_workers=workers, prefetch_factor=prefetch, worker_threads=threads,
        pin_memory=pin, persistent_workers=persistent, prefetch_across_epochs=ahead,
        drop_last=drop,
        reasons={
            "num_workers": why_workers, "prefetch_factor": why_prefetch,
            "worker_threads": why_threads, "pin_memory": why_pin,
            "persistent_workers": why_persistent, "prefetch_across_epochs": why_ahead,
            "drop_last": why_drop,
            "multiprocessing_context": "the platform's default start method",
            "timeout": "no timeout: wait for slow samples rather than fail",
            "in_order": "batches in sampler order (reproducible); the autotuner may relax it",
        },
        source="rules",
    )


def num_workers(hw: HardwareInfo, hints: DatasetHints,
                workload: WorkloadProfile | None) -> tuple[int, str]:
    budget = hw.cpu_budget
    batch = hints.batch_size or ASSUMED_BATCH_SIZE
    cap = max_workers(hw, hints, workload)
    if cap == 0:  # only a measured batch that /dev/shm cannot hold gives 0
        assert workload is not None and hw.memory.shm_free_bytes is not None
        return 0, (f"one batch ({_mb(batch * workload.sample_bytes)}) is over "
                   f"{SHM_FRACTION:.0%} of free /dev/shm ({_mb(hw.memory.shm_free_bytes)}): "
                   "workers could die of a bus error, so batches are made in-process")
    if workload is None:
        if hints.dataset_size is not None and hints.dataset_size < SMALL_DATASET:
            return 0, (f"{hints.dataset_size} samples (< {SMALL_DATASET}) and no measurement: "
                       "worker start-up would not pay off")
        if hints.has_augmentation or hints.has_standardization:
            n = min(budget, cap)
            return n, f"per-sample transforms: one worker per CPU of the budget ({budget})"
        n = min(max(1, budget - 1), cap)
        return n, f"CPU budget {budget}, one CPU left for the main process"
    rates = predicted_rates(hw, workload, batch, cap)
    # Persistent (training) workers start once for many epochs; validation's every pass.
    start = WORKER_START_S["fork"] / (ASSUMED_EPOCHS if hints.training else 1)
    size = hints.dataset_size or STREAM_SAMPLES
    epoch = {n: size / rate + n * start for n, rate in rates.items()}
    best = min(epoch.values())
    n = min(k for k, t in epoch.items() if t <= best * NEAR_BEST)
    best_pool = max(rates, key=lambda k: (k > 0, rates[k]))
    wait = 1 - workload.cpu_fraction
    needed = n
    if n > budget:  # waiting-bound: margin above the knee, as much as a worker would wait
        headroom = 1 + (WAIT_HEADROOM - 1) * worker_wait_share(workload)
        n = min(cap, max(n, round(n * headroom)))
    shown = needed if needed else best_pool
    detail = (f"measured {workload.sec_per_sample * 1e3:.3f} ms/sample, {wait:.0%} waiting"
              f"{_tail_note(workload)}; predicted {rates[shown]:,.0f} samples/s with "
              f"{shown} worker(s) vs {rates[0]:,.0f} in-process")
    if n == 0:
        return 0, f"in-process is fastest: moving batches between processes costs more ({detail})"
    if n > budget:
        margin = (f"the cost model's {needed} and {n - needed} more as margin, since waits "
                  "vary and a pool at its predicted limit delivers less" if n > needed else
                  "as many as the cost model needs")
        waits = "mostly wait on I/O" if wait >= 0.5 else f"wait {wait:.0%} of the time"
        return n, f"samples {waits}, so {n} workers > {budget} CPUs: {margin} ({detail})"
    return n, f"{n} worker(s) for a {budget}-CPU budget ({detail})"


def predicted_rates(hw: HardwareInfo, workload: WorkloadProfile, batch_size: int,
                    cap: int) -> dict[int, float]:
    """Samples/s the cost model predicts for 0..cap workers."""
    per_worker, cpu = worker_costs(workload, batch_size)
    in_process = workload.sec_per_sample + (workload.collate_sec_per_sample or 0.0)
    rates = {0: 1 / max(in_process, 1e-9)}
    for n in range(1, cap + 1):
        rates[n] = min(n / per_worker, hw.cpu_budget / cpu)
    return rates


def worker_costs(workload: WorkloadProfile, batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds one sample costs a worker, collating and shipping it included."""
    collate = workload.collate_sec_per_sample or 0.0
    transfer = TRANSFER_S_PER_BATCH / batch_size + workload.sample_bytes * TRANSFER_S_PER_BYTE
    return (_worker_wall_s(workload) + collate + transfer,
            _worker_cpu_s(workload) + collate + transfer)


def _worker_wall_s(workload: WorkloadProfile) -> float:
    """Wall seconds per sample in a single-threaded worker: the capped pass's CPU time plus
    the longest of the waits measured (either pass) or fitted (``_tail_wait_s``).

    Waiting (storage, network) is the same in both passes, and the longer estimate is the
    safer one: heavy-tailed waits make a small sample's mean low more often than high, and
    too few workers for waiting data cost far more than too many.
    """
    cpu, wait = _measured_parts(workload)
    return cpu + max(wait, _tail_wait_s(workload) or 0.0)


def worker_wait_share(workload: WorkloadProfile) -> float:
    """Share of a worker's wall time per sample (``_worker_wall_s``) spent waiting."""
    wall = _worker_wall_s(workload)
    return 1 - min(1.0, _measured_parts(workload)[0] / wall) if wall > 0 else 0.0


def _measured_parts(workload: WorkloadProfile) -> tuple[float, float]:
    """(computing, waiting) seconds per sample in a worker, from the means measured: the
    capped pass's CPU and the longer of the two passes' waits."""
    wall = workload.single_thread_sec_per_sample
    if wall is None:
        wall, cpu = workload.sec_per_sample, workload.cpu_sec_per_sample
    else:
        cpu = workload.single_thread_cpu_sec_per_sample or 0.0
    wait = max(0.0, wall - cpu, workload.sec_per_sample - workload.cpu_sec_per_sample)
    return min(wall, cpu), wait


def _tail_wait_s(workload: WorkloadProfile) -> float | None:
    """Wait per sample by a lognormal fit of the timed samples, for data that mostly waits.

    At most ``TAIL_MAX_FACTOR`` times the measured mean wait: waits that are not lognormal
    (a cache: most samples fast, some slow) can fit a tail far heavier than they have.
    ``None`` without per-sample times, or for data that mostly computes.
    """
    fitted = workload.lognormal_sec_per_sample
    if fitted is None or 1 - workload.cpu_fraction < TAIL_MIN_WAIT:
        return None
    cpu, wait = _measured_parts(workload)
    return max(0.0, min(fitted - cpu, TAIL_MAX_FACTOR * wait))


def _tail_note(workload: WorkloadProfile) -> str:
    """For the reason text: the fitted tail, when it raised the wait workers are sized for."""
    cpu, wait = _measured_parts(workload)
    tail = _tail_wait_s(workload)
    if tail is None or tail <= wait:
        return ""
    return (f"; sized for {(cpu + tail) * 1e3:.3f} ms: the waits fit a heavy tail (lognormal "
            f"sigma {workload.wall_log_std:.2f}) that the mean of {workload.samples} "
            f"samples tends to under-measure")


def _worker_cpu_s(workload: WorkloadProfile) -> float:
    """CPU one sample costs a single-threaded worker (idle pool threads can inflate it)."""
    cpu = workload.single_thread_cpu_sec_per_sample
    if cpu is None:
        cpu = workload.cpu_sec_per_sample
    return min(cpu, _worker_wall_s(workload))


def max_workers(hw: HardwareInfo, hints: DatasetHints,
                workload: WorkloadProfile | None) -> int:
    """Most workers worth starting: per-CPU and absolute caps, batches per epoch, RAM, and
    /dev/shm (0 when one batch per worker would not fit: workers would die of a bus error)."""
    cap = min(MAX_WORKERS, MAX_WORKERS_PER_CPU * hw.cpu_budget)
    batch = hints.batch_size or ASSUMED_BATCH_SIZE
    if hints.dataset_size is not None:
        cap = min(cap, max(1, math.ceil(hints.dataset_size / batch)))
    batch_bytes = batch * workload.sample_bytes if workload is not None else 0
    ranks = ranks_here(hw)
    if hw.memory.available_bytes is not None:
        ram = int(hw.memory.available_bytes * RAM_FRACTION) // ranks
        cap = min(cap, max(1, ram // (WORKER_MEMORY_BYTES + batch_bytes)))
    if hw.memory.shm_free_bytes is not None and batch_bytes:
        cap = min(cap, int(hw.memory.shm_free_bytes * SHM_FRACTION) // ranks // batch_bytes)
    return cap


def ranks_here(hw: HardwareInfo) -> int:
    """Processes torchrun put on this host: they share its RAM and /dev/shm."""
    return hw.distributed.local_world_size or 1


def shm_warning(hw: HardwareInfo, hints: DatasetHints, workload: WorkloadProfile | None,
                *, workers: int | None = None) -> str | None:
    """Why a small /dev/shm lowered the settings, with the fix; None when it did not."""
    if workload is None or hw.memory.shm_free_bytes is None:
        return None
    roomy = dataclasses.replace(hw, memory=dataclasses.replace(hw.memory, shm_free_bytes=None))
    got = recommend(hw, hints, workload, workers=workers)
    want = recommend(roomy, hints, workload, workers=workers)
    if (got.num_workers, got.prefetch_factor) == (want.num_workers, want.prefetch_factor):
        return None
    return (f"/dev/shm has only {_mb(hw.memory.shm_free_bytes)} free, so batches in flight "
            f"were cut to {got.num_workers} worker(s) x prefetch {got.prefetch_factor or 0} "
            f"(with room: {want.num_workers} x {want.prefetch_factor}). Give the container more "
            "shared memory: `docker run --shm-size=8g ...` or `--ipc=host` (Kubernetes: an "
            "emptyDir with medium: Memory mounted at /dev/shm)")


def memory_budget_bytes(hw: HardwareInfo) -> int | None:
    """Bytes that this rank's batches in flight may take: a fraction of RAM and of free
    /dev/shm, shared among the ranks on this host."""
    limits = []
    if hw.memory.available_bytes is not None:
        limits.append(int(hw.memory.available_bytes * RAM_FRACTION) // ranks_here(hw))
    if hw.memory.shm_free_bytes is not None:
        limits.append(int(hw.memory.shm_free_bytes * SHM_FRACTION) // ranks_here(hw))
    return min(limits) if limits else None


def prefetch_factor(hw: HardwareInfo, hints: DatasetHints, workload: WorkloadProfile | None,
                    workers: int) -> tuple[int | None, str]:
    if workers == 0:
        return None, "no workers, nothing to prefetch"
    room = memory_budget_bytes(hw)
    if workload is None or room is None:
        return DEFAULT_PREFETCH, ("torch's default; batch size in bytes unknown without a "
                                  "measurement")
    batch_bytes = max(1, workload.sample_bytes * (hints.batch_size or ASSUMED_BATCH_SIZE))
    fits = room // (workers * batch_bytes)
    if fits >= DEFAULT_PREFETCH:
        return DEFAULT_PREFETCH, (f"torch's default; {workers} x {DEFAULT_PREFETCH} batches of "
                                  f"{_mb(batch_bytes)} fit the in-flight budget {_mb(room)}")
    return 1, (f"lowered: {workers} x {DEFAULT_PREFETCH} batches of {_mb(batch_bytes)} exceed "
               f"the in-flight budget {_mb(room)} ({RAM_FRACTION:.0%} of available RAM, "
               f"{SHM_FRACTION:.0%} of free /dev/shm)")


def worker_threads(hw: HardwareInfo, workers: int,
                   workload: WorkloadProfile | None = None) -> tuple[int | None, str]:
    if workers == 0:
        return None, "no workers: the main process keeps its thread pools"
    if workload is not None and workload.parallelism <= PARALLEL_THRESHOLD:
        return None, ("measured samples run on one thread: no native pool to cap "
                      "(torch already runs workers with 1 intra-op thread)")
    threads = max(1, hw.cpu_budget // (workers + 1))
    return threads, (f"({workers} workers + the main process) x {threads} thread(s) fit "
                     f"{hw.cpu_budget} CPUs: BLAS pools would otherwise oversubscribe them")


def pin_memory(hw: HardwareInfo, hints: DatasetHints) -> tuple[bool, str]:
    device = hints.device or hw.accelerator or "cpu"
    if device.startswith("cuda"):
        return True, "batches go to a CUDA device: page-locked memory speeds the copy"
    return False, f"batches stay on {device}: pinning would only cost time"


def persistent_workers(hints: DatasetHints, workers: int) -> tuple[bool, str]:
    if workers == 0:
        return False, "no workers"
    if hints.training:
        return True, "training runs many epochs: start workers once, not every epoch"
    return False, "validation: workers are freed between passes rather than held idle"


def prefetch_across_epochs(hints: DatasetHints, persistent: bool) -> tuple[bool, str]:
    """torch starts an epoch's batches only at ``iter()``: every worker idles at the
    boundary, then each needs a whole batch before the first one arrives."""
    if hints.stream:
        return False, "a stream keeps its own epochs (its __iter__ decides where one ends)"
    if not persistent:
        return False, "no persistent workers: nothing runs from one epoch into the next"
    return True, ("the next epoch's first batches are made while this epoch's last ones are "
                  "used: no stop at the epoch boundary")


def across_epochs_needs(config: LoaderConfig) -> str | None:
    """What ``config`` lacks for ``prefetch_across_epochs`` (None: nothing)."""
    if config.num_workers == 0 or not config.persistent_workers:
        return "off: it needs persistent workers (num_workers > 0, persistent_workers=True)"
    if not config.in_order:
        return "off: with in_order=False the batches of two epochs could mix"
    return None


def drop_last(hints: DatasetHints) -> tuple[bool, str]:
    if hints.training and hints.stream:
        return True, ("training: every step sees a full batch (a stream: each worker drops "
                      "its own partial last batch, up to batch_size - 1 items per worker and "
                      "epoch; drop_last=False keeps them)")
    if hints.training:
        return True, "training: every step sees a full batch"
    return False, "evaluation: every sample counts"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f} MB"
