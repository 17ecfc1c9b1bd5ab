"""One machine for several loaders in one loop (``factory.create_training_loaders``).

Loader i hands out a share ``p_i`` of the loop's batches; one of its batches costs a worker
``c_i`` wall seconds and the machine ``u_i`` CPU seconds (the rules' cost model,
``rules.worker_costs``). Together they can go no faster than the CPUs allow,
``r = cpu_budget / sum(p_i * u_i)`` batches/s, nor faster than a loader's worker cap allows
(``cap_i / (p_i * c_i)``). Each loader gets the workers that supply its share at that rate,
``p_i * r * c_i`` (at the lean end of ``NEAR_BEST``, with the rules' margin for data that
waits), never more than the rules give it alone. Sized alone, a loader whose samples wait on
storage is sized for the rate it could reach with the whole machine; next to a CPU-bound
loader the loop never asks that much of it.

Native thread pools (BLAS) are budgeted over all the loaders' workers at once, so that
together they fit the CPUs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import LoaderConfig
from ..records import HardwareInfo, WorkloadProfile
from . import rules

RUN_ODDS = 0.01  # prefetch covers runs of one loader's batches longer only this often


@dataclass(frozen=True, kw_only=True)
class Member:
    """One loader of the group, as the joint split sees it."""

    name: str
    hints: rules.DatasetHints
    workload: WorkloadProfile | None
    share: float  # of the loop's batches, 0 < share <= 1
    alone: int  # the workers the rules give it alone


@dataclass(frozen=True, kw_only=True)
class Split:
    """The workers one member gets, and why."""

    workers: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Share:
    """One member's part of the machine: its split among all the members' splits."""

    member: Member
    splits: Mapping[str, Split]
    strategy: str


def shared(hw: HardwareInfo, share: Share, config: LoaderConfig) -> LoaderConfig:
    """``config`` with this member's share: workers, native threads, a prefetch deep enough
    for the runs of its batches that the strategy asks for, within the part of the
    in-flight memory budget its batches may take (``resolve`` applies explicit keywords after)."""
    member, splits = share.member, share.splits
    split = splits[member.name]
    workers = split.workers
    total = sum(s.workers for s in splits.values())
    config = config.replace(reason=split.reason, num_workers=workers)
    memory = _memory_share(hw, workers / max(1, total))
    prefetch = rules.prefetch_factor(memory, member.hints, member.workload, workers)
    deeper = prefetch_for_bursts(memory, member, workers, burst(member.share, share.strategy),
                                 prefetch[0])
    if deeper[0] is not None:
        prefetch = (deeper[0], deeper[1] or "")
    native = member.workload is not None and workers > 0 \
        and member.workload.parallelism > rules.PARALLEL_THRESHOLD
    threads = (thread_budget(hw, total) if native
               else rules.worker_threads(hw, workers, member.workload))
    persistent = rules.persistent_workers(member.hints, workers)
    return (config.replace(reason=prefetch[1], prefetch_factor=prefetch[0])
            .replace(reason=threads[1], worker_threads=threads[0])
            .replace(reason=persistent[1], persistent_workers=persistent[0]))


def _memory_share(hw: HardwareInfo, part: float) -> HardwareInfo:
    """The machine with only this part of RAM and /dev/shm (by workers, as batches in
    flight grow with them)."""
    memory = hw.memory

    def scaled(value: int | None) -> int | None:
        return None if value is None else int(value * part)

    return dataclasses.replace(hw, memory=dataclasses.replace(
        memory, available_bytes=scaled(memory.available_bytes),
        shm_free_bytes=scaled(memory.shm_free_bytes)))


def split_workers(hw: HardwareInfo, members: list[Member]) -> dict[str, Split]:
    """Workers for each member, with the reason; members without a measurement keep the
    rules' count alone."""
    measured = [m for m in members if m.workload is not None and m.alone > 0]
    if not measured:
        return {m.name: Split(workers=m.alone, reason=_alone(m)) for m in members}
    costs = {m.name: _batch_costs(m) for m in measured}
    cpu_rate = hw.cpu_budget / max(1e-12, sum(m.share * costs[m.name][1] for m in measured))
    caps = {m.name: rules.max_workers(hw, m.hints, m.workload) for m in measured}
    cap_rate = min(caps[m.name] / (m.share * costs[m.name][0]) for m in measured)
    rate = min(cpu_rate, cap_rate) / rules.NEAR_BEST
    bound = "the CPUs" if cpu_rate <= cap_rate else "a loader's worker cap"
    result = {}
    for m in members:
        if m not in measured:
            result[m.name] = Split(workers=m.alone, reason=_alone(m))
            continue
        wall, _ = costs[m.name]
        needed = m.share * rate * wall
        assert m.workload is not None  # as every measured member's
        headroom = 1 + (rules.WAIT_HEADROOM - 1) * rules.worker_wait_share(m.workload)
        workers = max(1, min(m.alone, caps[m.name], math.ceil(needed * headroom)))
        others = ", ".join(o.name for o in members if o is not m)
        result[m.name] = Split(workers=workers, reason=(
            f"shares the loop with {others}: {m.share:.0%} of the batches at the "
            f"{rate:,.1f} batches/s {bound} allow for all of them; a batch costs a worker "
            f"{wall * 1e3:,.0f} ms, so {needed:.1f} workers supply it"
            f"{', with margin for waiting data' if headroom > 1.01 else ''} "
            f"(alone: {m.alone})"))
    return result


