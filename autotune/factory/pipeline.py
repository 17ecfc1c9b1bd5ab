"""The one loader pipeline: request -> resolve -> sampler -> checks -> build -> feed.

Every loader the factory hands out comes through ``LoaderPipeline.create``: one loader
(``create_training_loader``, ``create_validation_loader``) and each member of a group
(``create_training_loaders``, which passes its share of the machine or its part of a tuned
group entry). The factory is the public face; this is its state (hardware, profile, seed)
and its steps, public inside the package so that the group path calls them too.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from .._check import check_bool, check_int, dataset_size, is_stream
from .._warn import warn_user
from ..config import SETTINGS, LoaderConfig
from ..errors import InvalidConfigError, ProfileError
from ..feed.adaptive import AdaptiveLoader
from ..feed.device import DeviceLoader, check_device
from ..loading.builder import build_loader
from ..loading.chunked import chunk_sampler, fit_chunks, reads_chunks, sampler_note
from ..loading.safety import (check_stream_ranks, check_stream_sharding, check_worker_safety,
                              copy_on_read_risks)
from ..measure.workload import measure_workload
from ..policy import joint, rules
from ..policy.placement import Placement
from ..policy.resolve import check_yields_a_batch, resolve
from ..profiles import Profile, ProfileEntry, check_key, dataset_key, find_profile
from ..records import HardwareInfo, WorkloadProfile
from ..sources.chunk_sampler import ChunkShuffleSampler
from ..sources.images import ImageFolder, image_folder_in, with_images
from ..sources.samplers import EpochDistributedSampler, ShardSampler
from ..sources.sharding import ShardedIterable
from ..system.distributed import Ranks, current_ranks
from .placing import place_images

log = logging.getLogger("autotune.factory")

TRAINING_ONLY = ("adapt", "adapt_every")  # create_training_loader's own keywords

# Keywords passed straight to DataLoader (everything it takes that is not ours to choose).
PASS_THROUGH = frozenset(inspect.signature(DataLoader.__init__).parameters) - {
    "self", "dataset", "batch_size", *SETTINGS}


@dataclass(frozen=True, kw_only=True)
class LoaderRequest:
    """One loader as the caller asked for it.

    ``overrides`` are DataLoader keywords (the pipeline takes the settings out of them).
    A group member comes with ``look_up=False`` and its part of the group's tuned entry
    (``entry``) or its share of the machine (``share``), instead of ``profile_key``'s entry.
    """

    dataset: Any
    batch_size: int
    training: bool
    has_augmentation: bool = False
    has_standardization: bool = False
    profile_key: str | None = None
    workload: WorkloadProfile | None = None
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    adapt_every: int | None = None
    device: Any = None
    device_transform: Any = None
    look_up: bool = True
    entry: ProfileEntry | None = None
    share: joint.Share | None = None


class LoaderPipeline:
    """The factory's state and the steps every loader goes through."""

    def __init__(self, *, hardware: HardwareInfo, profile_dir: str | os.PathLike[str] | None,
                 measure: bool, seed: int | None, device: str | None) -> None:
        self.hardware = hardware
        self.profile_dir = profile_dir
        self.measure = measure
        self.seed = seed
        self.device = device
        self._profile: Profile | None = None
        self._profile_file: os.PathLike[str] | None = None
        self._profile_read = False

    def hardware_here(self) -> HardwareInfo:
        """This machine as this rank shares it, read live: Lightning's launcher sets no
        ``LOCAL_WORLD_SIZE``, and a probe may predate the launch (``current_ranks`` counts
        the ranks on this host from ``WORLD_SIZE`` and ``LOCAL_RANK`` then)."""
        here = current_ranks().local_world_size
        if (self.hardware.distributed.local_world_size or 1) >= here:
            return self.hardware
        return dataclasses.replace(self.hardware, distributed=dataclasses.replace(
            self.hardware.distributed, local_world_size=here))

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

    def profile_entry(self, key: str) -> ProfileEntry | None:
        """The tuned entry for key in the profile that applies to this machine, if any."""
        check_key(key)
        profile = self.host_profile()
        return profile.loaders.get(key) if profile is not None else None

    def hints(self, dataset_size: int | None, has_augmentation: bool,
              has_standardization: bool, batch_size: int | None, training: bool,
              stream: bool = False, device: str | None = None) -> rules.DatasetHints:
        """What the caller said about the data, as the rules read it."""
        check_bool("has_augmentation", has_augmentation)
        check_bool("has_standardization", has_standardization)
        return rules.DatasetHints(
            dataset_size=dataset_size, batch_size=batch_size, has_augmentation=has_augmentation,
            has_standardization=has_standardization, training=training,
            device=device or self.device, stream=stream)

    def needs_measuring(self, entry: ProfileEntry | None, explicit: Mapping[str, Any]) -> bool:
        """The rules need a measurement unless a profile entry or the caller sets workers."""
        return self.measure and entry is None and "num_workers" not in explicit

    def measure_once(self, dataset: Any, keywords: Mapping[str, Any]) -> WorkloadProfile | None:
        """The measurement the loaders for ``dataset`` would each take, taken once."""
        key = keywords.get("profile_key")
        entry = self.profile_entry(check_key(key) if key is not None else dataset_key(dataset))
        if not self.needs_measuring(entry, keywords) or image_folder_in(dataset) is not None:
            return None  # an ImageFolder's cost depends on its placement: each loader measures
        return measure_workload(dataset, collate_fn=keywords.get("collate_fn"))

    def entry_reason(self, entry: ProfileEntry, key: str | None) -> str:
        """Why a profile entry applies here (``explain()`` shows it)."""
        _check_ranks_tuned_for(entry, key)
        reason = entry.reason(key)
        if self._profile_file is not None:
            reason += f" in {self._profile_file}"
        return reason

    def resolved(self, hints: rules.DatasetHints, workload: WorkloadProfile | None,
                 entry: ProfileEntry | None, key: str | None, explicit: Mapping[str, Any],
                 **inputs: Any) -> LoaderConfig:
        """``policy.resolve`` for this machine and profile (``inputs``: its other inputs)."""
        return resolve(self.hardware_here(), hints, workload,
                       entry=entry.settings if entry is not None else None,
                       entry_reason=self.entry_reason(entry, key) if entry is not None
                       else "tuned", explicit=explicit, **inputs)

    def create(self, request: LoaderRequest) -> Any:
        """The loader for ``request``: a ``TunedDataLoader``, an ``AdaptiveLoader`` with
        ``adapt_every``, either in a ``DeviceLoader`` with ``device``."""
        req = request
        check_int("batch_size", req.batch_size, minimum=1)
        if req.workload is not None and not isinstance(req.workload, WorkloadProfile):
            raise InvalidConfigError(f"workload={req.workload!r} must be a WorkloadProfile "
                                     "(from autotune.measure_workload) or None")
        target = check_device(req.device) if req.device is not None else None
        if req.device_transform is not None:
            if not callable(req.device_transform):
                raise InvalidConfigError(f"device_transform={req.device_transform!r} is not "
                                         "callable: pass a function of one batch, or None")
            if target is None:
                raise InvalidConfigError("device_transform= runs on the device the batches go "
                                         "to: pass device= too (\"cuda\", or \"cpu\")")
        overrides = dict(req.overrides)
        if not req.training and set(overrides) & set(TRAINING_ONLY):
            raise InvalidConfigError(
                f"{sorted(set(overrides) & set(TRAINING_ONLY))[0]}= is for training loaders "
                "only (create_training_loader): evaluation keeps its settings")
        unknown = set(overrides) - PASS_THROUGH - set(SETTINGS)
        if unknown:
            raise InvalidConfigError(
                f"unknown keyword(s) {sorted(unknown)}: DataLoader takes "
                f"{', '.join(sorted(PASS_THROUGH | set(SETTINGS)))}")
        dataset = req.dataset
        size = dataset_size(dataset, who="the factory")
        explicit = {k: overrides.pop(k) for k in SETTINGS if k in overrides}
        LoaderConfig(**explicit)  # a bad keyword fails now, not after measuring
        ranks = current_ranks()
        stream = is_stream(dataset)
        ordered = "sampler" in overrides or "batch_sampler" in overrides
        chunked = (req.training and not ordered and overrides.get("shuffle", True)
                   and reads_chunks(dataset))
        if chunked and ranks.distributed:
            assert size is not None  # chunked data is map-style: it has a length
            size = math.ceil(size / ranks.world_size)  # this rank's share of the chunk order
        elif ranks.distributed and not stream and not ordered:
            # the sampler orders the rank's share: an explicit shuffle= goes to it
            assert size is not None  # not a stream
            overrides["sampler"] = _rank_sampler(
                size, dataset, ranks, req.training, self.seed,
                shuffle=bool(overrides.pop("shuffle", req.training)))
            size = len(overrides["sampler"])
        elif self.seed is not None and not stream and not ordered and not chunked \
                and "generator" not in overrides and overrides.get("shuffle", req.training):
            # each epoch's order from (seed, epoch), whatever drew from a generator before
            overrides.pop("shuffle", None)
            overrides["sampler"] = EpochDistributedSampler(
                dataset, num_replicas=1, rank=0, shuffle=True, seed=self.seed)
        placement, images = None, image_folder_in(dataset)
        if images is not None:  # before measuring: the placement sets a sample's cost
            collate_given = "collate_fn" in overrides
            placement = place_images(images, target, self.hardware_here().cpu_budget,
                                     collate_given=collate_given)
            # this loader's own copy; uint8 until the batch, normalised where it lands
            images = images.placed(placement, normalised_in="sample" if collate_given
                                   else "collate" if target is None else "device")
            dataset = with_images(dataset, images)
            if not collate_given:
                overrides["collate_fn"] = images.collate
        hints = self.hints(size, req.has_augmentation, req.has_standardization, req.batch_size,
                           req.training, stream=stream,
                           device=None if target is None else str(target))
        key = check_key(req.profile_key) if req.profile_key is not None else dataset_key(dataset)
        entry = self.profile_entry(key) if req.look_up else req.entry
        workload = req.workload
        adaptive = req.adapt_every is not None
        # the re-tuner reads a sample's computing share from it, whoever set the workers
        if workload is None and (self.needs_measuring(entry, explicit)
                                 or (adaptive and self.measure and not stream)):
            workload = measure_workload(dataset, collate_fn=overrides.get("collate_fn"))
        if workload is not None and images is not None and placement is not None \
                and adaptive and _decodes_on_device(placement, adaptive=True):
            # a move to the CPUs brings decoded samples: batches in flight sized for them
            workload = dataclasses.replace(workload, sample_bytes=max(
                workload.sample_bytes, images.decoded_bytes))
        config = self.resolved(hints, workload, entry, key, explicit, share=req.share,
                               adaptive=adaptive)
        config = fit_chunks(dataset, config, self.hardware_here())
        if chunked:
            overrides.pop("shuffle", None)  # the sampler shuffles (DataLoader takes one)
            overrides["sampler"] = chunk_sampler(dataset, req.batch_size, config.num_workers,
                                                 seed=self.seed)
            config = config.noted(sampler=sampler_note(overrides["sampler"]))
        if placement is not None and images is not None:
            config = config.noted(placement=f"{placement.where}: {placement.reason}",
                                  images=_images_note(images, target))
        if not ordered and size is not None:
            check_yields_a_batch(config, size, req.batch_size)
        log.info("DataLoader for %s:\n%s", key, config.explain())
        if config.num_workers > 0:
            self.check_workers(dataset, config, overrides, workload, hints)
        if stream and ranks.distributed:
            _check_stream_ranks(dataset, ranks)
        if self.seed is not None and "generator" not in overrides:
            # worker seeds differ across ranks; a DistributedSampler orders by its own seed
            overrides["generator"] = torch.Generator().manual_seed(self.seed + ranks.rank)
        if type(overrides.get("sampler")) is EpochDistributedSampler \
                and overrides["sampler"].num_replicas == 1:
            config = config.noted(sampler=(
                f"seed={self.seed}: each epoch's order drawn from (seed, epoch), as torch's "
                "DistributedSampler(num_replicas=1) with set_epoch(epoch)"))
        if self.seed is not None and not stream:
            config = config.noted(seeding=(
                f"seed={self.seed}: each sample's torch, random and numpy draws seeded from "
                "(seed, epoch, index): the same batches for any worker count"))
        if req.adapt_every is None:
            loader: Any = build_loader(dataset, req.batch_size, config, shuffle=req.training,
                                       extra=overrides, seed=self.seed)
        else:
            loader = self._adaptive(req, dataset, config, hints, workload, explicit,
                                    overrides, key, entry)
        if target is None:
            return loader
        steps: list[Callable[[Any], Any]] = []
        if images is not None and placement is not None:
            if _decodes_on_device(placement, adaptive=req.adapt_every is not None):
                steps.append(images.device_transform(target))
            elif images.normalised_in == "device" and images.output == "float":
                steps.append(images.normalise_on(target))
        steps += [req.device_transform] if req.device_transform is not None else []
        return DeviceLoader(loader, target, transform=_chained(steps))

    def _adaptive(self, req: LoaderRequest, dataset: Any, config: LoaderConfig,
                  hints: rules.DatasetHints, workload: WorkloadProfile | None,
                  explicit: Mapping[str, Any], overrides: dict[str, Any], key: str,
                  entry: ProfileEntry | None) -> AdaptiveLoader:
        """An ``AdaptiveLoader`` over ``dataset`` (an ``ImageFolder`` placed already)
        starting at ``config``; each count it moves to is resolved as a count chosen while
        training runs (``policy.resolve``'s ``workers``)."""
        hardware = self.hardware_here()

        def configure(workers: int) -> LoaderConfig:
            config = self.resolved(hints, workload, entry, key, explicit, workers=workers,
                                   adaptive=True)
            return fit_chunks(dataset, config, hardware)  # each process's cache, for this many

        def check(candidate: LoaderConfig) -> None:
            self.check_workers(dataset, candidate, overrides, workload, hints)

        return AdaptiveLoader(dataset, req.batch_size, config, configure=configure,
                              cap=rules.max_workers(hardware, hints, workload),
                              hardware=hardware, extra=overrides,
                              shuffle=overrides.pop("shuffle", True), key=key,
                              check_workers=check, every=req.adapt_every or 1,
                              profile_dir=self.profile_dir, device=hints.device,
                              workload=workload, seed=self.seed)

    def check_workers(self, dataset: Any, config: LoaderConfig, extra: Mapping[str, Any],
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
            warn_once(f"{risk}: every worker copies the memory pages it reads from it, so "
                      "memory grows with workers and epochs (copy-on-read). Store it as a "
                      "numpy array (or pyarrow/pandas column) instead")
        workers = config.num_workers if config.source != "rules" else None
        shm = rules.shm_warning(self.hardware_here(), hints, workload, workers=workers)
        if shm is not None:
            warn_once(shm)


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


def _check_stream_ranks(dataset: Any, ranks: Ranks) -> None:
    """A stream on several ranks must split by rank: compared across ranks when a process
    group allows it (raises if they all start alike), else a warning naming the fix."""
    if isinstance(dataset, ShardedIterable) or (ranks.group and check_stream_ranks(dataset)):
        return
    warn_once(f"{type(dataset).__name__} is an IterableDataset on {ranks.world_size} ranks "
              "that autotune could not compare across ranks (no process group, or the other "
              "ranks built no loader): each rank iterates it, so unless its __iter__ splits "
              "the items by rank every rank trains on the same data. "
              "autotune.shard_iterable(dataset) splits them by rank and worker")


def _check_ranks_tuned_for(entry: ProfileEntry, key: str | None) -> None:
    """A profile tuned with another number of ranks per host measured other contention."""
    tuned_for = entry.measured.get("local_world_size", 1)
    here = current_ranks().local_world_size
    if isinstance(tuned_for, int) and tuned_for != here:
        warn_once(f"profile key {key!r} was tuned with {tuned_for} rank(s) on this host and "
                  f"this run has {here}: each rank's share of CPUs and memory differs, so the "
                  "tuned settings may be wrong here. Re-tune with `torchrun --nproc_per_node "
                  f"{here} -m autotune tune ...`")


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Each distinct warning once per process, however many loaders are built."""
    if message not in _warned:
        _warned.add(message)
        warn_user(message)


def _decodes_on_device(placement: Placement, *, adaptive: bool) -> bool:
    """Whether the device may decode some of an ``ImageFolder``'s batches: the placement
    says so, or a re-tuner may move it there (it was measured with a device decoder). Such
    a loader packs its batches with ``ImageFolder.collate`` and finishes them on the device
    (a batch the workers decoded passes through)."""
    return placement.where != "cpu" or (adaptive and placement.device_rate is not None)


def _images_note(images: ImageFolder, target: torch.device | None) -> str:
    """Where an ``ImageFolder``'s images are normalised, for ``explain()``."""
    if images.output == "uint8":
        return "output='uint8': batches of the resized pixels, not normalised"
    if images.normalised_in == "device":
        return (f"uint8 from the workers, normalised on {target} (a quarter of the bytes to "
                "share and copy)")
    if images.normalised_in == "collate":
        return "uint8 until the batch, normalised a batch at once in the worker"
    return "normalised in each sample (a collate_fn was given)"


def _chained(steps: list[Callable[[Any], Any]]) -> Callable[[Any], Any] | None:
    """One transform doing ``steps`` in order (``None`` for none)."""
    if len(steps) <= 1:
        return steps[0] if steps else None

    def chained(batch: Any) -> Any:
        for step in steps:
            batch = step(batch)
        return batch

    return chained
