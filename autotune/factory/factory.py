"""``OptimalDataLoaderFactory``: settings for this machine and dataset, as a real DataLoader.

Precedence: an explicit DataLoader keyword > this host's tuned profile entry for the key >
the rules (fed a quick measurement of a few samples unless told not to measure).
Called on the class itself (seed style), each method uses a process-wide default factory.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from .._check import check_bool, check_int
from ..config import LoaderConfig
from ..errors import InvalidConfigError
from ..feed.adaptive import DEFAULT_EVERY
from ..feed.multi import MultiLoader
from ..loading.builder import TunedDataLoader
from ..profiles import Profile, ProfileEntry
from ..records import HardwareInfo, WorkloadProfile
from ..sources.splits import DEFAULT_SPLITS, split_dataset
from ..system.hardware import probe_hardware
from .group import create_group
from .pipeline import TRAINING_ONLY, LoaderPipeline, LoaderRequest


class _on_instance_or_default:  # noqa: N801  (a decorator, named like ``property``)
    """A method that, called on the class, runs on the process-wide default factory."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]  # as property wraps one

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
        """A factory; every argument is optional and keyword-only.

        Args:
            hardware: the machine to size loaders for; default: ``probe_hardware()`` of this
                process (pass a ``HardwareInfo`` to decide for another machine, or in tests).
            profile_dir: where tuned profiles are looked up; None: ``$AUTOTUNE_PROFILE_DIR``,
                else ``./profiles``.
            measure: time a few samples of each dataset before the rules decide (skipped
                when a profile entry or an explicit ``num_workers`` sets the count);
                ``False`` skips the timing, and the rules go by the hints alone.
            seed: an int >= 0 that makes every loader's batches reproducible, for any worker
                count: each epoch's order is drawn from (seed, epoch) (torch's
                ``DistributedSampler(seed=seed)`` with ``set_epoch``; each rank its share)
                unless a sampler or generator is given, and each sample's ``torch``,
                ``random`` and numpy draws are seeded from (seed, epoch, index). None: torch's
                seeding (per worker).
            device: where batches go (``"cuda:0"``), for the rules (a CUDA device gets pinned
                memory); it does not move batches (``device=`` of ``create_training_loader``
                does). None: the accelerator torch sees.
        """
        check_bool("measure", measure)
        if seed is not None:
            check_int("seed", seed, minimum=0)
        if device is not None and not isinstance(device, str):
            raise InvalidConfigError(f"device={device!r} must be a string like 'cuda:0' or None")
        if profile_dir is not None and not isinstance(profile_dir, (str, os.PathLike)):
            raise InvalidConfigError(f"profile_dir={profile_dir!r} must be a path or None")
        self.pipeline = LoaderPipeline(hardware=hardware or probe_hardware(),
                                       profile_dir=profile_dir, measure=measure, seed=seed,
                                       device=device)

    hardware = property(lambda self: self.pipeline.hardware,
                        doc="The machine the loaders are sized for.")
    profile_dir = property(lambda self: self.pipeline.profile_dir,
                           doc="Where profiles are looked up (None: the default).")
    measure = property(lambda self: self.pipeline.measure,
                       doc="Whether a few samples are timed before the rules decide.")
    seed = property(lambda self: self.pipeline.seed,
                    doc="The seed of shuffling and worker seeds (None: not seeded).")
    device = property(lambda self: self.pipeline.device,
                      doc="Where batches go, for the rules (None: what torch sees).")

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
        hints = self.pipeline.hints(dataset_size, has_augmentation, has_standardization,
                                    batch_size, training)
        entry = self.profile_entry(profile_key) if profile_key is not None else None
        return self.pipeline.resolved(hints, workload, entry, profile_key, {})

    @_on_instance_or_default
    def create_training_loader(self, dataset: Any, batch_size: int, *,
                               has_augmentation: bool = False, has_standardization: bool = False,
                               profile_key: str | None = None,
                               workload: WorkloadProfile | None = None, adapt: bool = False,
                               adapt_every: int | None = None, device: Any = None,
                               device_transform: Any = None,
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
                An ``ImageFolder`` with ``placement=None`` is measured for where to decode.
            device_transform: called on each batch once it is on ``device`` (which it needs),
                on the copy's side stream so that it overlaps the step (``DeviceLoader``'s
                ``transform``); after an ``ImageFolder``'s device decoding.
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
        return self.pipeline.create(LoaderRequest(
            dataset=dataset, batch_size=batch_size, training=True,
            has_augmentation=has_augmentation, has_standardization=has_standardization,
            profile_key=profile_key, workload=workload, overrides=dataloader_overrides,
            adapt_every=(adapt_every or DEFAULT_EVERY) if adapt else None, device=device,
            device_transform=device_transform))

    @_on_instance_or_default
    def create_validation_loader(self, dataset: Any, batch_size: int, *,
                                 has_augmentation: bool = False, has_standardization: bool = False,
                                 profile_key: str | None = None,
                                 workload: WorkloadProfile | None = None, device: Any = None,
                                 device_transform: Any = None,
                                 **dataloader_overrides: Any) -> Any:
        """In order, keeps the last partial batch, workers not held between passes
        (arguments as ``create_training_loader``, without ``adapt``). Under torch.distributed
        each rank gets every world-size-th sample (a run of consecutive ones for a chunked
        ``HDF5Dataset``: each chunk read on one rank), without the padding duplicates that
        would count some samples twice in a metric (ranks may run one batch more or less
        than another)."""
        return self.pipeline.create(LoaderRequest(
            dataset=dataset, batch_size=batch_size, training=False,
            has_augmentation=has_augmentation, has_standardization=has_standardization,
            profile_key=profile_key, workload=workload, overrides=dataloader_overrides,
            device=device, device_transform=device_transform))

    @_on_instance_or_default
    def create_dataloaders(self, dataset: Any, batch_size: int, *,
                           splits: Sequence[float | None] = DEFAULT_SPLITS, seed: int = 0,
                           **keywords: Any) -> tuple[TunedDataLoader | None, ...]:
        """(train, val, test) loaders over a reproducible split of one dataset.

        The workload is measured once, on the whole dataset, and shared by the three (an
        ``ImageFolder``'s placement is measured once; each loader measures its workload in it).
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
            keywords["workload"] = self.pipeline.measure_once(dataset, keywords)
        evaluation = {k: v for k, v in keywords.items() if k not in TRAINING_ONLY}
        return (train if train is None
                else self.create_training_loader(train, batch_size, **keywords),
                val if val is None
                else self.create_validation_loader(val, batch_size, **evaluation),
                test if test is None
                else self.create_validation_loader(test, batch_size, **evaluation))

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
                ``profile_key`` names the group's one profile entry (default: the
                datasets' class names joined by ``+``).

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
        return create_group(self.pipeline, datasets, batch_size, strategy=strategy, weights=weights,
                            stop=stop, seed=seed, keywords=keywords)

    def profile_entry(self, key: str) -> ProfileEntry | None:
        """The tuned entry for ``key`` in the profile that applies to this machine, if any.

        Args:
            key: the profile key (a dataset's class name, or what ``profile_key`` named).
        """
        return self.pipeline.profile_entry(key)

    def host_profile(self) -> Profile | None:
        """The profile that applies to this machine (its hostname's, else one whose hardware
        fingerprint matches); read once. An unusable file warns and leaves the rules."""
        return self.pipeline.host_profile()
