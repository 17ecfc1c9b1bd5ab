"""Training loaders for several datasets in one loop, sized together
(``factory.create_training_loaders``): each dataset measured, the machine split among them by
``policy.joint``, the loaders handed back in a ``MultiLoader``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._check import dataset_size, is_stream
from ..config import LoaderConfig
from ..errors import InvalidConfigError
from ..policy import joint, rules
from ..system.distributed import current_ranks
from .multi import MultiLoader, check_weights

if TYPE_CHECKING:
    from .factory import OptimalDataLoaderFactory


def create_group(factory: OptimalDataLoaderFactory, datasets: Any, batch_size: int, *,
                 strategy: str, weights: Any, stop: str, seed: int | None,
                 keywords: dict[str, Any]) -> MultiLoader:
    named = _named_datasets(datasets)
    names = list(named)
    shares = joint.batch_shares(strategy, check_weights(weights, names, strategy))
    explicit_workers = "num_workers" in keywords
    hardware = factory._hardware_here()
    members = []
    for (name, dataset), share in zip(named.items(), shares):
        workload = keywords.get("workload") or factory._measure_once(dataset, keywords)
        size = dataset_size(dataset, who="create_training_loaders")
        if size is not None:
            size = max(1, size // current_ranks().world_size)
        hints = factory._hints(size, keywords.get("has_augmentation", False),
                               keywords.get("has_standardization", False), batch_size, True,
                               stream=is_stream(dataset))
        alone = rules.recommend(hardware, hints, workload).num_workers
        members.append(joint.Member(name=name, hints=hints, workload=workload, share=share,
                                    alone=alone))
    if strategy == "sequential" or explicit_workers:
        splits = {m.name: joint.Split(workers=m.alone, reason="") for m in members}
    else:
        splits = joint.split_workers(hardware, members)
    total = sum(s.workers for s in splits.values())
    loaders = {}
    for member in members:
        shape = None
        if not explicit_workers and strategy != "sequential":
            shape = _sharer(hardware, member, splits, total, keywords,
                            run=joint.burst(member.share, strategy))
        loaders[member.name] = factory._create(
            named[member.name], batch_size, True, keywords.get("has_augmentation", False),
            keywords.get("has_standardization", False),
            keywords.get("profile_key", None) and f"{keywords['profile_key']}.{member.name}",
            member.workload, _overrides(keywords), shape=shape)
    return MultiLoader(loaders, strategy=strategy, weights=weights, stop=stop, seed=seed)


def _sharer(hardware: Any, member: joint.Member, splits: dict[str, joint.Split], total: int,
            keywords: Mapping[str, Any], run: int) -> Any:
    """The change that gives this member its share: workers, native threads, a prefetch deep
    enough for the runs of its batches that the strategy asks for, and the part of the
    in-flight memory budget its batches may take (settings passed by keyword stay)."""
    split = splits[member.name]
    workers = split.workers

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
                  splits: dict[str, joint.Split]) -> Any:
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
    ours = {"has_augmentation", "has_standardization", "profile_key", "workload"}
    return {k: v for k, v in keywords.items() if k not in ours}


def _named_datasets(datasets: Any) -> dict[str, Any]:
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
