"""Rules for chunked data (``HDF5Dataset``): preload it or not, and how big a chunk cache.

Pure: the caller passes the hardware and the dataset's sizes. A chunked file read in
``ChunkShuffleSampler`` order needs a cache of ``window`` blocks in every process that
reads (each worker holds its own): then each chunk is decompressed once per epoch. Data
that fits in a fraction of the memory this rank may use is better preloaded: a sample is
then an array lookup, and forked workers share the pages.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import HardwareInfo
from .rules import _mb, ranks_here

PRELOAD_FRACTION = 0.5  # preload when the decoded data fits in this share of this rank's RAM
CACHE_FRACTION = 0.10  # the chunk caches of a rank's processes may take this share of RAM
DEFAULT_WINDOW = 8  # chunks shuffled together (ChunkShuffleSampler's default)


def preload(hw: HardwareInfo, nbytes: int) -> tuple[bool, str]:
    """Preload when the decoded data fits in ``PRELOAD_FRACTION`` of the RAM this rank may
    use (the smaller of the host's available memory and the cgroup limit, shared by the
    ranks on this host: each rank holds its own copy)."""
    available = hw.memory.available_bytes
    if available is None:
        return False, ("available memory unknown: not preloaded; whole chunks are read "
                       "through a per-process cache")
    ranks = ranks_here(hw)
    room = int(available * PRELOAD_FRACTION) // ranks
    where = f"{_gb(available)} available"
    if hw.memory.limit_bytes is not None:
        where += f" (cgroup limit {_gb(hw.memory.limit_bytes)})"
    share = f"{PRELOAD_FRACTION:.0%} of {where}" + (f" / {ranks} ranks" if ranks > 1 else "")
    if nbytes <= room:
        return True, f"the data ({_gb(nbytes)} decoded) fits in {share}: preloaded to RAM"
    return False, (f"the data ({_gb(nbytes)} decoded) is more than {share}: whole chunks "
                   "are read through a per-process cache instead of preloading")


@dataclass(frozen=True)
class CachePlan:
    window: int  # chunks (blocks) a ChunkShuffleSampler shuffles together
    cache_bytes: int  # each reading process's cache
    reason: str
    warning: str | None = None  # the plan passes the memory budget: say so to the user


def cache_plan(hw: HardwareInfo, *, workers: int, block_bytes: int, blocks: int,
               cache_bytes: int | None = None, window: int | None = None) -> CachePlan:
    """The window and per-process cache for ``workers`` workers (0: the main process reads).

    A window of ``w`` blocks needs a cache of ``w`` blocks in each reading process; the
    caches together stay within ``CACHE_FRACTION`` of this rank's RAM. A window the caller
    chose is kept, a cache the caller sized is kept, and the other follows from it.
    """
    processes = max(1, workers)
    block_bytes = max(1, block_bytes)
    if cache_bytes is not None:
        fit = max(1, min(blocks, cache_bytes // block_bytes))
        chosen = window or min(DEFAULT_WINDOW, fit)
        if cache_bytes < block_bytes:
            return CachePlan(chosen, cache_bytes,
                             f"cache_bytes={_mb(cache_bytes)} set explicitly, less than one "
                             f"block ({_mb(block_bytes)}): nothing is cached, every read "
                             "decompresses its chunks again")
        why = f"cache_bytes={_mb(cache_bytes)} set explicitly, room for {fit} block(s)"
        if cache_bytes < chosen * block_bytes:
            why += (f"; a window of {chosen} needs {_mb(chosen * block_bytes)}, so some "
                    "reads decompress a chunk again")
        return CachePlan(chosen, cache_bytes, why)
    budget = _cache_budget(hw, processes)
    wanted = min(window or DEFAULT_WINDOW, blocks)
    if budget is None or budget >= wanted * block_bytes:
        where = "" if budget is None else f" (budget {_mb(budget)} per process)"
        return CachePlan(wanted, wanted * block_bytes,
                         f"room for a window of {wanted} block(s) of {_mb(block_bytes)} in "
                         f"each of {processes} reading process(es){where}")
    if budget < block_bytes:
        share = (f"{CACHE_FRACTION:.0%} of available RAM over {processes} reading process(es) "
                 f"is {_mb(budget)} each, less than one block of {_mb(block_bytes)}")
        return CachePlan(window or 1, block_bytes,
                         f"{share}: one block each all the same (a chunk is read whole)",
                         warning=f"chunked HDF5 data: {share}, so the {processes} caches "
                                 f"of one block each take {_mb(processes * block_bytes)}, "
                                 "more than the memory budget. Use fewer workers, or write "
                                 "the file with smaller chunks")
    fit = budget // block_bytes
    chosen = window or fit
    return CachePlan(chosen, fit * block_bytes,
                     f"{CACHE_FRACTION:.0%} of available RAM over {processes} reading "
                     f"process(es) is {_mb(budget)} each: room for {fit} block(s) of "
                     f"{_mb(block_bytes)}" + ("" if chosen <= fit else
                                              f"; window={chosen} will re-read chunks"))


def _cache_budget(hw: HardwareInfo, processes: int) -> int | None:
    if hw.memory.available_bytes is None:
        return None
    return int(hw.memory.available_bytes * CACHE_FRACTION) // ranks_here(hw) // processes


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.2f} GB"
