"""Training loaders for several datasets in one loop, sized together
(``factory.create_training_loaders``): each dataset measured, the machine split among them by
``policy.joint``, the loaders handed back in a ``MultiLoader``. A group tuned as one
(``MultiAutotuner``) is one profile entry: each loader takes its part of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._check import dataset_size, is_stream
from .._warn import warn_user
from ..config import GroupConfig
from ..errors import InvalidConfigError
from ..feed.device import check_device
from ..feed.multi import MultiLoader, check_weights
from ..measure.workload import measure_workload
from ..policy import joint, rules
from ..policy.resolve import resolve
from ..profiles import ProfileEntry, check_key, group_key
from ..records import HardwareInfo, WorkloadProfile
from ..system.distributed import current_ranks
from .pipeline import LoaderPipeline, LoaderRequest


def create_group(pipeline: LoaderPipeline, datasets: Any, batch_size: int, *,
                 strategy: str, weights: Any, stop: str, seed: int | None,
                 keywords: dict[str, Any]) -> MultiLoader:
    """The loaders of ``create_training_loaders``, through the one pipeline: each member
    with its part of the group's tuned entry, or with its share of the machine."""
    named = named_datasets(datasets)
    names = list(named)
    shares = joint.batch_shares(strategy, check_weights(weights, names, strategy))
    key = keywords.get("profile_key")
    key = check_key(key) if key is not None else group_key(named)
    entry = _group_entry(pipeline.profile_entry(key), key, names, strategy, shares)
    flags = (keywords.get("has_augmentation", False), keywords.get("has_standardization", False))
    device = keywords.get("device")
    target = None if device is None else str(check_device(device))

    def request(name: str, **member: Any) -> LoaderRequest:
        return LoaderRequest(dataset=named[name], batch_size=batch_size, training=True,
                             has_augmentation=flags[0], has_standardization=flags[1],
                             profile_key=key, overrides=_overrides(keywords), device=device,
                             look_up=False, **member)

    if entry is not None:  # tuned as one: each loader takes its part of the entry
        loaders = {name: pipeline.create(request(name, workload=keywords.get("workload"),
                                                 entry=entry.member(name)))
                   for name in names}
        return MultiLoader(loaders, strategy=strategy, weights=weights, stop=stop, seed=seed)
    explicit_workers = "num_workers" in keywords
    hardware = pipeline.hardware_here()
    measuring = keywords.get("workload") is None and pipeline.needs_measuring(None, keywords)
    workloads = {name: measure_workload(dataset, collate_fn=keywords.get("collate_fn"))
                 if measuring else keywords.get("workload") for name, dataset in named.items()}
    members = plan_members(hardware, named, shares, workloads,
                           lambda size, stream: pipeline.hints(size, *flags, batch_size, True,
                                                               stream=stream, device=target))
    shared = not explicit_workers and strategy != "sequential"
    splits = joint.split_workers(hardware, members) if shared else {}
    loaders = {m.name: pipeline.create(request(
        m.name, workload=m.workload,
        share=joint.Share(member=m, splits=splits, strategy=strategy) if shared else None))
        for m in members}
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
        alone = resolve(hardware, hints, workloads[name]).num_workers
        members.append(joint.Member(name=name, hints=hints, workload=workloads[name],
                                    share=share, alone=alone))
    return members


def group_config(hardware: HardwareInfo, members: list[joint.Member],
                 workers: Mapping[str, int], strategy: str, reason: str) -> GroupConfig:
    """Every member's settings for these worker counts, shared as ``create_training_loaders``
    shares the machine (the joint search measures these)."""
    splits = {m.name: joint.Split(workers=workers[m.name], reason=reason) for m in members}
    return GroupConfig(members={
        m.name: resolve(hardware, m.hints, m.workload,
                        share=joint.Share(member=m, splits=splits, strategy=strategy))
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


def _overrides(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """DataLoader keywords for every member (the factory's own keywords taken out)."""
    ours = {"has_augmentation", "has_standardization", "profile_key", "workload", "device"}
    return {k: v for k, v in keywords.items() if k not in ours}


def named_datasets(datasets: Any) -> dict[str, Any]:
    """The datasets by name (a list's are named "0", "1", ...)."""
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
