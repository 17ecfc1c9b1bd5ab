"""``LoaderConfig``: one set of DataLoader settings, each with the reason it was chosen.

A config is also a read-only mapping of DataLoader keywords, so seed-style code works
as-is: ``DataLoader(ds, batch_size=24, **cfg)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch.utils.data import DataLoader

from ._check import check_bool, check_int, check_seconds
from ._worker_init import WorkerInit
from .errors import InvalidConfigError

START_METHODS = ("fork", "spawn", "forkserver")
EXPLICIT = "set explicitly"  # the reason of a setting the caller passed by keyword
SOURCES = ("rules", "tuned", "profile", "override")
SETTINGS = ("num_workers", "prefetch_factor", "pin_memory", "persistent_workers",
            "prefetch_across_epochs", "multiprocessing_context", "worker_threads", "in_order",
            "drop_last", "timeout")
# What tuning measures and a profile may set; drop_last and timeout are the caller's semantics.
TUNED_SETTINGS = ("num_workers", "prefetch_factor", "pin_memory", "persistent_workers",
                  "multiprocessing_context", "worker_threads", "in_order")
# in_order arrived in torch 2.6; on an older torch an in_order=False setting is left out.
TORCH_HAS_IN_ORDER = "in_order" in inspect.signature(DataLoader.__init__).parameters


@dataclass(frozen=True, kw_only=True)
class LoaderConfig(Mapping[str, Any]):
    """One set of DataLoader settings, each with the reason it was chosen (``explain()``).

    Also a read-only mapping of the keywords ``DataLoader`` takes (``dataloader_kwargs()``),
    so ``DataLoader(ds, batch_size=24, **cfg)`` works. Frozen: ``replace()`` makes a changed
    copy. Two configs are equal when their settings and ``source`` are; reasons do not count.
    Settings that only mean something with workers (``prefetch_factor``,
    ``persistent_workers``, ``multiprocessing_context``, ``worker_threads``, ``in_order``,
    ``timeout``) are left out of the keywords when ``num_workers`` is 0;
    ``prefetch_across_epochs`` is autotune's own (``TunedDataLoader``), never a keyword.

    Attributes:
        num_workers: worker processes; 0 loads in the main process.
        prefetch_factor: batches each worker loads ahead (at least 1); None: torch's default
            (2). The rules lower it to 1 when the batches in flight would not fit a share
            of RAM and /dev/shm.
        pin_memory: batches in page-locked memory, which speeds the copy to a CUDA device
            and only costs time otherwise.
        persistent_workers: keep the workers between epochs instead of starting new ones
            each epoch (training runs many epochs; validation frees them between passes).
        prefetch_across_epochs: the workers make the next epoch's first batches while the
            current epoch's last ones are used, so an epoch boundary costs no more than any
            other step (``loading.epochs``). Needs persistent workers, batches in order and
            a sampler whose next epoch is known; a ``TunedDataLoader`` turns it off, with
            the reason, where one is missing.
        multiprocessing_context: how workers start: ``"fork"``, ``"spawn"`` or
            ``"forkserver"``; None: the platform's default start method.
        worker_threads: native (BLAS) threads per worker, set as each worker starts, so
            that workers and the main process together fit the CPUs; None: leave the
            pools as they are (torch already gives each worker one intra-op thread).
        in_order: batches in sampler order (reproducible); False: a slow sample does not
            hold back the batches behind it (torch 2.6 and later; left out on older torch).
        drop_last: drop each epoch's last, partial batch, so every step sees a full one.
        timeout: seconds to wait for a batch from the workers before raising; 0 waits
            forever.
        reasons: why each setting has its value, by setting name (``explain()`` shows
            them), plus notes on how the data is read (``noted()``); kept read-only and
            left out of comparisons.
        source: where the settings came from: ``"rules"`` (the rule engine),
            ``"tuned"`` (measured by the autotuner), ``"profile"`` (a saved profile entry)
            or ``"override"`` (the caller passed some of them by keyword).
    """

    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_across_epochs: bool = False
    multiprocessing_context: str | None = None
    worker_threads: int | None = None
    in_order: bool = True
    drop_last: bool = False
    timeout: float = 0.0
    reasons: Mapping[str, str] = field(default_factory=dict, compare=False)
    source: str = "rules"

    def __post_init__(self) -> None:
        check_int("num_workers", self.num_workers, minimum=0)
        if self.prefetch_factor is not None:
            check_int("prefetch_factor", self.prefetch_factor, minimum=1)
        if self.worker_threads is not None:
            check_int("worker_threads", self.worker_threads, minimum=1)
        for name in ("pin_memory", "persistent_workers", "prefetch_across_epochs", "in_order",
                     "drop_last"):
            check_bool(name, getattr(self, name))
        if self.multiprocessing_context not in (None, *START_METHODS):
            raise InvalidConfigError(
                f"multiprocessing_context={self.multiprocessing_context!r} must be None "
                f"or one of {', '.join(START_METHODS)}")
        check_seconds("timeout", self.timeout, allow_zero=True)
        if self.source not in SOURCES:
            raise InvalidConfigError(f"source={self.source!r} must be one of {', '.join(SOURCES)}")
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickles (to spawned workers, between ranks) with its reasons as a plain dict."""
        return _rebuild, (self.to_dict(),)

    def dataloader_kwargs(self, *, worker_init_fn: Any = None) -> dict[str, Any]:
        """Keywords ``torch.utils.data.DataLoader`` accepts as they are.

        Never a combination DataLoader rejects: no prefetch_factor, persistent_workers,
        timeout or start method without workers. With workers it includes a ``worker_init_fn``
        (``WorkerInit``: thread budget, garbage-collector freeze) that then calls yours.
        """
        kwargs: dict[str, Any] = {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "drop_last": self.drop_last,
        }
        if self.num_workers > 0:
            kwargs["timeout"] = self.timeout  # torch takes a timeout only with workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
            kwargs["persistent_workers"] = self.persistent_workers
            if self.multiprocessing_context is not None:
                kwargs["multiprocessing_context"] = self.multiprocessing_context
            if not self.in_order and TORCH_HAS_IN_ORDER:
                kwargs["in_order"] = False
            kwargs["worker_init_fn"] = WorkerInit(threads=self.worker_threads,
                                                  user_fn=worker_init_fn)
        elif worker_init_fn is not None:
            kwargs["worker_init_fn"] = worker_init_fn
        return kwargs

    def replace(self, *, source: str | None = None, reason: str | None = None,
                **settings: Any) -> LoaderConfig:
        """A copy with some settings changed; each changed one gets ``reason``."""
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise InvalidConfigError(
                f"unknown setting(s) {sorted(unknown)}; settings are {', '.join(SETTINGS)}")
        reasons = dict(self.reasons)
        if reason is not None:
            reasons.update({name: reason for name in settings})
        return dataclasses.replace(self, reasons=reasons, source=source or self.source,
                                   **settings)

    def noted(self, **notes: str) -> LoaderConfig:
        """A copy that also explains choices outside the settings (how the data is read:
        ``sampler``, ``cache_bytes``, ``preload``); ``explain()`` lists them last."""
        clash = set(notes) & set(SETTINGS)
        if clash:
            raise InvalidConfigError(f"{sorted(clash)[0]} is a setting: use replace()")
        return dataclasses.replace(self, reasons={**self.reasons, **notes})

    def explain(self) -> str:
        """Every setting with its value and why it was chosen, one per line; then how the
        data is read, where the factory chose that too."""
        width = max(len(name) for name in SETTINGS)
        lines = [f"DataLoader settings (source: {self.source})"]
        for name in SETTINGS:
            reason = self.reasons.get(name, "default")
            lines.append(f"  {name:<{width}} = {getattr(self, name)!s:<6}  {reason}")
        notes = [name for name in self.reasons if name not in SETTINGS]
        if notes:
            lines.append("Reading the data")
            lines.extend(f"  {name:<{width}}   {self.reasons[name]}" for name in notes)
        return "\n".join(lines)

    def settings(self) -> dict[str, Any]:
        """The settings alone, as plain data."""
        return {name: getattr(self, name) for name in SETTINGS}

    def tuned_settings(self) -> dict[str, Any]:
        """The settings a profile entry keeps (what a tuner may choose, not the caller)."""
        return {name: getattr(self, name) for name in TUNED_SETTINGS}

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings(), "reasons": dict(self.reasons), "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoaderConfig:
        unknown = set(data) - set(SETTINGS) - {"reasons", "source"}
        if unknown:
            raise InvalidConfigError(
                f"unknown setting(s) {sorted(unknown)}; settings are {', '.join(SETTINGS)}")
        return cls(**dict(data))

    # Mapping of DataLoader keywords, for DataLoader(ds, **cfg) and cfg["num_workers"].
    def __getitem__(self, key: str) -> Any:
        return self.dataloader_kwargs()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.dataloader_kwargs())

    def __len__(self) -> int:
        return len(self.dataloader_kwargs())


def _rebuild(data: dict[str, Any]) -> LoaderConfig:
    return LoaderConfig.from_dict(data)


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """The settings of several loaders that share one loop (a ``MultiLoader``), by name.

    ``num_workers`` is their total: what a group costs in processes, and what the joint
    search keeps low.

    Attributes:
        members: each loader's settings, by the loader's name (the names the ``MultiLoader``
            yields, in its order); kept read-only.
    """

    members: Mapping[str, LoaderConfig]

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", MappingProxyType(dict(self.members)))

    @property
    def num_workers(self) -> int:
        return sum(config.num_workers for config in self.members.values())

    def workers(self) -> dict[str, int]:
        return {name: config.num_workers for name, config in self.members.items()}

    def settings(self) -> dict[str, dict[str, Any]]:
        """Each member's settings alone, as plain data."""
        return {name: config.settings() for name, config in self.members.items()}

    def to_dict(self) -> dict[str, Any]:
        return {name: config.to_dict() for name, config in self.members.items()}
