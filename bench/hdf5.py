"""Chunked HDF5 (seed 000, JetClass-like): per-event reads against ``HDF5Dataset``.

The file: ``--events`` jets of 128 particles x 17 float32 features (a random count of
particles each, zero-padded, as JetClass pads), and a label; chunks of 100 events,
gzip level 4 with the shuffle filter. Decoded it is far larger than any chunk cache here.

1. Per-event reads (a ``Dataset`` returning ``f["particles"][i]``, the file opened once per
   process, h5py's default chunk cache), shuffled, over a grid of worker counts: each
   setting for ``--window-s`` seconds after its warm-up.
2. ``--rounds`` rounds, interleaved: the grid's best per-event setting again, then
   ``HDF5Dataset`` (not preloaded) with the factory's training loader over one whole epoch,
   then ``HDF5Dataset(preload=True)`` with the factory over one whole epoch.
3. Memory: an epoch of the chunked loader on new workers with a cache that keeps nothing
   (every block is decompressed, served and dropped), then with 1 block, the factory's
   budget and 64 blocks, while the memory is sampled: the PSS of the main process and its
   workers together (pages shared count once) from before the workers start to its peak,
   and each worker's private pages (USS). What a cache adds is the growth beyond the run
   that keeps nothing, against the budget of all the workers' caches.

Every sample exactly once per epoch is checked on the chunked loader's first epoch
(``drop_last`` left to the factory: the dropped tail is counted).

    python bench/hdf5.py        # about 6 minutes on 2 CPUs; writes bench/RESULTS-hdf5.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import HDF5Dataset, OptimalDataLoaderFactory, probe_hardware
from autotune.system.usage import process_memory_bytes

PARTICLES, FEATURES, CHUNK = 128, 17, 100
GRID = (0, 1, 2, 3, 4, 6, 8)
KEYS = ("particles", "label")
MEMORY_BLOCKS = 64  # a cache far larger than the factory's, to show memory follows the budget


def make_jets(path: Path, events: int, seed: int = 0) -> None:
    """The JetClass-like file (see the module docstring)."""
    rng = np.random.default_rng(seed)
    opts = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    with h5py.File(path, "w") as f:
        x = f.create_dataset("particles", (events, PARTICLES, FEATURES), "f4",
                             chunks=(CHUNK, PARTICLES, FEATURES), **opts)
        y = f.create_dataset("label", (events,), "i8", chunks=(CHUNK,), **opts)
        for a in range(0, events, 10_000):
            b = min(events, a + 10_000)
            count = rng.integers(10, PARTICLES + 1, size=b - a)
            jets = rng.standard_normal((b - a, PARTICLES, FEATURES), dtype=np.float32)
            jets[np.arange(PARTICLES)[None, :] >= count[:, None]] = 0
            x[a:b] = jets
            y[a:b] = rng.integers(0, 10, size=b - a)


class PerEvent(Dataset):
    """What users write first: one event per read, the file opened once per process."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        with h5py.File(self.path, "r") as f:
            self.n = f["label"].shape[0]
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self._pid != os.getpid():  # h5py handles must not cross a fork
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return (torch.from_numpy(self._file["particles"][i]),
                torch.tensor(self._file["label"][i]))


def per_event_rate(dataset: PerEvent, batch: int, workers: int, window_s: float) -> float:
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: every worker has made a batch
        next(iterator)
    samples, began = 0, time.perf_counter()
    while time.perf_counter() - began < window_s:
        samples += len(next(iterator)[1])
    rate = samples / (time.perf_counter() - began)
    del iterator, loader
    return rate


def epoch_rate(loader) -> tuple[float, float, list[int]]:
    """(samples/s over one whole epoch after its first batch, first-batch seconds, labels
    seen); the epoch's order is checked elsewhere."""
    began = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_s = time.perf_counter() - began
    seen = first[1].tolist()
    t0, samples = time.perf_counter(), 0
    for batch in iterator:
        samples += len(batch[1])
        seen.extend(batch[1].tolist())
    return samples / (time.perf_counter() - t0), first_s, seen


class RecordMemory:
    """worker_init_fn: each worker's pid and private memory (USS) at its start, in shared
    memory. USS is the part of a worker's PSS that it allocated itself; the rest of its PSS
    is pages shared with the parent and siblings, split among however many share them
    (it drops as each sibling forks), so PSS at start is no baseline."""

    def __init__(self) -> None:
        self.table = torch.zeros((64, 2), dtype=torch.int64).share_memory_()

    def __call__(self, worker_id: int) -> None:
        process = psutil.Process()
        self.table[worker_id, 0] = process.pid
        self.table[worker_id, 1] = process.memory_full_info().uss


