"""``OptimalDataLoaderFactory``: settings for this machine and dataset, as a real DataLoader.

Precedence: an explicit DataLoader keyword > this host's tuned profile entry for the key >
the rules (fed a quick measurement of a few samples unless told not to measure).
Called on the class itself (seed style), each method uses a process-wide default factory.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import types
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader, Subset

from ..policy import rules
from .crash import CrashNamingIterator
from .._warn import warn_user
from .worker import NamedErrors
from ..config import SETTINGS, TUNED_SETTINGS, LoaderConfig
from ..errors import InvalidConfigError, ProfileError
from ..system.hardware import HardwareInfo, probe_hardware
from ..profiles import Profile, ProfileEntry, check_key, load_profile, profile_path
from .safety import check_worker_safety, copy_on_read_risks
from ..measure.workload import WorkloadProfile, measure_workload

log = logging.getLogger(__name__)

# Keywords passed straight to DataLoader (everything it takes that is not ours to choose).
_PASS_THROUGH = frozenset(inspect.signature(DataLoader.__init__).parameters) - {
    "self", "dataset", "batch_size", *SETTINGS}


class TunedDataLoader(DataLoader):
    """A plain ``DataLoader`` that remembers its ``LoaderConfig`` (``.autotune_config``).

    Its ``dataset`` is the caller's, wrapped so that an exception names the sample's index
    (``loader.dataset.dataset`` is the original; other attributes pass through).

    When the worker count was chosen by measurement (rules or profile), torch's warning
    about more workers than CPUs is skipped: here it is the point, and ``explain()`` says why.
    """

    autotune_config: LoaderConfig | None = None

    def __iter__(self) -> Any:
        """torch's iterator; a worker that dies raises ``WorkerCrashError`` with the likely fix
        instead of torch's bare "killed by signal: Killed" (``autotune._crash``)."""
        iterator = super().__iter__()
        if self.num_workers == 0:
            return iterator
        return CrashNamingIterator(iterator, self.num_workers, self.prefetch_factor)

    def check_worker_number_rationality(self) -> None:
        config = self.autotune_config
        if config is not None and config.reasons.get("num_workers") != "set explicitly":
            return
        super().check_worker_number_rationality()


