"""The one loader builder: the factory, every tuning trial and any later re-tuner call it, so
a trial measures exactly the loader a user gets (same dataset wrapper, worker start-up,
crash naming) and every loader has a lifecycle (``close()``, ``with``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import Any

from torch.utils.data import DataLoader, default_collate

from .._check import is_stream
from .._lifecycle import Closeable
from ..config import EXPLICIT, LoaderConfig
from ..errors import InvalidConfigError
from ..policy.rules import across_epochs_needs
from .chunked import WorkerCache, chunk_sampler, reads_chunks
from .crash import CrashNamingIterator
from ..policy.epochs import changed
from .epochs import EpochRun, Indices, StreamRun, why_not_ahead
from .inputs import dataset_summary
from .worker import BusyMeter, NamedErrors, NamedStreamErrors, TimedCollate

log = logging.getLogger("autotune.loading")


class TunedDataLoader(Closeable, DataLoader):
    """A plain ``DataLoader`` that remembers its ``LoaderConfig`` (``.autotune_config``) and
    releases its workers when told to.

    Its ``dataset`` is the caller's, wrapped so that an exception names the sample's index
    (``loader.dataset.dataset`` is the original; other attributes pass through).

    ``close()`` (or leaving a ``with`` block) stops every worker process this loader
    started, persistent ones included, at once rather than whenever the garbage collector
    gets to them; iterating again afterwards starts fresh workers. Re-creating loaders in a
    loop therefore does not pile up processes.

    torch's warning about more workers than CPUs is kept for a count the caller set
    explicitly; for a count the rules, a profile or a trial chose it is the point (waiting
    data), and ``explain()`` says why.

    With ``prefetch_across_epochs`` (the rules' default for training) one torch iterator runs
    on from epoch to epoch, so the workers never idle at a boundary (``loading.epochs``);
    where this loader cannot do that, its ``autotune_config`` turns it off and says why. An
    epoch drawn ahead is the one torch would draw at ``iter()``, or it is drawn again
    (``loading.draws``); persistent workers start again when the dataset changed since they
    copied it (``restart_if_changed``). ``state_dict()`` / ``load_state_dict()`` resume
    mid-epoch.

    Args:
        dataset: the dataset, as ``DataLoader`` takes it (``build_loader`` passes the
            caller's wrapped, see above).
        args: passed to torch's ``DataLoader`` (``batch_size``, ``shuffle``, ...).
        autotune_config: the ``LoaderConfig`` the loader was built from, kept as
            ``.autotune_config``; a keyword, so that code re-creating the loader from its
            arguments (Lightning adding a sampler) keeps it. None: not built by autotune,
            so torch's worker-count warning applies as usual.
        kwargs: passed to torch's ``DataLoader``.

    Example::

        with factory.create_training_loader(dataset, batch_size=64) as loader:
            for batch in loader:
                ...
    """

    autotune_config: LoaderConfig | None = None

    def __init__(self, dataset: Any, *args: Any, autotune_config: LoaderConfig | None = None,
                 **kwargs: Any) -> None:
        # a keyword, so that what re-creates the loader from its arguments (Lightning adding
        # a sampler) keeps it; set first: DataLoader.__init__ already checks worker counts
        self.autotune_config = autotune_config
        super().__init__(dataset, *args, **kwargs)
        epochs = self.__dict__["_autotune_epochs"] = self._epoch_run()
        self.__dict__["_autotune_stream"] = StreamRun(self._user_dataset(), self.num_workers) \
            if is_stream(self.dataset) else None
        self.__dict__["_autotune_indices"] = Indices(epochs) if epochs is not None else None

    def __iter__(self) -> Any:
        """One epoch's batches; a worker that dies raises ``WorkerCrashError`` with the likely
        fix instead of torch's bare "killed by signal: Killed" (``loading.crash``)."""
        self.restart_if_changed()
        epochs = self.__dict__.get("_autotune_epochs")
        if epochs is not None:
            return epochs.epoch(self._torch_iter)
        if self.__dict__.get("_autotune_stream") is not None:
            return self.__dict__["_autotune_stream"].epoch(self._torch_iter)
        return self._torch_iter()

    def _torch_iter(self) -> Any:
        """torch's iterator (a persistent one is reset: what it had in flight is dropped)."""
        if self.num_workers > 0 and self.persistent_workers and self._iterator is None:
            # what the workers will copy, read before they fork: after it, reading the
            # dataset here would copy the memory pages they share with this process
            self.__dict__["_autotune_copied"] = dataset_summary(self._user_dataset())
        iterator = super().__iter__()
        if self.num_workers == 0:
            return iterator
        named = CrashNamingIterator(iterator, self.num_workers, self.prefetch_factor)
        self._started().add(named)
        return named

    @property
    def _index_sampler(self) -> Any:
        """What torch's iterator draws batches of indices from: this loader's epochs
        (``loading.epochs``), epoch after epoch when it prefetches across them."""
        indices = self.__dict__.get("_autotune_indices")
        return indices if indices is not None else super()._index_sampler

    def _epoch_run(self) -> EpochRun | None:
        """The epochs of a map-style loader with a batch sampler, drawn ahead if the settings
        ask for it and this loader allows it."""
        config, ahead = self.autotune_config, False
        if is_stream(self.dataset) or self.batch_sampler is None:
            if config is not None and config.prefetch_across_epochs:
                self.autotune_config = config.replace(prefetch_across_epochs=False, reason=(
                    "off: a stream keeps its own epochs" if is_stream(self.dataset)
                    else why_not_ahead(self)))
            return None
        if config is not None and config.prefetch_across_epochs:
            missing = across_epochs_needs(config) or why_not_ahead(self)
            if missing is not None:
                self.autotune_config = config.replace(prefetch_across_epochs=False,
                                                      reason=missing)
            ahead = missing is None
        seeded = isinstance(self.dataset, NamedErrors) and self.dataset.seed is not None
        return EpochRun(self.batch_sampler, self._user_dataset(), ahead=ahead, tag=seeded)

    def _user_dataset(self) -> Any:
        dataset = self.dataset
        return dataset.dataset if isinstance(dataset, (NamedErrors, NamedStreamErrors)) \
            else dataset

    def restart_if_changed(self) -> bool:
        """Persistent workers hold the dataset as it was when they started: if it changed
        since (``policy.epochs.changed``), stop them, so the epoch starts new ones that copy
        it as it is now, as torch's default loader does at every epoch. True: stopped."""
        copied = self.__dict__.get("_autotune_copied")
        if copied is None or self._iterator is None:
            return False
        now = dataset_summary(self._user_dataset())
        names = changed(copied, now)
        if not names:
            return False
        epochs = self.__dict__.get("_autotune_epochs")
        epoch = epochs.number + 1 if epochs is not None else None
        what = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        restarts = self.__dict__.get("_autotune_restarts", 0) + 1
        self.__dict__["_autotune_restarts"] = restarts
        log.info("autotune: the dataset changed (%s) since the workers started: restarting "
                 "them before epoch %s", what, epoch)
        if self.autotune_config is not None:
            self.autotune_config = self.autotune_config.noted(workers_restarted=(
                f"{restarts} time(s) for a dataset change, last before epoch {epoch} "
                f"({what} changed): persistent workers hold a copy of the dataset"))
        self.close()
        return True

    def state_dict(self, *, unreceived: int = 0) -> dict[str, Any]:
        """Where the consumer stands, as plain data (torchdata's ``StatefulDataLoader``
        protocol): the epoch, the batches of it received, what decides its order. No sample
        data; ``torch.save`` and YAML can hold it. ``unreceived``: batches handed to a
        wrapper that holds them ahead (``DeviceLoader``), not received yet."""
        run = self.__dict__.get("_autotune_epochs") or self.__dict__.get("_autotune_stream")
        if run is None:
            raise InvalidConfigError(
                "state_dict() needs batches drawn by a batch sampler (or a stream); this "
                f"loader has batch_size={self.batch_size} and no batch_sampler")
        return run.state(unreceived)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``'s ``state``: the next ``iter()`` yields the rest of
        the saved epoch (the delivered indices are skipped, not loaded), then whole epochs.
        A state from another dataset length, batch size or sampler is an
        ``InvalidConfigError`` naming both."""
        run = self.__dict__.get("_autotune_epochs") or self.__dict__.get("_autotune_stream")
        if run is None:
            self.state_dict()  # raises, naming why
            raise AssertionError("state_dict() raises for a loader without epochs")
        if not isinstance(state, Mapping):
            raise InvalidConfigError(f"state={state!r:.80} is not a state_dict(): pass the "
                                     "dict that state_dict() returned")
        run.load(state)

    def close(self) -> None:
        """Stop this loader's worker processes now (idempotent). An epoch still running in
        this thread then raises instead of ending early; do not close a loader that another
        thread is iterating (torch's iterator would wait for workers that are gone).
        Between epochs it is also how to make persistent workers copy the dataset again
        after a change autotune cannot see (a file rewritten on disk)."""
        epochs = self.__dict__.get("_autotune_epochs")
        if epochs is not None:
            epochs.stop()
        self.__dict__.pop("_autotune_copied", None)
        for iterator in list(self._started()):
            iterator.close()
        persistent = getattr(self, "_iterator", None)
        if persistent is not None:
            shutdown = getattr(persistent, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None

    def _started(self) -> weakref.WeakSet[Any]:
        """The multi-process iterators this loader made that are still alive."""
        started = self.__dict__.get("_autotune_started")
        if started is None:
            started = self.__dict__["_autotune_started"] = weakref.WeakSet()
        return started

    def check_worker_number_rationality(self) -> None:
        config = self.autotune_config
        if config is None or (config.source == "override"
                              and config.reasons.get("num_workers") == EXPLICIT):
            super().check_worker_number_rationality()


def build_loader(dataset: Any, batch_size: int, config: LoaderConfig, *, shuffle: bool,
                 extra: Mapping[str, Any] | None = None,
                 meter: BusyMeter | None = None, seed: int | None = None) -> TunedDataLoader:
    """A ``TunedDataLoader`` over ``dataset`` with ``config``'s settings.

    ``extra`` holds DataLoader keywords that are not settings (``collate_fn``, ``sampler``,
    ``generator``, ...); a ``worker_init_fn`` there runs after autotune's own.
    With a ``batch_sampler`` it decides batching, order and the last batch itself.
    An ``IterableDataset`` decides its own order: ``shuffle`` does not apply to it. A chunked
    ``HDF5Dataset`` is shuffled by a ``ChunkShuffleSampler`` (``loading.chunked``).
    A ``meter`` adds up the seconds the workers spend making and collating batches.
    A ``seed`` seeds each sample of a map-style dataset from (seed, epoch, index)
    (``loading.seeding``): the same samples whatever the worker count.
    """
    extra = dict(extra or {})
    stream = is_stream(dataset)
    if stream:
        given = sorted({"sampler", "batch_sampler"} & set(extra))
        if given:
            raise InvalidConfigError(
                f"{given[0]}= was given for an IterableDataset ({type(dataset).__name__}), "
                "which decides its own order: shuffle or shard inside its __iter__ instead")
    if (extra.get("shuffle", shuffle) and not ({"sampler", "batch_sampler"} & set(extra))
            and reads_chunks(dataset)):
        extra.pop("shuffle", None)
        extra["sampler"] = chunk_sampler(dataset, batch_size, config.num_workers,
                                         generator=extra.get("generator"))
    init = extra.pop("worker_init_fn", None)
    if reads_chunks(dataset) and config.num_workers > 0:
        init = WorkerCache(dataset.cache_bytes, dataset.cache_reason, init)
    kwargs = config.dataloader_kwargs(worker_init_fn=init)
    if "batch_sampler" in extra:
        kwargs.pop("drop_last")
    else:
        kwargs["batch_size"] = batch_size
        if "sampler" not in extra and not stream:
            extra.setdefault("shuffle", shuffle)
    if meter is not None and kwargs.get("batch_size", 1) is not None:  # batches are collated
        extra["collate_fn"] = TimedCollate(extra.get("collate_fn") or default_collate, meter)
    try:
        wrapped = NamedStreamErrors(dataset, meter) if stream else \
            NamedErrors(dataset, meter, seed=seed)
        loader = TunedDataLoader(wrapped, autotune_config=config, **kwargs, **extra)
    except (TypeError, ValueError) as exc:  # torch's own checks of the keywords it was given
        raise InvalidConfigError(f"DataLoader refused these keywords: {exc}") from exc
    return loader

