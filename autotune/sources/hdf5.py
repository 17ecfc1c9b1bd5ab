"""``HDF5Dataset``: samples from chunked HDF5 files, read a whole chunk at a time.

A per-sample read from a chunked, compressed HDF5 dataset decompresses the whole chunk to
return one row; in shuffled order every sample costs a chunk. This dataset reads blocks
of rows that cover whole chunks of every key and serves samples from an LRU cache bounded
in bytes, one per process (each worker holds its own). Read in ``ChunkShuffleSampler``
order, a cache of ``window`` blocks serves every read: each chunk is decompressed once
per epoch. Data that fits in memory can be preloaded instead (``preload``).

Files are opened lazily in the process that reads them: an h5py handle never crosses a
fork. h5py is an optional dependency (``pip install 'autotune[hdf5]'``).
"""

from __future__ import annotations

import bisect
import glob
import itertools
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .._bar import wait_bar
from .._check import check_int
from ..errors import DataFileError, InvalidConfigError
from ..policy import chunks as rules

log = logging.getLogger(__name__)

PRELOAD_RUN_BYTES = 64 << 20  # a preload reads this much per call, then moves its bar
_READ_FAILED = ("the file may be truncated or corrupt, or changed since the dataset was built "
                "(rebuild the HDF5Dataset after rewriting a file)")
MIN_BLOCK_BYTES = 256 << 10  # tiny chunks are read several at a time: one h5py call each
CONTIGUOUS_BLOCK_BYTES = 1 << 20  # rows per read of an unchunked dataset


@dataclass(frozen=True)
class _Block:
    file: int  # index into files
    start: int  # first row in the file
    stop: int
    first: int  # global index of its first sample


@dataclass
class CacheInfo:
    """This process's chunk cache: hits and reads (misses) since it started."""

    hits: int = 0
    reads: int = 0  # blocks read from the file (each decompresses its chunks)
    bytes: int = 0  # its slots' memory now (one block each, allocated once, reused)
    peak_bytes: int = 0
    limit_bytes: int = 0


