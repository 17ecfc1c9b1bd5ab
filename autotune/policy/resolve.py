"""The resolver: every precedence decision in one pure function.

    adapt=True's order  >  explicit keyword  >  a count chosen while training runs
        >  tuned profile entry for this machine and key  >  a group's share  >  the rules

An explicit ``num_workers`` sets aside the profile entry (it was tuned for another count)
and the group's share, and the rules size the rest for the count the user chose. A count
the re-tuner chose (``workers``) keeps the entry's other tuned settings. A profile entry is
tuned for training, so a validation loader keeps the rules' persistence and order.
``adaptive`` keeps batches in sampler order, so that a loader rebuilt mid-epoch continues
at the first batch not delivered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import EXPLICIT, SETTINGS, TUNED_SETTINGS, LoaderConfig
from ..errors import InvalidConfigError
from ..records import HardwareInfo, WorkloadProfile
from . import joint, rules

_TRAINING_ONLY = ("persistent_workers", "in_order")
IN_ORDER_FOR_ADAPT = ("adapt=True: batches in sampler order, so a change mid-epoch continues "
                      "at the first batch not delivered")


def resolve(hw: HardwareInfo, hints: rules.DatasetHints, workload: WorkloadProfile | None = None,
            *, entry: Mapping[str, Any] | None = None, entry_reason: str = "tuned",
            explicit: Mapping[str, Any] | None = None, workers: int | None = None,
            share: joint.Share | None = None, adaptive: bool = False) -> LoaderConfig:
    """The settings for one loader, each with the reason it won.

    Args:
        hw: the machine (``probe_hardware()`` or a fake in tests).
        hints: what the caller said about the data (size, batch, training or not).
        workload: a measurement of a few samples, if one was taken.
        entry: the tuned profile entry's settings for this key, if one applies here.
        entry_reason: why the entry applies (shown by ``explain()``).
        explicit: settings the caller passed by keyword; each is validated here.
        workers: a worker count chosen while training runs (``adapt=True``'s re-tuner); it
            wins over an explicit ``num_workers``, which was only where it started.
        share: this loader's share of the machine when several share one loop
            (``factory.create_training_loaders``); set aside by an explicit ``num_workers``.
        adaptive: the loader re-tunes while training runs (``adapt=True``).
    """
    explicit = dict(explicit or {})
    unknown = set(explicit) - set(SETTINGS)
    if unknown:
        raise InvalidConfigError(
            f"unknown setting(s) {sorted(unknown)}; settings are {', '.join(SETTINGS)}")
    LoaderConfig(**explicit)  # each explicit value, checked before any rule uses it
    if workers is not None:
        explicit.pop("num_workers", None)
    tuned = {k: v for k, v in (entry or {}).items() if k in TUNED_SETTINGS
             and (hints.training or k not in _TRAINING_ONLY)}
    count = workers if workers is not None else explicit.get("num_workers")
    if count is not None:
        config = rules.recommend(hw, hints, workload, workers=count)
        tuned.pop("num_workers", None)
        if entry is not None and count and workers is not None and tuned:
            config = config.replace(source="profile", reason=entry_reason, **tuned)
    elif entry is not None:
        config = rules.recommend(hw, hints, workload, workers=tuned.get("num_workers"))
        config = config.replace(source="profile", reason=entry_reason, **tuned)
    else:
        config = rules.recommend(hw, hints, workload)
        if share is not None:
            config = joint.shared(hw, share, config)
    if explicit:
        config = config.replace(source="override", reason=EXPLICIT, **explicit)
    if adaptive and not config.in_order:
        config = config.replace(in_order=True, reason=IN_ORDER_FOR_ADAPT)
    missing = rules.across_epochs_needs(config)
    if config.prefetch_across_epochs and missing:
        config = config.replace(prefetch_across_epochs=False, reason=missing)
    return config


def check_yields_a_batch(config: LoaderConfig, dataset_size: int, batch_size: int) -> None:
    """A loader that drops its only, partial batch would yield nothing, every epoch."""
    if config.drop_last and dataset_size < batch_size:
        raise InvalidConfigError(
            f"batch_size={batch_size} with drop_last=True over a dataset of {dataset_size} "
            f"sample(s) yields no batch in an epoch. Fix: batch_size <= {dataset_size}, or "
            "drop_last=False")