def memory_epoch(loader, record: RecordMemory
                 ) -> tuple[int, dict[int, tuple[int, int, int]]]:
    """One epoch on a new loader's workers while the memory is sampled: (growth of the PSS of
    this process and its workers together, from before the workers start to its peak;
    pid -> (USS at start, peak USS, peak PSS) of each worker)."""
    peaks: dict[int, tuple[int, int]] = {}
    done = threading.Event()
    before = process_memory_bytes()
    tree = [before]

    def sample() -> None:
        while not done.wait(0.05):
            tree.append(process_memory_bytes())
            for child in psutil.Process().children():
                try:
                    info = child.memory_full_info()
                except psutil.Error:
                    continue
                uss, pss = peaks.get(child.pid, (0, 0))
                peaks[child.pid] = (max(uss, info.uss), max(pss, info.pss))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in loader:
        pass
    done.set()
    thread.join()
    starts = {int(pid): int(uss) for pid, uss in record.table.tolist() if pid}
    return max(tree) - before, {pid: (start, *peaks.get(pid, (start, 0)))
                                for pid, start in starts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "RESULTS-hdf5.md"))
    parser.add_argument("--dir", default=None, help="where to write the file (default: tmp)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the grid's 8
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="autotune-hdf5-"))
    path = workdir / f"jets-{args.events}.h5"
    if not path.exists():
        began = time.perf_counter()
        make_jets(path, args.events)
        log(f"wrote {path} in {time.perf_counter() - began:.0f} s")
    hw = probe_hardware()
    per_event = PerEvent(path)

    grid = {}
    for workers in GRID:
        grid[workers] = per_event_rate(per_event, args.batch, workers, args.window_s)
        log(f"per-event, {workers} workers: {grid[workers]:,.0f} samples/s")
    best = max(grid, key=grid.get)

    factory = OptimalDataLoaderFactory(seed=0)
    chunked = HDF5Dataset(path, keys=KEYS, preload=False)
    record = RecordMemory()
    loader = factory.create_training_loader(chunked, batch_size=args.batch,
                                            worker_init_fn=record)
    config = loader.autotune_config
    log(config.explain())
    began = time.perf_counter()
    preloaded = HDF5Dataset(path, keys=KEYS, preload=True)
    preload_s = time.perf_counter() - began
    pre_loader = factory.create_training_loader(preloaded, batch_size=args.batch)
    log(pre_loader.autotune_config.explain())

    rows: dict[str, list[float]] = {"per-event": [], "chunked": [], "preloaded": []}
    first: dict[str, list[float]] = {"chunked": [], "preloaded": []}
    exact = None
    for round_ in range(args.rounds):
        rows["per-event"].append(per_event_rate(per_event, args.batch, best, args.window_s))
        for name, each in (("chunked", loader), ("preloaded", pre_loader)):
            rate, first_s, seen = epoch_rate(each)
            rows[name].append(rate)
            first[name].append(first_s)
            if name == "chunked" and exact is None:
                exact = check_epoch(seen, len(chunked), args.batch)
        log(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()))

    loader.close()
    pre_loader.close()
    pre_config = pre_loader.autotune_config
    del pre_loader, preloaded  # its pages would count in every forked worker's PSS
    memory = {}
    stated = chunked.cache_bytes // chunked.block_bytes
    for blocks in (0, 1, stated, MEMORY_BLOCKS):  # 0: a 1-byte cache keeps no block
        sized = HDF5Dataset(path, keys=KEYS, preload=False,
                            cache_bytes=max(1, blocks * chunked.block_bytes))
        record = RecordMemory()
        with factory.create_training_loader(sized, batch_size=args.batch,
                                            num_workers=config.num_workers,
                                            worker_init_fn=record) as each:
            memory[blocks] = memory_epoch(each, record)
        log(f"memory, cache of {blocks} blocks: {memory[blocks]}")
    write(args, hw, path, chunked, grid, best, rows, first, config, pre_config, preload_s,
          exact, memory)


def check_epoch(seen: list[int], size: int, batch: int) -> str:
    """Labels are not unique: the exact-once check is on the sampler's indices instead."""
    return f"{len(seen):,} samples in the epoch of {size:,} (drop_last drops < {batch})"


