"""Training loaders for several datasets in one loop, sized together
(``factory.create_training_loaders``): each dataset measured, the machine split among them by
``policy.joint``, the loaders handed back in a ``MultiLoader``. A group tuned as one
(``MultiAutotuner``) is one profile entry: each loader takes its part of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._check import dataset_size, is_stream
from .._warn import warn_user
from ..config import GroupConfig, LoaderConfig
from ..errors import InvalidConfigError
from ..measure.workload import WorkloadProfile, measure_workload
from ..policy import joint, rules
from ..profiles import ProfileEntry, check_key, group_key
from ..system.distributed import current_ranks
from ..system.hardware import HardwareInfo
from .device import check_device
from .multi import MultiLoader, check_weights

if TYPE_CHECKING:
    from .factory import OptimalDataLoaderFactory


def create_group(factory: OptimalDataLoaderFactory, datasets: Any, batch_size: int, *,
                 strategy: str, weights: Any, stop: str, seed: int | None,
                 keywords: dict[str, Any]) -> MultiLoader:
    named = named_datasets(datasets)
    names = list(named)
    shares = joint.batch_shares(strategy, check_weights(weights, names, strategy))
    key = keywords.get("profile_key")
    key = check_key(key) if key is not None else group_key(named)
    entry = _group_entry(factory.profile_entry(key), key, names, strategy, shares)
    flags = (keywords.get("has_augmentation", False), keywords.get("has_standardization", False))
    device = keywords.get("device")
    target = None if device is None else str(check_device(device))
    if entry is not None:  # tuned as one: each loader takes its part of the entry
        loaders = {name: factory._create(
            named[name], batch_size, True, *flags, key, keywords.get("workload"),
            _overrides(keywords), profile=(key, entry.member(name)), device=device)
            for name in names}
        return MultiLoader(loaders, strategy=strategy, weights=weights, stop=stop, seed=seed)
    explicit_workers = "num_workers" in keywords
    hardware = factory._hardware_here()
    measuring = keywords.get("workload") is None and factory._needs_measuring(None, keywords)
    workloads = {name: measure_workload(dataset, collate_fn=keywords.get("collate_fn"))
                 if measuring else keywords.get("workload") for name, dataset in named.items()}
    members = plan_members(hardware, named, shares, workloads,
                           lambda size, stream: factory._hints(size, *flags, batch_size, True,
                                                               stream=stream, device=target))
    if strategy == "sequential" or explicit_workers:
        splits = {m.name: joint.Split(workers=m.alone, reason="") for m in members}
    else:
        splits = joint.split_workers(hardware, members)
    loaders = {}
    for member in members:
        shape = None
        if not explicit_workers and strategy != "sequential":
            shape = sharer(hardware, member, splits, strategy, keywords)
        loaders[member.name] = factory._create(
            named[member.name], batch_size, True, *flags, key, member.workload,
            _overrides(keywords), shape=shape, profile=(key, None), device=device)
    return MultiLoader(loaders, strategy=strategy, weights=weights, stop=stop, seed=seed)


def plan_members(hardware: HardwareInfo, named: Mapping[str, Any], shares: list[float],
                 workloads: Mapping[str, WorkloadProfile | None],
                 hints_for: Callable[[int | None, bool], rules.DatasetHints],
                 who: str = "create_training_loaders") -> list[joint.Member]:
    """Each dataset as the joint split sees it: its share, hints (this rank's part of it),
    measurement and the workers the rules give it alone."""
    members = []
    for (name, dataset), share in zip(named.items(), shares):
        size = dataset_size(dataset, who=who)
        if size is not None:
            size = max(1, size // current_ranks().world_size)
        hints = hints_for(size, is_stream(dataset))
        alone = rules.recommend(hardware, hints, workloads[name]).num_workers
        members.append(joint.Member(name=name, hints=hints, workload=workloads[name],
                                    share=share, alone=alone))
    return members


def group_config(hardware: HardwareInfo, members: list[joint.Member],
                 workers: Mapping[str, int], strategy: str, reason: str) -> GroupConfig:
    """Every member's settings for these worker counts, shared as ``create_training_loaders``
    shares the machine (the joint search measures these)."""
    splits = {m.name: joint.Split(workers=workers[m.name], reason=reason) for m in members}
    return GroupConfig(members={
        m.name: sharer(hardware, m, splits, strategy, {})(
            rules.recommend(hardware, m.hints, m.workload, workers=workers[m.name]))
        for m in members})


def _group_entry(entry: ProfileEntry | None, key: str, names: list[str], strategy: str,
                 shares: list[float]) -> ProfileEntry | None:
    """The profile entry tuned for this group, if it is one; a warning says why an entry
    under the key does not apply."""
    if entry is None:
        return None
    if not entry.members:
        warn_user(f"profile key {key!r} holds one loader's settings, not a group's: the "
                  "loaders are sized together by the rules. Tune the group with "
                  "autotune.MultiAutotuner, or pass another profile_key")
        return None
    if sorted(entry.members) != sorted(names):
        warn_user(f"profile key {key!r} was tuned for loaders {sorted(entry.members)}, not "
                  f"{sorted(names)}: the loaders are sized together by the rules. Re-tune the "
                  "group with autotune.MultiAutotuner")
        return None
    if strategy == "sequential":
        warn_user(f"profile key {key!r} was tuned for loaders that share the loop, and "
                  "strategy='sequential' runs one at a time: each loader is sized alone")
        return None
    tuned = entry.measured.get("strategy"), entry.measured.get("shares")
    here = strategy, {name: round(share, 3) for name, share in zip(names, shares)}
    if tuned[0] is not None and tuned != here:
        warn_user(f"profile key {key!r} was tuned with strategy={tuned[0]!r} and shares "
                  f"{tuned[1]}, this loop has strategy={strategy!r} and shares {here[1]}: "
                  "its worker split may not fit. Re-tune with autotune.MultiAutotuner")
    return entry


def sharer(hardware: Any, member: joint.Member, splits: Mapping[str, joint.Split],
           strategy: str, keywords: Mapping[str, Any]) -> Callable[[LoaderConfig], LoaderConfig]:
    """The change that gives this member its share: workers, native threads, a prefetch deep
    enough for the runs of its batches that the strategy asks for, and the part of the
    in-flight memory budget its batches may take (settings passed by keyword stay)."""
    split = splits[member.name]
    workers = split.workers
    total = sum(s.workers for s in splits.values())
    run = joint.burst(member.share, strategy)

    def shape(config: LoaderConfig) -> LoaderConfig:
        config = config.replace(reason=split.reason, num_workers=workers)
        memory = _memory_share(hardware, member, splits)
        prefetch = rules.prefetch_factor(memory, member.hints, member.workload, workers)
        deeper = joint.prefetch_for_bursts(memory, member, workers, run, prefetch[0])
        if deeper[0] is not None:
            prefetch = deeper  # type: ignore[assignment]
        native = member.workload is not None and workers > 0 \
            and member.workload.parallelism > rules.PARALLEL_THRESHOLD
        threads = (joint.thread_budget(hardware, total) if native
                   else rules.worker_threads(hardware, workers, member.workload))
        persistent = rules.persistent_workers(member.hints, workers)
        for name, (value, why) in (("prefetch_factor", prefetch), ("worker_threads", threads),
                                   ("persistent_workers", persistent)):
            if name not in keywords:
                config = config.replace(reason=why, **{name: value})
        return config

    return shape


def _memory_share(hardware: Any, member: joint.Member,
                  splits: Mapping[str, joint.Split]) -> Any:
    """The machine with only this member's part of RAM and /dev/shm (by workers, as batches
    in flight grow with them)."""
    share = splits[member.name].workers / max(1, sum(s.workers for s in splits.values()))
    memory = hardware.memory

    def part(value: int | None) -> int | None:
        return None if value is None else int(value * share)

    return dataclasses.replace(hardware, memory=dataclasses.replace(
        memory, available_bytes=part(memory.available_bytes),
        shm_free_bytes=part(memory.shm_free_bytes)))


def _overrides(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """DataLoader keywords for every member (the factory's own keywords taken out)."""
    ours = {"has_augmentation", "has_standardization", "profile_key", "workload", "device"}
    return {k: v for k, v in keywords.items() if k not in ours}


def named_datasets(datasets: Any) -> dict[str, Any]:
    if isinstance(datasets, Mapping):
        named = {str(k): v for k, v in datasets.items()}
    elif isinstance(datasets, Sequence) and not isinstance(datasets, (str, bytes)):
        named = {str(i): v for i, v in enumerate(datasets)}
    else:
        raise InvalidConfigError(f"datasets={datasets!r} must be a mapping name -> dataset or "
                                 "a list of datasets")
    if len(named) < 1:
        raise InvalidConfigError("datasets= is empty: give at least one dataset")
    return named
