"""The one loader builder: the factory, every tuning trial and any later re-tuner call it, so
a trial measures exactly the loader a user gets (same dataset wrapper, worker start-up,
crash naming) and every loader has a lifecycle (``close()``, ``with``).
"""

from __future__ import annotations

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
from .epochs import AcrossEpochs, why_not_ahead
from .worker import BusyMeter, NamedErrors, NamedStreamErrors, TimedCollate


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
    where this loader cannot do that, its ``autotune_config`` turns it off and says why.

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
        self.__dict__["_autotune_across"] = self._across_epochs()

    def __iter__(self) -> Any:
        """One epoch's batches; a worker that dies raises ``WorkerCrashError`` with the likely
        fix instead of torch's bare "killed by signal: Killed" (``loading.crash``)."""
        across = self.__dict__.get("_autotune_across")
        if across is not None:
            return across.epoch(self._torch_iter)
        return self._torch_iter()

    def _torch_iter(self) -> Any:
        """torch's iterator (a persistent one is reset: what it had in flight is dropped)."""
        iterator = super().__iter__()
        if self.num_workers == 0:
            return iterator
        named = CrashNamingIterator(iterator, self.num_workers, self.prefetch_factor)
        self._started().add(named)
        return named

    @property
    def _index_sampler(self) -> Any:
        """What torch's iterator draws batches of indices from: epoch after epoch when the
        loader prefetches across epochs."""
        across = self.__dict__.get("_autotune_across")
        return across.endless if across is not None else super()._index_sampler

    def _across_epochs(self) -> AcrossEpochs | None:
        """The run across epochs, if the settings ask for it and this loader allows it."""
        config = self.autotune_config
        if config is None or not config.prefetch_across_epochs:
            return None
        missing = ("off: a stream keeps its own epochs" if is_stream(self.dataset) else
                   across_epochs_needs(config) or why_not_ahead(self))
        if missing is not None:
            self.autotune_config = config.replace(prefetch_across_epochs=False, reason=missing)
            return None
        return AcrossEpochs(self.batch_sampler)

    def close(self) -> None:
        """Stop this loader's worker processes now (idempotent). An epoch still running in
        this thread then raises instead of ending early; do not close a loader that another
        thread is iterating (torch's iterator would wait for workers that are gone)."""
        across = self.__dict__.get("_autotune_across")
        if across is not None:
            across.stop()
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
                 meter: BusyMeter | None = None) -> TunedDataLoader:
    """A ``TunedDataLoader`` over ``dataset`` with ``config``'s settings.

    ``extra`` holds DataLoader keywords that are not settings (``collate_fn``, ``sampler``,
    ``generator``, ...); a ``worker_init_fn`` there runs after autotune's own.
    With a ``batch_sampler`` it decides batching, order and the last batch itself.
    An ``IterableDataset`` decides its own order: ``shuffle`` does not apply to it. A chunked
    ``HDF5Dataset`` is shuffled by a ``ChunkShuffleSampler`` (``loading.chunked``).
    A ``meter`` adds up the seconds the workers spend making and collating batches.
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
        wrapped = (NamedStreamErrors if stream else NamedErrors)(dataset, meter)
        loader = TunedDataLoader(wrapped, autotune_config=config, **kwargs, **extra)
    except (TypeError, ValueError) as exc:  # torch's own checks of the keywords it was given
        raise InvalidConfigError(f"DataLoader refused these keywords: {exc}") from exc
    return loader

