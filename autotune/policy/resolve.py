"""The resolver: every precedence decision in one pure function.

    explicit keyword  >  tuned profile entry for this machine and key  >  the rules

An explicit ``num_workers`` sets aside the profile entry (it was tuned for another count)
and the rules size the rest for the count the user chose. A profile entry is tuned for
training, so a validation loader keeps the rules' persistence and order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import EXPLICIT, SETTINGS, TUNED_SETTINGS, LoaderConfig
from ..errors import InvalidConfigError
from ..measure.workload import WorkloadProfile
from ..system.hardware import HardwareInfo
from . import rules

_TRAINING_ONLY = ("persistent_workers", "in_order")


def resolve(hw: HardwareInfo, hints: rules.DatasetHints, workload: WorkloadProfile | None = None,
            *, entry: Mapping[str, Any] | None = None, entry_reason: str = "tuned",
            explicit: Mapping[str, Any] | None = None) -> LoaderConfig:
    """The settings for one loader, each with the reason it won.

    Args:
        hw: the machine (``probe_hardware()`` or a fake in tests).
        hints: what the caller said about the data (size, batch, training or not).
        workload: a measurement of a few samples, if one was taken.
        entry: the tuned profile entry's settings for this key, if one applies here.
        entry_reason: why the entry applies (shown by ``explain()``).
        explicit: settings the caller passed by keyword; each is validated here.
    """
    explicit = dict(explicit or {})
    unknown = set(explicit) - set(SETTINGS)
    if unknown:
        raise InvalidConfigError(
            f"unknown setting(s) {sorted(unknown)}; settings are {', '.join(SETTINGS)}")
    LoaderConfig(**explicit)  # each explicit value, checked before any rule uses it
    if "num_workers" in explicit:
        config = rules.recommend(hw, hints, workload, workers=explicit["num_workers"])
    elif entry is not None:
        tuned = {k: v for k, v in entry.items() if k in TUNED_SETTINGS
                 and (hints.training or k not in _TRAINING_ONLY)}
        config = rules.recommend(hw, hints, workload, workers=tuned.get("num_workers"))
        config = config.replace(source="profile", reason=entry_reason, **tuned)
    else:
        config = rules.recommend(hw, hints, workload)
    if explicit:
        config = config.replace(source="override", reason=EXPLICIT, **explicit)
    return config


def check_yields_a_batch(config: LoaderConfig, dataset_size: int, batch_size: int) -> None:
    """A loader that drops its only, partial batch would yield nothing, every epoch."""
    if config.drop_last and dataset_size < batch_size:
        raise InvalidConfigError(
            f"batch_size={batch_size} with drop_last=True over a dataset of {dataset_size} "
            f"sample(s) yields no batch in an epoch. Fix: batch_size <= {dataset_size}, or "
            "drop_last=False")