def thread_budget(hw: HardwareInfo, total_workers: int) -> tuple[int, str]:
    """Native threads per worker so that every loader's workers and the main process fit
    the CPUs together."""
    threads = max(1, hw.cpu_budget // (total_workers + 1))
    return threads, (f"({total_workers} workers across the loaders + the main process) x "
                     f"{threads} thread(s) fit {hw.cpu_budget} CPUs")


def burst(share: float, strategy: str) -> int:
    """Batches a loader may be asked for in a row: under ``weighted`` draws, the run that
    is longer only once in ``1 / RUN_ODDS`` (a share of 0.5 gives 7); 1 for fixed patterns."""
    if strategy != "weighted" or share >= 1:
        return 1
    return math.ceil(math.log(RUN_ODDS) / math.log(share))


def prefetch_for_bursts(hw: HardwareInfo, member: Member, workers: int, run: int,
                        prefetch: int | None) -> tuple[int | None, str | None]:
    """A prefetch deep enough that ``workers`` hold a run of ``run`` batches ready, within
    the memory for batches in flight; None when the rules' depth already does."""
    if not workers or prefetch is None or workers * prefetch >= run:
        return None, None
    deeper = math.ceil(run / workers)
    room = rules.memory_budget_bytes(hw)
    if member.workload is not None and room is not None:
        batch = max(1, member.workload.sample_bytes * (member.hints.batch_size or 1))
        deeper = min(deeper, max(prefetch, room // (workers * batch)))
    if deeper <= prefetch:
        return None, None
    return deeper, (f"weighted draws ask for up to {run} batches of this loader in a row (1 "
                    f"run in {1 / RUN_ODDS:.0f} is longer): {workers} worker(s) x {deeper} "
                    "keep them ready")


def batch_shares(strategy: str, weights: list[float]) -> list[float]:
    """Each loader's share of the loop's batches (sequential: each runs alone, so 1 each)."""
    if strategy == "sequential":
        return [1.0] * len(weights)
    if strategy == "round_robin":
        return [1 / len(weights)] * len(weights)
    total = sum(weights)
    return [w / total for w in weights]


def _batch_costs(member: Member) -> tuple[float, float]:
    """(wall, CPU) seconds one of the member's batches costs a worker."""
    batch = member.hints.batch_size or rules.ASSUMED_BATCH_SIZE
    assert member.workload is not None  # only measured members have costs
    wall, cpu = rules.worker_costs(member.workload, batch)
    return wall * batch, cpu * batch


def _alone(member: Member) -> str:
    return "sized alone: " + ("no measurement to share the machine by" if member.workload is None
                              else "no workers alone either")
