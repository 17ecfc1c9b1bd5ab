"""How the factory and the builder read chunked data (``HDF5Dataset``).

A chunked dataset that is not preloaded is shuffled by ``ChunkShuffleSampler`` (whole
chunks, a window at a time, each worker its own stripe) and each reading process gets a
cache of one window of blocks, within the memory budget (``policy.chunks``). A preloaded
one is plain random access: torch's own shuffling is right for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Subset, get_worker_info

from .._warn import warn_user
from ..config import LoaderConfig
from ..policy import chunks
from ..records import HardwareInfo
from ..sources.chunk_sampler import ChunkShuffleSampler
from ..sources.hdf5 import HDF5Dataset
from .safety import start_method


def reads_chunks(dataset: Any) -> bool:
    """An ``HDF5Dataset`` read from its files (not preloaded)."""
    return isinstance(dataset, HDF5Dataset) and not dataset.preloaded


def fit_chunks(dataset: Any, config: LoaderConfig, hardware: HardwareInfo) -> LoaderConfig:
    """Size the dataset's cache for ``config``'s readers (unless its caller sized it) and say
    how the data is read in ``config``'s notes."""
    if isinstance(dataset, Subset) and reads_chunks(dataset.dataset):
        warn_user("a Subset of a chunked HDF5Dataset (a split) is read sample by sample in "
                  "the Subset's order: shuffled, every sample decompresses a whole chunk. "
                  "Split by files instead (one HDF5Dataset per split), or preload=True")
    if not isinstance(dataset, HDF5Dataset):
        return config
    if dataset.preloaded:
        _check_shared_memory(dataset, config, hardware)
        return config.noted(preload=f"preloaded: {dataset.preload_reason}")
    plan = chunks.cache_plan(hardware, workers=config.num_workers,
                             block_bytes=dataset.block_bytes,
                             blocks=len(dataset.chunk_ranges),
                             cache_bytes=dataset.cache_bytes
                             if dataset.cache_set_explicitly else None)
    if not dataset.cache_set_explicitly:
        dataset.set_cache_bytes(plan.cache_bytes, plan.reason)
    if plan.warning is not None:
        warn_user(plan.warning)
    return config.noted(preload=f"not preloaded: {dataset.preload_reason}",
                        cache_bytes=f"{dataset.cache_bytes / 1e6:,.1f} MB per reading "
                                    f"process: {dataset.cache_reason}")


def _check_shared_memory(dataset: HDF5Dataset, config: LoaderConfig,
                         hardware: HardwareInfo) -> None:
    """Workers that are not forked receive preloaded data through /dev/shm: warn when it
    cannot hold it (the workers would die of a bus error or "No space left on device")."""
    free = hardware.memory.shm_free_bytes
    method = start_method(config.multiprocessing_context)
    if config.num_workers == 0 or method == "fork" or free is None or dataset.nbytes <= free:
        return
    warn_user(f"the preloaded HDF5Dataset ({dataset.nbytes / 1e9:,.2f} GB) reaches {method} "
              f"workers through /dev/shm, which has {free / 1e9:,.2f} GB free: the workers "
              "would fail. Use multiprocessing_context='fork', num_workers=0 (preloaded "
              "samples are cheap), preload=False, or a larger /dev/shm")


class WorkerCache:
    """Part of a chunked loader's ``worker_init_fn``: its workers' caches get the size the
    dataset had when this loader was built, whatever another loader over the same dataset
    planned since (a validation loader's, a re-tuned count's). Then ``user_fn``."""

    def __init__(self, nbytes: int, reason: str,
                 user_fn: Callable[[int], Any] | None = None) -> None:
        self.nbytes, self.reason, self.user_fn = nbytes, reason, user_fn

    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        if info is not None:  # the loader's wrapper passes the call on to the HDF5Dataset
            resize = getattr(info.dataset, "set_cache_bytes", None)
            if resize is not None:
                resize(self.nbytes, self.reason)
        if self.user_fn is not None:
            self.user_fn(worker_id)

    def __repr__(self) -> str:
        return f"WorkerCache({self.nbytes}, user_fn={self.user_fn!r})"


def window(dataset: HDF5Dataset) -> int:
    """The chunks to shuffle together: as many blocks as the cache holds, at most the
    default window."""
    return max(1, min(chunks.DEFAULT_WINDOW, dataset.cache_bytes // max(1, dataset.block_bytes)))


def chunk_sampler(dataset: HDF5Dataset, batch_size: int, workers: int, *,
                  seed: int | None = None, generator: torch.Generator | None = None
                  ) -> ChunkShuffleSampler:
    """The training order for ``dataset`` (this rank's share when there are ranks); its seed
    is ``seed``, else drawn from ``generator``, else from torch's global generator."""
    if seed is None and generator is not None:
        seed = int(torch.randint(0, 2**62, (), generator=generator).item())
    return ChunkShuffleSampler(dataset, window=window(dataset), seed=seed,
                               batch_size=batch_size, num_workers=workers)


def sampler_note(sampler: ChunkShuffleSampler) -> str:
    """For ``explain()``: what the chunk order is and what it trades."""
    stripes = (f"; each of the {sampler.num_workers} workers reads its own chunks"
               if sampler.num_workers > 1 else "")
    return (f"ChunkShuffleSampler(window={sampler.window}): chunk order shuffled, then samples "
            f"within windows of {sampler.window} chunks, so each chunk is decompressed once "
            f"per epoch (a batch mixes up to {sampler.window} chunks){stripes}")
