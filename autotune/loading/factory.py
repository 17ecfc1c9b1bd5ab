"""``OptimalDataLoaderFactory``: settings for this machine and dataset, as a real DataLoader.

Precedence: an explicit DataLoader keyword > this host's tuned profile entry for the key >
the rules (fed a quick measurement of a few samples unless told not to measure).
Called on the class itself (seed style), each method uses a process-wide default factory.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from .._check import check_bool, check_int, dataset_size, is_stream
from .._warn import warn_user
from ..config import SETTINGS, TUNED_SETTINGS, LoaderConfig
from ..errors import InvalidConfigError, ProfileError
from ..measure.workload import WorkloadProfile, measure_workload
from ..policy import rules
from ..policy.resolve import check_yields_a_batch, resolve
from ..profiles import Profile, ProfileEntry, check_key, dataset_key, find_profile
from ..sources.chunk_sampler import ChunkShuffleSampler
from ..sources.sharding import ShardedIterable
from ..system.distributed import Ranks, current_ranks
from ..system.hardware import HardwareInfo, probe_hardware
from ..tuning.adapt import DEFAULT_EVERY, AdaptiveLoader
from .builder import TunedDataLoader, build_loader
from .chunked import chunk_sampler, fit_chunks, reads_chunks, sampler_note
from .device import DeviceLoader, check_device
from .group import create_group
from .multi import MultiLoader
from .safety import (check_stream_ranks, check_stream_sharding, check_worker_safety,
                     copy_on_read_risks)
from .samplers import EpochDistributedSampler, ShardSampler
from .splits import DEFAULT_SPLITS, split_dataset

log = logging.getLogger(__name__)

TRAINING_ONLY = ("adapt", "adapt_every")  # create_training_loader's own keywords

# Keywords passed straight to DataLoader (everything it takes that is not ours to choose).
_PASS_THROUGH = frozenset(inspect.signature(DataLoader.__init__).parameters) - {
    "self", "dataset", "batch_size", *SETTINGS}


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
        check_bool("measure", measure)
        if seed is not None:
            check_int("seed", seed, minimum=0)
        if device is not None and not isinstance(device, str):
            raise InvalidConfigError(f"device={device!r} must be a string like 'cuda:0' or None")
        if profile_dir is not None and not isinstance(profile_dir, (str, os.PathLike)):
            raise InvalidConfigError(f"profile_dir={profile_dir!r} must be a path or None")
        self.hardware = hardware or probe_hardware()
        self.profile_dir = profile_dir
        self.measure = measure
        self.seed = seed
        self.device = device
        self._profile: Profile | None = None
        self._profile_file: os.PathLike[str] | None = None
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
        """The settings for a dataset of this size: the profile entry if tuned for this
        machine under ``profile_key``, else the rules (see ``policy.resolve``)."""
        hints = self._hints(dataset_size, has_augmentation, has_standardization, batch_size,
                            training)
        entry = self.profile_entry(profile_key) if profile_key is not None else None
        return self._resolve(hints, workload, entry, profile_key, {})

    @_on_instance_or_default
    def create_training_loader(self, dataset: Any, batch_size: int, *,
                               has_augmentation: bool = False, has_standardization: bool = False,
                               profile_key: str | None = None,
                               workload: WorkloadProfile | None = None, adapt: bool = False,
                               adapt_every: int | None = None, device: Any = None,
                               **dataloader_overrides: Any) -> Any:
        """Shuffled, full batches only, worker thread budget, seeded when the factory has a seed.

        Under torch.distributed (a process group, or torchrun's ``WORLD_SIZE`` > 1) a
        map-style dataset gets a ``DistributedSampler`` seeded from the factory's seed whose
        epoch advances by itself at every pass (``set_epoch`` calls still win).

        Args:
            dataset: a map-style dataset (``__len__`` and ``__getitem__``) or an
                ``IterableDataset`` (which must split its items by worker and rank itself,
                or be wrapped in ``autotune.shard_iterable``; checked before workers start).
            batch_size: samples per batch (per rank), >= 1 and, with ``drop_last``, <= the
                samples per rank.
            has_augmentation, has_standardization: per-sample transforms (rules without a
                measurement give them a worker per CPU).
            profile_key: the tuned profile entry to apply (default: the dataset's class name).
            workload: a measurement to use instead of timing a few samples here.
            adapt: return an ``AdaptiveLoader`` that watches the input stall while training
                runs and changes the worker count between steps (more while the loop waits,
                fewer while the workers idle, within the hardware budget); an explicit
                ``num_workers`` is where it starts. Batches come in sampler order.
            adapt_every: steps between two looks, at most one change per this many steps
                (default 20; only with ``adapt=True``).
            device: where batches go (``"cuda"``): the rules pin memory for a CUDA device and
                the loader comes wrapped in a ``DeviceLoader`` that copies one batch ahead.
            **dataloader_overrides: any ``DataLoader`` keyword; it wins over profile and rules.

        Returns:
            a ``TunedDataLoader``; an ``AdaptiveLoader`` with ``adapt=True``; either wrapped
            in a ``DeviceLoader`` with ``device=``.
        """
        check_bool("adapt", adapt)
        if adapt_every is not None:
            check_int("adapt_every", adapt_every, minimum=1)
            if not adapt:
                raise InvalidConfigError(f"adapt_every={adapt_every} without adapt=True: "
                                         "pass adapt=True to re-tune while training runs")
        return self._create(dataset, batch_size, True, has_augmentation, has_standardization,
                            profile_key, workload, dataloader_overrides,
                            adapt_every=(adapt_every or DEFAULT_EVERY) if adapt else None,
                            device=device)

    @_on_instance_or_default
    def create_validation_loader(self, dataset: Any, batch_size: int, *,
                                 has_augmentation: bool = False, has_standardization: bool = False,
                                 profile_key: str | None = None,
                                 workload: WorkloadProfile | None = None, device: Any = None,
                                 **dataloader_overrides: Any) -> Any:
        """In order, keeps the last partial batch, workers not held between passes
        (arguments as ``create_training_loader``, without ``adapt``). Under torch.distributed
        each rank gets every world-size-th sample (a run of consecutive ones for a chunked
        ``HDF5Dataset``: each chunk read on one rank), without the padding duplicates that
        would count some samples twice in a metric (ranks may run one batch more or less
        than another)."""
        return self._create(dataset, batch_size, False, has_augmentation, has_standardization,
                            profile_key, workload, dataloader_overrides, device=device)

    @_on_instance_or_default
    def create_dataloaders(self, dataset: Any, batch_size: int, *,
                           splits: Sequence[float | None] = DEFAULT_SPLITS, seed: int = 0,
                           **keywords: Any) -> tuple[TunedDataLoader | None, ...]:
        """(train, val, test) loaders over a reproducible split of one dataset.

        The workload is measured once, on the whole dataset, and shared by the three.
        A split of ``None`` or 0 gives ``None`` in its place.

        Args:
            dataset: a map-style dataset.
            batch_size: samples per batch for all three loaders.
            splits: fractions of the samples for train, val and test (``split_dataset``).
            seed: the split's permutation seed (the same split on every run and rank).
            **keywords: what ``create_training_loader`` takes (also given to the other two,
                except ``adapt`` and ``adapt_every``: only training re-tunes).

        Example::

            train, val, test = autotune.create_dataloaders(dataset, 64, splits=(0.8, 0.2, None))
        """
        train, val, test = split_dataset(dataset, splits, seed=seed)
        if keywords.get("workload") is None:
            keywords["workload"] = self._measure_once(dataset, keywords)
        evaluation = {k: v for k, v in keywords.items() if k not in TRAINING_ONLY}
        return (train and self.create_training_loader(train, batch_size, **keywords),
                val and self.create_validation_loader(val, batch_size, **evaluation),
                test and self.create_validation_loader(test, batch_size, **evaluation))

    @_on_instance_or_default
    def create_training_loaders(self, datasets: Any, batch_size: int, *,
                                strategy: str = "sequential", weights: Any = None,
                                stop: str = "max_cycle", seed: int | None = None,
                                **keywords: Any) -> MultiLoader:
        """Training loaders for several datasets in one loop, sized together, in a
        ``MultiLoader``.

        Each dataset is measured; then the CPUs and the memory for batches in flight are
        split among the loaders by each one's cost per batch and its share of the batches
        (``policy.joint``): none starves, and together they fit the machine (sized alone,
        each would assume the whole machine). Native thread pools are budgeted over all the
        loaders' workers. ``sequential`` runs one loader at a time, so each is sized alone.

        Args:
            datasets: a mapping name -> dataset (or a list, named "0", "1", ...).
            batch_size: samples per batch, for every loader.
            strategy, weights, stop, seed: how the loop interleaves them (``MultiLoader``).
            **keywords: what ``create_training_loader`` takes, given to every loader (an
                explicit ``num_workers`` sets every loader's count: no joint sizing);
                ``profile_key`` names each loader's entry ``"<key>.<name>"``.

        Example::

            multi = factory.create_training_loaders({"images": ds_a, "captions": ds_b},
                                                    batch_size=64, strategy="weighted",
                                                    weights={"images": 3, "captions": 1})
            for name, batch in multi:
                ...
        """
        check_int("batch_size", batch_size, minimum=1)
        unknown = sorted(set(keywords) & {"adapt", "adapt_every"})
        if unknown:
            raise InvalidConfigError(f"{unknown[0]}= is not supported by "
                                     "create_training_loaders yet: build the loaders one by one "
                                     "with create_training_loader and pass them to MultiLoader")
        return create_group(self, datasets, batch_size, strategy=strategy, weights=weights,
                            stop=stop, seed=seed, keywords=keywords)

    def _hardware_here(self) -> HardwareInfo:
        """This machine as this rank shares it."""
        return _per_rank(self.hardware)

    def profile_entry(self, key: str) -> ProfileEntry | None:
        """The tuned entry for key in the profile that applies to this machine, if any."""
        check_key(key)
        profile = self.host_profile()
        return profile.loaders.get(key) if profile is not None else None

    def host_profile(self) -> Profile | None:
        """The profile that applies to this machine (its hostname's, else one whose hardware
        fingerprint matches); read once. An unusable file warns and leaves the rules."""
        if not self._profile_read:
            self._profile_read = True
            try:
                lookup = find_profile(self.hardware, self.profile_dir)
            except ProfileError as exc:
                warn_user(f"{exc}; using the rules instead")
                return None
            log.info("autotune profile: %s", lookup.why)
            self._profile, self._profile_file = lookup.profile, lookup.path
        return self._profile

    def _hints(self, dataset_size: int | None, has_augmentation: bool, has_standardization: bool,
               batch_size: int | None, training: bool, stream: bool = False,
               device: str | None = None) -> rules.DatasetHints:
        check_bool("has_augmentation", has_augmentation)
        check_bool("has_standardization", has_standardization)
        return rules.DatasetHints(
            dataset_size=dataset_size, batch_size=batch_size, has_augmentation=has_augmentation,
            has_standardization=has_standardization, training=training,
            device=device or self.device, stream=stream)

    def _resolve(self, hints: rules.DatasetHints, workload: WorkloadProfile | None,
                 entry: ProfileEntry | None, key: str | None,
                 explicit: dict[str, Any]) -> LoaderConfig:
        reason = "tuned"
        if entry is not None:
            reason = entry.reason(key)
            _check_ranks_tuned_for(entry, key)
            if self._profile_file is not None:
                reason += f" in {self._profile_file}"
        return resolve(_per_rank(self.hardware), hints, workload,
                       entry=entry.settings if entry is not None else None,
                       entry_reason=reason, explicit=explicit)

    def _create(self, dataset: Any, batch_size: int, training: bool, has_augmentation: bool,
                has_standardization: bool, profile_key: str | None,
                workload: WorkloadProfile | None, overrides: dict[str, Any], *,
                adapt_every: int | None = None, device: Any = None,
                shape: Callable[[LoaderConfig], LoaderConfig] | None = None,
                profile: tuple[str, ProfileEntry | None] | None = None) -> Any:
        """``adapt_every``: an ``AdaptiveLoader`` looking every so many steps (None: none).
        ``shape``: a last change to the resolved settings (a group's share of the machine).
        ``profile``: the key and entry to apply instead of looking the key up (a group's)."""
        check_int("batch_size", batch_size, minimum=1)
        if workload is not None and not isinstance(workload, WorkloadProfile):
            raise InvalidConfigError(f"workload={workload!r} must be a WorkloadProfile (from "
                                     "autotune.measure_workload) or None")
        target = check_device(device) if device is not None else None
        if not training and set(overrides) & set(TRAINING_ONLY):
            raise InvalidConfigError(
                f"{sorted(set(overrides) & set(TRAINING_ONLY))[0]}= is for training loaders "
                "only (create_training_loader): evaluation keeps its settings")
        unknown = set(overrides) - _PASS_THROUGH - set(SETTINGS)
        if unknown:
            raise InvalidConfigError(
                f"unknown keyword(s) {sorted(unknown)}: DataLoader takes "
                f"{', '.join(sorted(_PASS_THROUGH | set(SETTINGS)))}")
        size = dataset_size(dataset, who="the factory")
        explicit = {k: overrides.pop(k) for k in SETTINGS if k in overrides}
        LoaderConfig(**explicit)  # a bad keyword fails now, not after measuring
        ranks = current_ranks()
        stream = is_stream(dataset)
        ordered = "sampler" in overrides or "batch_sampler" in overrides
        chunked = (training and not ordered and overrides.get("shuffle", True)
                   and reads_chunks(dataset))
        if chunked and ranks.distributed:
            size = math.ceil(size / ranks.world_size)  # this rank's share of the chunk order
        elif ranks.distributed and not stream and not ordered:
            # the sampler orders the rank's share: an explicit shuffle= goes to it
            overrides["sampler"] = _rank_sampler(size, dataset, ranks, training, self.seed,
                                                 shuffle=bool(overrides.pop("shuffle", training)))
            size = len(overrides["sampler"])
        hints = self._hints(size, has_augmentation, has_standardization, batch_size, training,
                            stream=stream, device=None if target is None else str(target))
        key = check_key(profile_key) if profile_key is not None else dataset_key(dataset)
        entry = self.profile_entry(key) if profile is None else profile[1]
        if workload is None and self._needs_measuring(entry, explicit):
            workload = measure_workload(dataset, collate_fn=overrides.get("collate_fn"))
        config = self._resolve(hints, workload, entry, key, explicit)
        if shape is not None:
            config = shape(config)
        config = fit_chunks(dataset, config, _per_rank(self.hardware))
        if chunked:
            overrides.pop("shuffle", None)  # the sampler shuffles (DataLoader takes one)
            overrides["sampler"] = chunk_sampler(dataset, batch_size, config.num_workers,
                                                 seed=self.seed)
            config = config.noted(sampler=sampler_note(overrides["sampler"]))
        if adapt_every is not None:
            config = _in_order(config)
        if not ordered and size is not None:
            check_yields_a_batch(config, size, batch_size)
        log.info("DataLoader for %s:\n%s", key, config.explain())
        if config.num_workers > 0:
            self._check_workers(dataset, config, overrides, workload, hints)
        if stream and ranks.distributed:
            _check_stream_ranks(dataset, ranks)
        if self.seed is not None and "generator" not in overrides:
            # worker seeds differ across ranks; a DistributedSampler orders by its own seed
            overrides["generator"] = torch.Generator().manual_seed(self.seed + ranks.rank)
        if adapt_every is None:
            loader: Any = build_loader(dataset, batch_size, config, shuffle=training,
                                       extra=overrides)
        else:
            loader = self._adaptive(dataset, batch_size, config, hints, workload, explicit,
                                    overrides, key, adapt_every)
        return loader if target is None else DeviceLoader(loader, target)

    def _adaptive(self, dataset: Any, batch_size: int, config: LoaderConfig,
                  hints: rules.DatasetHints, workload: WorkloadProfile | None,
                  explicit: dict[str, Any], overrides: dict[str, Any], key: str,
                  every: int) -> AdaptiveLoader:
        """An ``AdaptiveLoader`` starting at ``config``; each count it moves to gets the
        settings the factory gives that count, with the caller's other keywords and the
        profile entry's other tuned settings kept."""
        hardware = _per_rank(self.hardware)
        fixed = {k: v for k, v in explicit.items() if k != "num_workers"}
        entry = self.profile_entry(key)
        tuned = {k: v for k, v in (entry.settings.items() if entry is not None else ())
                 if k in TUNED_SETTINGS and k != "num_workers" and k not in fixed}

        def configure(workers: int) -> LoaderConfig:
            config = resolve(hardware, hints, workload, explicit={**fixed, "num_workers": workers})
            if tuned and workers:
                config = config.replace(reason=entry.reason(key), **tuned)  # type: ignore[union-attr]
            if reads_chunks(dataset):  # each reading process's cache, for this many
                config = fit_chunks(dataset, config, hardware)
            return _in_order(config)

        def check(candidate: LoaderConfig) -> None:
            self._check_workers(dataset, candidate, overrides, workload, hints)

        return AdaptiveLoader(dataset, batch_size, config, configure=configure,
                              cap=rules.max_workers(hardware, hints, workload),
                              hardware=hardware, extra=overrides,
                              shuffle=overrides.pop("shuffle", True), key=key,
                              check_workers=check, every=every, profile_dir=self.profile_dir)

    def _needs_measuring(self, entry: ProfileEntry | None, explicit: Mapping[str, Any]) -> bool:
        """The rules need a measurement unless a profile entry or the caller sets workers."""
        return self.measure and entry is None and "num_workers" not in explicit

    def _measure_once(self, dataset: Any, keywords: Mapping[str, Any]) -> WorkloadProfile | None:
        """The measurement the loaders for ``dataset`` would each take, taken once."""
        key = keywords.get("profile_key")
        entry = self.profile_entry(check_key(key) if key is not None else dataset_key(dataset))
        if not self._needs_measuring(entry, keywords):
            return None
        return measure_workload(dataset, collate_fn=keywords.get("collate_fn"))

    def _check_workers(self, dataset: Any, config: LoaderConfig, extra: dict[str, Any],
                       workload: WorkloadProfile | None, hints: rules.DatasetHints) -> None:
        """Before any worker starts: can they receive the dataset, and what will they cost?"""
        check_worker_safety(dataset, collate_fn=extra.get("collate_fn"),
                            worker_init_fn=extra.get("worker_init_fn"),
                            context=config.multiprocessing_context)
        if is_stream(dataset) and config.num_workers > 1:
            check_stream_sharding(dataset)
        try:
            risks = copy_on_read_risks(dataset)
        except Exception as exc:  # a hint is not worth failing a loader over
            log.debug("copy-on-read scan failed: %s", exc)
            risks = []
        for risk in risks:
            _warn_once(f"{risk}: every worker copies the memory pages it reads from it, so "
                       "memory grows with workers and epochs (copy-on-read). Store it as a "
                       "numpy array (or pyarrow/pandas column) instead")
        workers = config.num_workers if config.source != "rules" else None
        shm = rules.shm_warning(_per_rank(self.hardware), hints, workload, workers=workers)
        if shm is not None:
            _warn_once(shm)


def _per_rank(hardware: HardwareInfo) -> HardwareInfo:
    """The machine as this rank shares it, read live: Lightning's launcher sets no
    ``LOCAL_WORLD_SIZE``, and a probe may predate the launch (``current_ranks`` counts the
    ranks on this host from ``WORLD_SIZE`` and ``LOCAL_RANK`` then)."""
    here = current_ranks().local_world_size
    if (hardware.distributed.local_world_size or 1) >= here:
        return hardware
    return dataclasses.replace(hardware, distributed=dataclasses.replace(
        hardware.distributed, local_world_size=here))


def _rank_sampler(size: int, dataset: Any, ranks: Ranks, training: bool,
                  seed: int | None, *, shuffle: bool) -> EpochDistributedSampler | ShardSampler:
    """This rank's share. Training: as long as every other rank's (padded), shuffled and
    reshuffled every epoch unless ``shuffle=False``, when chunked data is read as one run
    of consecutive samples per rank (each chunk on one rank). Evaluation: in order and
    unpadded (one run per rank for chunked data), or shuffled when asked."""
    if training and not shuffle and reads_chunks(dataset):
        return ChunkShuffleSampler(dataset, shuffle=False, seed=0, num_replicas=ranks.world_size,
                                   rank=ranks.rank)
    if training or shuffle:
        return EpochDistributedSampler(dataset, num_replicas=ranks.world_size, rank=ranks.rank,
                                       shuffle=shuffle, seed=seed or 0)
    return ShardSampler(size, rank=ranks.rank, world_size=ranks.world_size,
                        contiguous=reads_chunks(dataset))


def _in_order(config: LoaderConfig) -> LoaderConfig:
    """adapt=True keeps batches in sampler order: a new loader continues where one stopped."""
    if config.in_order:
        return config
    return config.replace(in_order=True, reason="adapt=True: batches in sampler order, so a "
                          "change mid-epoch continues at the first batch not delivered")


def _check_stream_ranks(dataset: Any, ranks: Ranks) -> None:
    """A stream on several ranks must split by rank: compared across ranks when a process
    group allows it (raises if they all start alike), else a warning naming the fix."""
    if isinstance(dataset, ShardedIterable) or (ranks.group and check_stream_ranks(dataset)):
        return
    _warn_once(f"{type(dataset).__name__} is an IterableDataset on {ranks.world_size} ranks "
               "that autotune could not compare across ranks (no process group, or the other "
               "ranks built no loader): each rank iterates it, so unless its __iter__ splits "
               "the items by rank every rank trains on the same data. "
               "autotune.shard_iterable(dataset) splits them by rank and worker")


def _check_ranks_tuned_for(entry: ProfileEntry, key: str | None) -> None:
    """A profile tuned with another number of ranks per host measured other contention."""
    tuned_for = entry.measured.get("local_world_size", 1)
    here = current_ranks().local_world_size
    if isinstance(tuned_for, int) and tuned_for != here:
        _warn_once(f"profile key {key!r} was tuned with {tuned_for} rank(s) on this host and "
                   f"this run has {here}: each rank's share of CPUs and memory differs, so the "
                   "tuned settings may be wrong here. Re-tune with `torchrun --nproc_per_node "
                   f"{here} -m autotune tune ...`")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Each distinct warning once per process, however many loaders are built."""
    if message not in _warned:
        _warned.add(message)
        warn_user(message)