class _on_instance_or_default:
    """A method that, called on the class, runs on the process-wide default factory."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj: Any, cls: Any = None) -> Callable[..., Any]:
        if obj is not None:
            return types.MethodType(self.fn, obj)

        @functools.wraps(self.fn)
        def on_default(*args: Any, **kwargs: Any) -> Any:
            return self.fn(cls.default(), *args, **kwargs)

        return on_default


class OptimalDataLoaderFactory:
    """Builds DataLoaders whose settings fit this machine and this dataset."""

    _default: ClassVar[OptimalDataLoaderFactory | None] = None

    def __init__(self, *, hardware: HardwareInfo | None = None,
                 profile_dir: str | os.PathLike[str] | None = None, measure: bool = True,
                 seed: int | None = None, device: str | None = None) -> None:
        """``measure=False`` skips timing samples; ``seed`` makes shuffling and worker
        seeds reproducible; ``device`` is where batches go (default: what torch sees)."""
        self.hardware = hardware or probe_hardware()
        self.profile_dir = profile_dir
        self.measure = measure
        self.seed = seed
        self.device = device
        self._profile: Profile | None = None
        self._profile_read = False

    @classmethod
    def default(cls) -> OptimalDataLoaderFactory:
        """The process-wide factory that calls on the class use."""
        if cls._default is None:
            cls._default = cls()
        return cls._default

    @_on_instance_or_default
    def get_optimal_config(self, dataset_size: int, has_augmentation: bool = False,
                           has_standardization: bool = False, *, batch_size: int | None = None,
                           workload: WorkloadProfile | None = None, training: bool = True,
                           profile_key: str | None = None) -> LoaderConfig:
        """The settings for a dataset of this size: profile entry if tuned here, else rules."""
        hints = self._hints(dataset_size, has_augmentation, has_standardization, batch_size,
                            training)
        entry = self.profile_entry(profile_key) if profile_key is not None else None
        if entry is None:
            return rules.recommend(self.hardware, hints, workload)
        # Validation keeps the rules' persistence and order: an entry is tuned for training.
        tuned = {k: v for k, v in entry.settings.items() if k in TUNED_SETTINGS
                 and (training or k not in ("persistent_workers", "in_order"))}
        ruled = rules.recommend(self.hardware, hints, workload, workers=tuned.get("num_workers"))
        return ruled.replace(source="profile", reason=entry.reason(profile_key), **tuned)

    def _hints(self, dataset_size: int, has_augmentation: bool, has_standardization: bool,
               batch_size: int | None, training: bool) -> rules.DatasetHints:
        return rules.DatasetHints(
            dataset_size=dataset_size, batch_size=batch_size, has_augmentation=has_augmentation,
            has_standardization=has_standardization, training=training, device=self.device)

    @_on_instance_or_default
    def create_training_loader(self, dataset: Any, batch_size: int, *,
                               has_augmentation: bool = False, has_standardization: bool = False,
                               profile_key: str | None = None,
                               workload: WorkloadProfile | None = None,
                               **dataloader_overrides: Any) -> DataLoader:
        """Shuffled, full batches only, worker thread budget, seeded when the factory has a seed."""
        return self._create(dataset, batch_size, True, has_augmentation, has_standardization,
                            profile_key, workload, dataloader_overrides)

    @_on_instance_or_default
    def create_validation_loader(self, dataset: Any, batch_size: int, *,
                                 has_augmentation: bool = False, has_standardization: bool = False,
                                 profile_key: str | None = None,
                                 workload: WorkloadProfile | None = None,
                                 **dataloader_overrides: Any) -> DataLoader:
        """In order, keeps the last partial batch, workers not held between passes."""
        return self._create(dataset, batch_size, False, has_augmentation, has_standardization,
                            profile_key, workload, dataloader_overrides)

    def profile_entry(self, key: str) -> ProfileEntry | None:
        """This host's tuned entry for key, if the profile exists, is valid and fits here."""
        check_key(key)
        profile = self.host_profile()
        return profile.loaders.get(key) if profile is not None else None

    def host_profile(self) -> Profile | None:
        """This host's profile if it applies to this hardware; read once, warns otherwise."""
        if not self._profile_read:
            self._profile_read = True
            path = profile_path(self.hardware.host.hostname, self.profile_dir)
            try:
                profile = load_profile(path)
            except ProfileError as exc:
                warn_user(f"{exc}; using the rules instead")
                return None
            if profile is not None and not profile.applies_to(self.hardware):
                warn_user(f"{path} was tuned on other hardware (fingerprint "
                          f"{profile.fingerprint} != {self.hardware.fingerprint}); using the "
                          "rules instead. Re-run `autotune tune` on this machine.")
                profile = None
            self._profile = profile
        return self._profile

    def _create(self, dataset: Any, batch_size: int, training: bool, has_augmentation: bool,
                has_standardization: bool, profile_key: str | None,
                workload: WorkloadProfile | None, overrides: dict[str, Any]) -> DataLoader:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidConfigError(f"batch_size={batch_size!r} must be an integer >= 1")
        unknown = set(overrides) - _PASS_THROUGH - set(SETTINGS)
        if unknown:
            raise InvalidConfigError(
                f"unknown keyword(s) {sorted(unknown)}: DataLoader takes "
                f"{', '.join(sorted(_PASS_THROUGH | set(SETTINGS)))}")
        key = profile_key if profile_key is not None else dataset_key(dataset)
        tuned = self.profile_entry(key) is not None
        if workload is None and self.measure and not tuned and "num_workers" not in overrides:
            workload = measure_workload(dataset, collate_fn=overrides.get("collate_fn"))
        config = self.get_optimal_config(
            len(dataset), has_augmentation, has_standardization, batch_size=batch_size,
            workload=workload, training=training, profile_key=key if tuned else None)
        settings = {k: overrides.pop(k) for k in SETTINGS if k in overrides}
        if "num_workers" in settings:  # the rest should follow the count the user chose
            hints = self._hints(len(dataset), has_augmentation, has_standardization, batch_size,
                                training)
            config = rules.recommend(self.hardware, hints, workload,
                                     workers=settings["num_workers"])
        if settings:
            config = config.replace(source="override", reason="set explicitly", **settings)
        log.info("DataLoader for %s:\n%s", key, config.explain())
        if config.num_workers > 0:
            self._check_workers(dataset, config, overrides, workload, self._hints(
                len(dataset), has_augmentation, has_standardization, batch_size, training))
        return self._build(dataset, batch_size, training, config, overrides)

    def _check_workers(self, dataset: Any, config: LoaderConfig, extra: dict[str, Any],
                       workload: WorkloadProfile | None, hints: rules.DatasetHints) -> None:
        """Before any worker starts: can they receive the dataset, and what will they cost?"""
        check_worker_safety(dataset, collate_fn=extra.get("collate_fn"),
                            worker_init_fn=extra.get("worker_init_fn"),
                            context=config.multiprocessing_context)
        try:
            risks = copy_on_read_risks(dataset)
        except Exception as exc:  # a hint is not worth failing a loader over
            log.debug("copy-on-read scan failed: %s", exc)
            risks = []
        for risk in risks:
            _warn_once(f"{risk}: every worker copies the memory pages it reads from it, so "
                       "memory grows with workers and epochs (copy-on-read). Store it as a "
                       "numpy array (or pyarrow/pandas column) instead")
        shm = rules.shm_warning(self.hardware, hints, workload, workers=config.num_workers
                                if config.source != "rules" else None)
        if shm is not None:
            _warn_once(shm)

    def _build(self, dataset: Any, batch_size: int, training: bool, config: LoaderConfig,
               extra: dict[str, Any]) -> DataLoader:
        kwargs = config.dataloader_kwargs(worker_init_fn=extra.pop("worker_init_fn", None))
        if self.seed is not None and "generator" not in extra:
            extra["generator"] = torch.Generator().manual_seed(self.seed)
        if "batch_sampler" in extra:  # it decides batching, order and the last batch itself
            kwargs.pop("drop_last")
        else:
            kwargs["batch_size"] = batch_size
            if "sampler" not in extra:
                extra.setdefault("shuffle", training)
        loader = TunedDataLoader.__new__(TunedDataLoader)
        loader.autotune_config = config  # before __init__, which already checks worker counts
        loader.__init__(NamedErrors(dataset), **kwargs, **extra)
        return loader


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Each distinct warning once per process, however many loaders are built."""
    if message not in _warned:
        _warned.add(message)
        warn_user(message)


def dataset_key(dataset: Any) -> str:
    """Default profile key: the class name of the dataset under any ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return type(dataset).__name__