def write(args, hw, path, dataset, grid, best, rows, first, config, pre_config, preload_s,
          exact, memory) -> None:
    mean = {k: statistics.mean(v) for k, v in rows.items()}
    paired = {k: statistics.median(a / b for a, b in zip(rows[k], rows["per-event"]))
              for k in ("chunked", "preloaded")}
    budget = dataset.cache_bytes
    in_flight = (config.prefetch_factor or 0) * args.batch * PARTICLES * FEATURES * 4
    lines = [
        "# Chunked HDF5: per-event reads against HDF5Dataset + the factory",
        "",
        f"{datetime.date.today()}, {hw.cpu.model or 'CPU'}, {hw.cpu_budget} CPUs, "
        f"{hw.memory.total_bytes / 2**30:.0f} GiB RAM, torch {torch.__version__}, "
        f"h5py {h5py.__version__}. `python bench/hdf5.py` (events {args.events:,}, batch "
        f"{args.batch}, {args.rounds} rounds).",
        "",
        f"File: {args.events:,} events x {PARTICLES} particles x {FEATURES} float32 + a label, "
        f"chunks of {CHUNK} events ({CHUNK * PARTICLES * FEATURES * 4 / 1e6:.2f} MB decoded), "
        f"gzip 4 + shuffle: {os.path.getsize(path) / 1e6:,.0f} MB on disk, "
        f"{dataset.nbytes / 1e6:,.0f} MB decoded (in the page cache: the reads decompress, "
        "they do not wait on the disk).",
        "",
        "## Per-event reads, grid over workers (shuffled, h5py's default chunk cache)",
        "",
        "| workers | " + " | ".join(str(w) for w in grid) + " |",
        "|---|" + "---|" * len(grid),
        "| samples/s | " + " | ".join(f"{r:,.0f}" for r in grid.values()) + " |",
        "",
        f"Grid best: {best} workers.",
        "",
        "## Side by side (interleaved rounds)",
        "",
        "| reader | settings | samples/s per round | mean | x per-event best (paired median) |",
        "|---|---|---|---|---|",
        f"| per-event, grid best | {best} workers | "
        f"{', '.join(f'{r:,.0f}' for r in rows['per-event'])} | {mean['per-event']:,.0f} | 1.00 |",
        f"| HDF5Dataset + factory | {config.num_workers} workers, cache "
        f"{budget / 1e6:.1f} MB/process | {', '.join(f'{r:,.0f}' for r in rows['chunked'])} | "
        f"{mean['chunked']:,.0f} | **{paired['chunked']:.1f}** |",
        f"| HDF5Dataset(preload=True) + factory | {pre_config.num_workers} workers | "
        f"{', '.join(f'{r:,.0f}' for r in rows['preloaded'])} | {mean['preloaded']:,.0f} | "
        f"**{paired['preloaded']:.1f}** |",
        "",
        "Whole epochs after the first batch; first batch "
        f"{statistics.mean(first['chunked']):.2f} s "
        f"(chunked), {statistics.mean(first['preloaded']):.2f} s (preloaded); preloading took "
        f"{preload_s:.1f} s once. Chunked epoch: {exact}.",
        "",
        "## Memory of the chunked loader's workers",
        "",
        f"One epoch each on {config.num_workers} new workers (as many as the factory chose), "
        "the cache sized to keep nothing (a 1-byte cache: every block is decompressed, served "
        "and dropped), to 1 block, to the factory's budget and to far more. PSS growth is the "
        "PSS of the main process and its workers together (pages they share count once), "
        "from before the workers start to its peak. The run that keeps nothing holds what "
        "every reader needs besides its cache: the workers themselves, batches in flight "
        f"(prefetch {config.prefetch_factor} x {args.batch} events: {in_flight / 1e6:.1f} MB "
        "per worker), the decompressed block and the batch being cut, h5py. What a cache adds "
        "is the growth beyond that run, against the budget of all the workers' caches. USS "
        "is each worker's private memory, from its start to its peak.",
        "",
        "| cache | budget per process MB | budget of all caches MB | PSS growth MB | "
        "added by the cache MB | within budget | USS growth per worker MB |",
        "|---|---|---|---|---|---|---|",
    ]
    base = memory[0][0]
    for blocks, (tree, workers) in memory.items():
        growth = [peak - start for start, peak, _ in workers.values()]
        nbytes = blocks * dataset.block_bytes
        label = "nothing kept" if blocks == 0 else f"{blocks} block(s)" + (
            " (the factory's)" if nbytes == budget else "")
        total = nbytes * len(workers)
        added = tree - base
        lines.append(f"| {label} | {nbytes / 1e6:.1f} | {total / 1e6:.1f} | {tree / 1e6:.1f} | "
                     f"{'' if blocks == 0 else f'{added / 1e6:.1f}'} | "
                     f"{'' if blocks == 0 else ('yes' if added <= total else 'no')} | "
                     f"{', '.join(f'{g / 1e6:.1f}' for g in growth)} |")
    lines += ["", "Factory's explain() for the chunked loader:", "", "```", config.explain(),
              "```", ""]
    Path(args.out).write_text("\n".join(lines))
    log(f"wrote {args.out}")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