class HDF5Dataset(Dataset):
    """Samples along the first axis of one or more HDF5 files, read a chunk at a time.

    Args:
        files: a path, a glob (``"data/train*.h5"``, sorted) or a sequence of them.
        keys: the HDF5 datasets to read, aligned along their first axis. A tuple or list
            gives each sample as a tuple of tensors in that order; a mapping
            ``{name: key}`` gives a dict by name; a single string gives one tensor.
        transform: called on each sample (the tuple, dict or tensor) before it is returned.
        cache_bytes: each process's chunk cache, in bytes (each worker holds its own).
            ``None``: the factory sizes it from the memory budget divided among the
            workers; used without the factory it holds 8 blocks.
        preload: ``True`` reads all the data into memory now (forked workers share it),
            ``False`` never; ``None`` lets the rules decide from its decoded size against
            the memory this process may use (``preload_reason`` says why).

    Example::

        ds = autotune.HDF5Dataset("data/train*.h5", keys=("x", "y"))
        sampler = autotune.ChunkShuffleSampler(ds, window=8, seed=0)
        loader = DataLoader(ds, batch_size=512, sampler=sampler, num_workers=4)
    """

    def __init__(self, files: Any, keys: Any, *, transform: Callable[[Any], Any] | None = None,
                 cache_bytes: int | None = None, preload: bool | None = None) -> None:
        h5py = _h5py()
        self.files = _expand(files)
        self.keys = keys
        self._names, self._labels = _check_keys(keys)
        if transform is not None and not callable(transform):
            raise InvalidConfigError(f"transform={transform!r} must be callable or None")
        if cache_bytes is not None:
            check_int("cache_bytes", cache_bytes, minimum=1)
        if preload not in (None, True, False):
            raise InvalidConfigError(f"preload={preload!r} must be True, False or None "
                                     "(let the rules decide)")
        self.transform = transform
        rows, self._shapes, self._dtypes, block_rows = _layout(h5py, self.files, self._names)
        self._blocks = _blocks(rows, block_rows)
        self._firsts = [block.first for block in self._blocks]
        self._length = sum(rows)
        if self._length == 0:
            raise DataFileError(self.files[0], self._names[0],
                                f"the files hold no samples ({len(self.files)} file(s))")
        row_bytes = _row_bytes(zip(self._shapes, self._dtypes))
        self.nbytes = self._length * row_bytes
        self.block_bytes = max(b.stop - b.start for b in self._blocks) * row_bytes
        self._cache_bytes = cache_bytes
        self.cache_set_explicitly = cache_bytes is not None
        self.cache_reason = "set explicitly" if cache_bytes is not None else (
            f"default: room for {rules.DEFAULT_WINDOW} blocks (the factory sizes it from the "
            "memory budget)")
        if preload is None:
            from ..system.hardware import probe_hardware

            preload, self.preload_reason = rules.preload(probe_hardware(), self.nbytes)
        else:
            self.preload_reason = "set explicitly"
        self.preloaded = preload
        log.info("HDF5Dataset of %d samples: %s", self._length, self.preload_reason)
        self._data = self._read_all(h5py) if preload else None
        self._reset()

    # -- what a sampler and the factory use --------------------------------------------------

    @property
    def chunk_ranges(self) -> tuple[range, ...]:
        """The sample indices of each block, in file order: a block covers whole chunks of
        every key and never spans two files."""
        return tuple(range(b.first, b.first + b.stop - b.start) for b in self._blocks)

    @property
    def cache_bytes(self) -> int:
        """Each process's cache limit in bytes (the factory sets it when it was ``None``)."""
        if self._cache_bytes is None:
            return rules.DEFAULT_WINDOW * self.block_bytes
        return self._cache_bytes

    def set_cache_bytes(self, nbytes: int, reason: str) -> None:
        """Resize the cache (the factory's sizing); takes effect in this process now and in
        workers started afterwards."""
        self._cache_bytes = check_int("cache_bytes", nbytes, minimum=1)
        self.cache_reason = reason
        self._cache.resize(nbytes)

    def clear_cache(self) -> None:
        """Empty this process's cache (``measure_workload`` times cold reads)."""
        self._own().resize(0)
        self._cache.resize(self.cache_bytes)

    def cache_info(self) -> CacheInfo:
        """This process's cache: hits, block reads, bytes held (each worker has its own)."""
        self._own()
        return self._cache.info

    # -- Dataset ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:
        index = self._check_index(index)
        if self._data is not None:
            assert self._views is not None  # made with the data (_reset)
            return self._sample(self._views, index)
        block = bisect.bisect_right(self._firsts, index) - 1
        return self._sample(self._read(block), index - self._firsts[block])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch: each block it touches is looked up once, its rows taken together."""
        indices = [self._check_index(i) for i in indices]
        if self._data is not None:
            assert self._views is not None
            return self._samples(self._views, np.asarray(indices, dtype=np.int64))
        blocks = [bisect.bisect_right(self._firsts, i) - 1 for i in indices]
        out: list[Any] = [None] * len(indices)
        by_block: dict[int, list[int]] = {}
        for position, block in enumerate(blocks):
            by_block.setdefault(block, []).append(position)
        for block, positions in by_block.items():
            rows = np.asarray([indices[p] for p in positions], dtype=np.int64)
            samples = self._samples(self._read(block), rows - self._firsts[block])
            for position, sample in zip(positions, samples):
                out[position] = sample
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned workers without open files or cached blocks."""
        state = self.__dict__.copy()
        state.update(_handles={}, _pid=None, _cache=None, _views=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        files = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        return (f"HDF5Dataset({files!r}, keys={self.keys!r}, {self._length} samples, "
                f"{len(self._blocks)} blocks, preloaded={self.preloaded})")

    # -- reading -----------------------------------------------------------------------------

    def _check_index(self, index: Any) -> int:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"HDF5Dataset indices are integers, not {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} is out of range for {self._length} samples")
        return index

    def _sample(self, arrays: Sequence[np.ndarray], row: int) -> Any:
        # a copy: a sample must not pin a cached block, nor let a transform write to one
        return self._form([torch.from_numpy(np.array(a[row])) for a in arrays])

    def _samples(self, arrays: Sequence[np.ndarray], rows: np.ndarray) -> list[Any]:
        # fancy indexing copies: each sample is a view of this batch's own tensor
        columns = [torch.from_numpy(a[rows]).unbind(0) for a in arrays]
        return [self._form(list(values)) for values in zip(*columns)]

    def _form(self, values: list[torch.Tensor]) -> Any:
        if isinstance(self._labels, str):
            sample: Any = values[0]
        elif self._labels is None:
            sample = tuple(values)
        else:
            sample = dict(zip(self._labels, values))
        return sample if self.transform is None else self.transform(sample)

    def _read(self, index: int) -> tuple[np.ndarray, ...]:
        """Block ``index``'s rows of every key: cached, or read into a cache slot (or, when
        the cache holds no block, into new arrays). Valid until the next ``_read``."""
        cache = self._own()
        arrays = cache.get(index)
        if arrays is not None:
            return arrays
        block = self._blocks[index]
        rows = block.stop - block.start
        slot = cache.slot()
        arrays = tuple(b[:rows] for b in (slot or self._buffers(rows)))
        try:
            handle = self._file(block.file)
            for name, array in zip(self._names, arrays):
                try:
                    handle[name].read_direct(array, source_sel=np.s_[block.start:block.stop])
                except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
                    raise DataFileError(self.files[block.file], name,
                                        f"rows {block.start}-{block.stop - 1} could not be read "
                                        f"({exc}): {_READ_FAILED}") from exc
        except BaseException:
            if slot is not None:
                cache.discard()
            raise
        if slot is not None:
            cache.keep(index, slot, arrays)
        return arrays

    def _buffers(self, rows: int) -> tuple[np.ndarray, ...]:
        """Uninitialised arrays for ``rows`` rows of every key."""
        return tuple(np.empty((rows, *shape), dtype=dtype)
                     for shape, dtype in zip(self._shapes, self._dtypes))

    def _file(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            handle = self._handles[index] = _open(_h5py(), self.files[index], self._names)
        return handle

    def _own(self) -> _BlockCache:
        """This process's cache and handles; a forked worker drops what it inherited."""
        if self._pid != os.getpid():
            self._reset()
        return self._cache

    def _new_cache(self) -> _BlockCache:
        rows = max(b.stop - b.start for b in self._blocks)
        return _BlockCache(self.cache_bytes, self.block_bytes, lambda: self._buffers(rows))

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[int, Any] = {}
        self._cache = self._new_cache()
        # numpy views of the preloaded tensors: indexing them is several times cheaper
        self._views = None if self._data is None else tuple(t.numpy() for t in self._data)

    def _read_all(self, h5py: Any) -> tuple[torch.Tensor, ...]:
        """Every key as one tensor (torch storage: spawned workers receive it through shared
        memory rather than a copy each), read block by block (whole chunks) under a bar."""
        data = [np.empty((self._length, *shape), dtype=dtype)
                for shape, dtype in zip(self._shapes, self._dtypes)]
        row_bytes = _row_bytes(zip(self._shapes, self._dtypes))
        run_rows = max(1, PRELOAD_RUN_BYTES // max(1, row_bytes))
        with wait_bar(f"preloading {len(self.files)} HDF5 file(s)", self.nbytes) as bar:
            for file, runs in itertools.groupby(_runs(self._blocks, run_rows),
                                                key=lambda run: run[0]):
                path = self.files[file]
                with _open(h5py, path, self._names) as handle:
                    for _, start, stop, first in runs:
                        for name, array in zip(self._names, data):
                            try:
                                handle[name].read_direct(
                                    array, source_sel=np.s_[start:stop],
                                    dest_sel=np.s_[first:first + stop - start])
                            except (OSError, RuntimeError, ValueError, KeyError,
                                    TypeError) as exc:
                                raise DataFileError(path, name,
                                                    f"could not be preloaded ({exc}): "
                                                    f"{_READ_FAILED}") from exc
                        bar.update((stop - start) * row_bytes)
        return tuple(torch.from_numpy(array) for array in data)


class _BlockCache:
    """Blocks by index, least recently used first out, in as many slots of one block each as
    the byte limit holds. A slot is allocated once and then reused, blocks are read straight
    into it: the cache's memory is at most its limit, whatever the allocator does (blocks
    allocated and freed per read fragmented glibc's heap: 8 cached blocks grew a process by
    1.3x their bytes). A limit smaller than a block caches nothing."""

    def __init__(self, limit: int, slot_bytes: int,
                 allocate: Callable[[], tuple[np.ndarray, ...]]) -> None:
        self._slot_bytes = max(1, slot_bytes)
        self._allocate = allocate
        self._blocks: OrderedDict[int, tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]]
        self._blocks = OrderedDict()  # index -> (its slot, the block's rows in it)
        self.info = CacheInfo(limit_bytes=limit)

    def get(self, index: int) -> tuple[np.ndarray, ...] | None:
        entry = self._blocks.get(index)
        if entry is None:
            return None
        self._blocks.move_to_end(index)
        self.info.hits += 1
        return entry[1]

    def slot(self) -> tuple[np.ndarray, ...] | None:
        """A slot to read a block into (a new one while the limit has room, else the least
        recently used block's); ``None`` when the limit holds no block. Then ``keep`` it,
        or ``discard`` it when the read fails."""
        self.info.reads += 1
        capacity = self.info.limit_bytes // self._slot_bytes
        if capacity == 0:
            return None
        if len(self._blocks) < capacity:
            slot = self._allocate()
            self.info.bytes += self._slot_bytes
            self.info.peak_bytes = max(self.info.peak_bytes, self.info.bytes)
        else:
            _, (slot, _) = self._blocks.popitem(last=False)
        return slot

    def keep(self, index: int, slot: tuple[np.ndarray, ...],
             rows: tuple[np.ndarray, ...]) -> None:
        """Block ``index`` was read into ``slot``; ``rows`` are its rows there."""
        self._blocks[index] = (slot, rows)

    def discard(self) -> None:
        """Reading into the last slot given failed: it goes."""
        self.info.bytes -= self._slot_bytes

    def resize(self, limit: int) -> None:
        self.info.limit_bytes = limit
        while self._blocks and len(self._blocks) > limit // self._slot_bytes:
            self._blocks.popitem(last=False)
            self.info.bytes -= self._slot_bytes


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise ImportError("HDF5Dataset needs h5py: pip install 'autotune[hdf5]' "
                          "(or pip install h5py)") from exc
    return h5py


def _expand(files: Any) -> tuple[str, ...]:
    """Paths from a path, a glob or a sequence of them, each existing."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    elif not isinstance(files, Sequence) or not files:
        raise InvalidConfigError(f"files={files!r} must be a path, a glob or a non-empty list "
                                 "of them")
    paths: list[str] = []
    for item in files:
        if not isinstance(item, (str, os.PathLike)):
            raise InvalidConfigError(f"files: {item!r} is not a path")
        text = os.fspath(item)
        if glob.has_magic(text):
            matched = sorted(glob.glob(text))
            if not matched:
                raise InvalidConfigError(f"files: the pattern {text!r} matches no file")
            paths.extend(matched)
        elif not os.path.isfile(text):
            raise InvalidConfigError(f"files: {text!r} does not exist (or is not a file)")
        else:
            paths.append(text)
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            also = "" if seen[real] == path else f", also as {seen[real]!r}"
            raise InvalidConfigError(f"files: {path!r} is listed twice{also} (a glob and a "
                                     "path that overlap?): list each file once")
        seen[real] = path
    return tuple(paths)


def _check_keys(keys: Any) -> tuple[tuple[str, ...], str | tuple[str, ...] | None]:
    """(HDF5 paths to read, labels): a str label for one key, names for a dict, None for a
    tuple."""
    if isinstance(keys, str):
        return (keys,), keys
    if isinstance(keys, Mapping):
        names, labels = tuple(keys.values()), tuple(keys)
    elif isinstance(keys, Sequence):
        names, labels = tuple(keys), None
    else:
        raise InvalidConfigError(f"keys={keys!r} must be a key, a tuple of keys or a mapping "
                                 "{name: key}")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidConfigError(f"keys={keys!r} must name at least one HDF5 dataset, each a "
                                 "non-empty string")
    return names, labels


def _runs(blocks: Sequence[Any], rows: int) -> Iterator[tuple[int, int, int, int]]:
    """(file, start, stop, first sample) of runs of consecutive blocks (in file order, one
    pass), each at least ``rows`` long but a file's last: whole chunks read in few calls (one
    call per block read an 87 MB file 1.6x slower than one call for all of it)."""
    run: list[Any] = []
    for block in blocks:
        if run and block.file != run[0].file:
            yield run[0].file, run[0].start, run[-1].stop, run[0].first
            run = []
        run.append(block)
        if run[-1].stop - run[0].start >= rows:
            yield run[0].file, run[0].start, run[-1].stop, run[0].first
            run = []
    if run:
        yield run[0].file, run[0].start, run[-1].stop, run[0].first


def _open(h5py: Any, path: str, names: Sequence[str]) -> Any:
    """The file, read-only; without HDF5's own chunk cache (blocks are whole chunks, cached
    here within the byte budget)."""
    try:
        return h5py.File(path, "r", rdcc_nbytes=0)
    except (OSError, ValueError) as exc:
        if "lock" in str(exc).lower():
            why = ("another process holds it open for writing (HDF5 file locking): close the "
                   "writer, or set HDF5_USE_FILE_LOCKING=FALSE if it is safe to read now")
        else:
            why = "a truncated file (an interrupted copy or download) or not an HDF5 file"
        raise DataFileError(path, None,
                            f"cannot be opened as HDF5 to read {', '.join(map(repr, names))} "
                            f"({exc}): {why}") from exc


def _layout(h5py: Any, files: Sequence[str], names: Sequence[str]
            ) -> tuple[list[int], list[tuple[int, ...]], list[np.dtype], list[int]]:
    """Rows per file, each key's sample shape and dtype, and the rows each file's blocks
    hold; every mismatch named by file and key."""
    rows: list[int] = []
    block_rows: list[int] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[np.dtype] = []
    for path in files:
        with _open(h5py, path, names) as handle:
            found = [_dataset(h5py, handle, path, name) for name in names]
            lengths = {name: d.shape[0] for name, d in zip(names, found)}
            if len(set(lengths.values())) > 1:
                ordered = sorted(lengths.items(), key=lambda item: item[1])
                (a, n), (b, m) = ordered[0], ordered[-1]
                raise DataFileError(path, b, f"has {m} rows but key {a!r} has {n}: the keys' "
                                    "samples must line up along the first axis")
            for i, (name, d) in enumerate(zip(names, found)):
                dtype = _check_dtype(path, name, d.dtype)
                if path == files[0]:
                    shapes.append(d.shape[1:])
                    dtypes.append(dtype)
                elif (d.shape[1:], dtype) != (shapes[i], dtypes[i]):
                    raise DataFileError(path, name, f"holds samples of shape {d.shape[1:]} "
                                        f"{d.dtype}, but {files[0]!r} holds {shapes[i]} "
                                        f"{dtypes[i]}: every file must hold the same samples")
            rows.append(found[0].shape[0])
            block_rows.append(_block_rows(found))
    return rows, shapes, dtypes, block_rows


def _dataset(h5py: Any, handle: Any, path: str, name: str) -> Any:
    found = handle.get(name)
    if found is None and name in handle.keys():
        raise DataFileError(path, name, f"{name!r} is a link to nothing (a dangling soft or "
                            "external link): point it at a dataset, or name the dataset itself")
    if found is None:
        have = sorted(handle.keys())
        raise DataFileError(path, name, f"has no key {name!r} (it has: "
                            f"{', '.join(have) if have else 'nothing'})")
    if not isinstance(found, h5py.Dataset):
        raise DataFileError(path, name, f"{name!r} is a {type(found).__name__}, not a dataset: "
                            "name a dataset inside it")
    if found.ndim == 0:
        raise DataFileError(path, name, f"{name!r} is a scalar: samples run along the first "
                            "axis of an array")
    return found


def _check_dtype(path: str, name: str, dtype: np.dtype) -> np.dtype:
    """The dtype samples get: the file's, in native byte order (torch takes no other)."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        raise DataFileError(path, name, f"holds an array type ({base} x {shape}) per row, "
                            "which h5py cannot read into a plain array: store it as a dataset "
                            f"of shape (rows, {', '.join(map(str, shape))}) of {base}")
    dtype = dtype.newbyteorder("=")
    try:
        torch.from_numpy(np.zeros(1, dtype=dtype))
    except TypeError as exc:
        raise DataFileError(path, name, f"holds {dtype}, which has no torch tensor type "
                            "(store numbers, or read it with h5py yourself)") from exc
    return dtype


def _block_rows(datasets: Sequence[Any]) -> int:
    """Rows that cover whole chunks of every key (their least common multiple, or the
    largest chunk when that is far bigger), at least ``MIN_BLOCK_BYTES``."""
    row_bytes = max(1, _row_bytes((d.shape[1:], d.dtype) for d in datasets))
    chunked = [d.chunks[0] for d in datasets if d.chunks is not None]
    if not chunked:
        return max(1, CONTIGUOUS_BLOCK_BYTES // row_bytes)
    largest = max(chunked)
    common = math.lcm(*chunked)
    rows = common if common <= 4 * largest else largest
    return rows * max(1, math.ceil(MIN_BLOCK_BYTES / (rows * row_bytes)))


def _row_bytes(samples: Any) -> int:
    """Decoded bytes of one row across keys, from (sample shape, dtype) pairs."""
    return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
               for shape, dtype in samples)


def _blocks(rows: Sequence[int], block_rows: Sequence[int]) -> list[_Block]:
    blocks: list[_Block] = []
    first = 0
    for file, (count, step) in enumerate(zip(rows, block_rows)):
        for start in range(0, count, step):
            stop = min(count, start + step)
            blocks.append(_Block(file, start, stop, first))
            first += stop - start
    return blocks
