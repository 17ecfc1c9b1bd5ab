"""HDF5Dataset and ChunkShuffleSampler on real HDF5 files (h5py), real DataLoader workers."""

from __future__ import annotations

import collections
import itertools
import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, RandomSampler, get_worker_info

import autotune
from autotune import ChunkShuffleSampler, DataFileError, HDF5Dataset, InvalidConfigError
from autotune.loading.builder import build_loader
from autotune.sources.samplers import EpochDistributedSampler
from autotune.measure.workload import measure_workload
from autotune.policy import chunks
from fakes import GIB, fake_hardware

h5py = pytest.importorskip("h5py")

HERE = Path(__file__).resolve().parent
WIDTH = 2048  # float32 per row: 8 KB, so a chunk of 32 rows is one 256 KB block
CHUNK = 32


def write(path: Path, first: int, count: int, *, chunk: int = CHUNK, label_rows: int | None = None,
          compression: str | None = "gzip") -> Path:
    """Rows first..first+count: x[i] is i everywhere, index[i] = i, label[i] = i % 7."""
    index = np.arange(first, first + count, dtype=np.int64)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.repeat(index[:, None], WIDTH, 1).astype(np.float32),
                         chunks=(chunk, WIDTH), compression=compression)
        f.create_dataset("index", data=index, chunks=(chunk,), compression=compression)
        f.create_dataset("label", data=index[:label_rows] % 7, chunks=(chunk,))
    return path


@pytest.fixture
def files(tmp_path) -> list[Path]:
    """Two files, 300 + 212 rows (512 in all); chunks of 32 rows."""
    return [write(tmp_path / "a.h5", 0, 300), write(tmp_path / "b.h5", 300, 212)]


def indices(batches) -> list[int]:
    return [int(i) for batch in batches for i in batch[1]]


# -- reading ------------------------------------------------------------------------------


def test_samples_match_the_files_across_files_in_every_form(files, tmp_path):
    ds = HDF5Dataset(str(tmp_path / "*.h5"), keys=("x", "index"), preload=False)
    assert ds.files == tuple(str(f) for f in files) and len(ds) == 512
    x, i = ds[301]
    assert int(i) == 301 and x.shape == (WIDTH,) and bool((x == 301).all())
    assert int(ds[-1][1]) == 511
    named = HDF5Dataset(files, keys={"features": "x", "y": "label"}, preload=False)
    assert set(named[5]) == {"features", "y"} and int(named[5]["y"]) == 5
    single = HDF5Dataset(files[1], keys="index", preload=False)
    assert int(single[0]) == 300
    batch = ds.__getitems__([0, 511, 37, 300])
    assert [int(s[1]) for s in batch] == [0, 511, 37, 300]
    for a, b in zip(batch, (ds[0], ds[511], ds[37], ds[300])):
        assert torch.equal(a[0], b[0])
    with pytest.raises(IndexError, match="512 samples"):
        ds[512]


def test_chunk_ranges_cover_the_data_in_whole_chunks_and_never_span_files(files):
    ds = HDF5Dataset(files, keys=("x", "index", "label"), preload=False)
    ranges = ds.chunk_ranges
    assert [i for r in ranges for i in r] == list(range(512))
    assert all(len(r) == CHUNK for r in ranges if r.stop not in (300, 512))
    assert not any(r.start < 300 < r.stop for r in ranges)
    assert ds.block_bytes == CHUNK * (WIDTH * 4 + 8 + 8)


def test_preload_gives_the_same_samples_and_transform_applies(files):
    lazy = HDF5Dataset(files, keys=("x", "index"), preload=False)
    loaded = HDF5Dataset(files, keys=("x", "index"), preload=True,
                         transform=lambda s: (s[0] * 2, s[1]))
    assert loaded.preloaded and loaded.preload_reason == "set explicitly"
    for i in (0, 299, 300, 511):
        assert torch.equal(loaded[i][0], lazy[i][0] * 2) and int(loaded[i][1]) == i
    sample = loaded[3]
    sample[0].fill_(-1)  # a sample is a copy: the preloaded data is untouched
    assert float(loaded[3][0][0]) == 6.0


@pytest.mark.parametrize("run_blocks", [1, 3, 1000])
def test_a_preload_read_in_runs_of_blocks_gives_every_row(files, monkeypatch, run_blocks):
    """A run per block, runs of three blocks (a file's last one shorter), a run per file:
    the same rows."""
    from autotune.sources import hdf5

    lazy = HDF5Dataset(files, keys=("x", "index"), preload=False)
    block_rows, row_bytes = len(lazy.chunk_ranges[0]), lazy.nbytes // len(lazy)
    run_rows = (run_blocks - 1) * block_rows + 1  # one row more than run_blocks - 1 blocks
    monkeypatch.setattr(hdf5, "PRELOAD_RUN_BYTES", run_rows * row_bytes)
    blocks = sum(block.file == 0 for block in lazy._blocks)
    assert blocks > 3
    runs = [run for run in hdf5._runs(lazy._blocks, run_rows) if run[0] == 0]
    assert len(runs) == -(-blocks // run_blocks)
    loaded = HDF5Dataset(files, keys=("x", "index"), preload=True)
    assert all(torch.equal(loaded[i][0], lazy[i][0]) and int(loaded[i][1]) == i
               for i in range(512))


@pytest.mark.parametrize("terminal", [True, False])
def test_a_preload_that_takes_a_while_shows_a_bar_on_a_terminal_only(files, monkeypatch, capsys,
                                                                      terminal):
    """A preload of many GB takes minutes: past the bar's delay (made 0 s here) a terminal
    sees a tqdm bar of the bytes read; a pipe or a log file sees nothing."""
    from autotune import _bar

    monkeypatch.setattr(_bar, "DELAY_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    loaded = HDF5Dataset(files, keys=("x", "index"), preload=True)
    assert [int(loaded[i][1]) for i in range(512)] == list(range(512))
    err = capsys.readouterr().err
    assert ("preloading 2 HDF5 file(s):" in err and "%|" in err) == terminal, err
    if not terminal:
        assert err == ""


def test_big_endian_data_comes_in_native_byte_order(tmp_path):
    path = tmp_path / "be.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(40, dtype=">f4").reshape(10, 4), chunks=(5, 4))
    for preload in (False, True):
        ds = HDF5Dataset(path, keys="x", preload=preload)
        assert ds[2].tolist() == [8.0, 9.0, 10.0, 11.0]
        assert ds.__getitems__([9])[0].tolist() == [36.0, 37.0, 38.0, 39.0]


def test_samples_of_no_bytes_preload(tmp_path):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("e", shape=(40, 0), dtype="f4")
    ds = HDF5Dataset(tmp_path / "empty.h5", keys="e", preload=True)
    assert len(ds) == 40 and ds[3].shape == (0,)


def test_preload_none_lets_the_rules_decide_with_the_reason(files):
    ds = HDF5Dataset(files, keys="index")
    assert ds.preloaded  # 4 KB against this machine's memory
    assert "fits in 50%" in ds.preload_reason


def test_preload_rule_weighs_the_data_against_memory_the_cgroup_and_the_ranks():
    hw = fake_hardware(total_bytes=16 * GIB, available_bytes=8 * GIB)
    assert chunks.preload(hw, 3 * GIB)[0]
    fits, why = chunks.preload(hw, 5 * GIB)
    assert not fits and "more than 50% of 8.59 GB available" in why
    limited = fake_hardware(total_bytes=16 * GIB, available_bytes=2 * GIB, limit_bytes=4 * GIB)
    fits, why = chunks.preload(limited, 1536 << 20)
    assert not fits and "cgroup limit 4.29 GB" in why
    four_ranks = fake_hardware(available_bytes=8 * GIB, local_world_size=4)
    fits, why = chunks.preload(four_ranks, 2 * GIB)
    assert not fits and "/ 4 ranks" in why
    assert chunks.preload(four_ranks, GIB)[0]
    assert not chunks.preload(fake_hardware(available_bytes=None, total_bytes=None), 1)[0]


def test_cache_plan_fits_the_window_in_the_budget_per_reading_process():
    hw = fake_hardware(available_bytes=10 * GIB)  # budget: 10% = 1 GiB over the readers
    plan = chunks.cache_plan(hw, workers=4, block_bytes=1 << 20, blocks=1000)
    assert (plan.window, plan.cache_bytes) == (8, 8 << 20) and "4 reading" in plan.reason
    tight = chunks.cache_plan(hw, workers=64, block_bytes=8 << 20, blocks=1000)
    assert tight.window == 2 and tight.cache_bytes == 16 << 20  # 1 GiB / 64 = 16 MiB
    small = chunks.cache_plan(hw, workers=0, block_bytes=1 << 20, blocks=3)
    assert small.window == 3 and small.cache_bytes == 3 << 20
    explicit = chunks.cache_plan(hw, workers=2, block_bytes=1 << 20, blocks=100,
                                 cache_bytes=3 << 20)
    assert explicit.window == 3 and "set explicitly" in explicit.reason
    assert "re-read" not in explicit.reason
    too_small = chunks.cache_plan(hw, workers=2, block_bytes=1 << 20, blocks=100,
                                  cache_bytes=1 << 19, window=8)
    assert too_small.window == 8 and "nothing is cached" in too_small.reason
    short = chunks.cache_plan(hw, workers=2, block_bytes=1 << 20, blocks=100,
                              cache_bytes=3 << 20, window=8)
    assert short.window == 8 and "decompress a chunk again" in short.reason


def test_a_window_of_cached_blocks_reads_each_chunk_once_per_epoch(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    blocks = len(ds.chunk_ranges)
    sampler = ChunkShuffleSampler(ds, window=4, seed=0)
    ds.set_cache_bytes(4 * ds.block_bytes, "a window of 4")
    loader = DataLoader(ds, batch_size=16, sampler=sampler)
    assert sorted(indices(loader)) == list(range(512))
    info = ds.cache_info()
    assert info.reads == blocks  # every block read exactly once
    assert info.peak_bytes <= info.limit_bytes == 4 * ds.block_bytes
    ds.clear_cache()
    shuffled = DataLoader(ds, batch_size=16, sampler=RandomSampler(range(512)))
    assert sorted(indices(shuffled)) == list(range(512))
    assert ds.cache_info().reads > 5 * blocks  # per-sample shuffling re-reads chunks


def test_a_small_cache_reuses_its_slots_and_serves_the_right_rows(files):
    block = HDF5Dataset(files, keys=("x", "index"), preload=False).block_bytes
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False, cache_bytes=3 * block + 1)
    order = np.random.default_rng(0).permutation(512)
    for start in range(0, 512, 24):  # batches across blocks, evicting as they go
        wanted = order[start:start + 24].tolist()
        batch = ds.__getitems__(wanted)
        assert [int(i) for _, i in batch] == wanted
        assert all(bool((x == i).all()) for x, i in batch)
        info = ds.cache_info()
        assert info.bytes == info.peak_bytes == 3 * ds.block_bytes <= info.limit_bytes
    assert int(ds[511][1]) == 511 and ds.cache_info().reads > 3 * len(ds.chunk_ranges)
    nothing = HDF5Dataset(files, keys=("x", "index"), preload=False, cache_bytes=1)
    assert [int(nothing[i][1]) for i in (5, 5, 400)] == [5, 5, 400]
    assert nothing.cache_info().peak_bytes == 0 and nothing.cache_info().reads == 3


# -- the sampler --------------------------------------------------------------------------


def test_every_sample_once_per_epoch_with_a_new_order_each_epoch(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    sampler = ChunkShuffleSampler(ds, window=3, seed=7)
    epochs = [list(sampler) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(512))
    assert len({tuple(o) for o in epochs}) == 3
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]  # set_epoch wins; the same seed, the same order
    assert list(ChunkShuffleSampler(ds, window=3, seed=7)) == epochs[0]


def test_batches_mix_a_window_of_chunks_and_no_more(files):
    """The randomness traded: the samples of a window of chunks come together, shuffled,
    so a batch mixes the chunks of the windows it spans (sample-level shuffling would mix
    ~batch_size chunks); the chunks come in a shuffled order."""
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    chunk_of = {i: c for c, r in enumerate(ds.chunk_ranges) for i in r}
    for window in (1, 2, 4):
        order = list(ChunkShuffleSampler(ds, window=window, seed=1))
        chunk_order = list(dict.fromkeys(chunk_of[i] for i in order))
        window_of = {c: k // window for k, c in enumerate(chunk_order)}
        windows = [window_of[chunk_of[i]] for i in order]
        assert windows == sorted(windows)  # a window's samples all come together
        spans = []
        for b in range(0, 512, 32):
            batch = order[b:b + 32]
            spans.append(len({chunk_of[i] for i in batch}))
            assert spans[-1] <= window * len({window_of[chunk_of[i]] for i in batch})
        assert np.mean(spans) >= min(window, 2)  # mixed, not chunk after chunk
        assert chunk_order != sorted(chunk_order)
    order = list(ChunkShuffleSampler(ds, window=2, seed=1))
    assert abs(np.corrcoef(order, np.arange(512))[0, 1]) < 0.5


def test_ranks_share_the_chunks_contiguously_with_distributed_sampler_padding(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    chunk_of = {i: c for c, r in enumerate(ds.chunk_ranges) for i in r}
    for world in (2, 3, 5):
        shares = [list(ChunkShuffleSampler(ds, seed=3, num_replicas=world, rank=r))
                  for r in range(world)]
        assert len({len(s) for s in shares}) == 1
        counts = collections.Counter(i for s in shares for i in s)
        assert set(counts) == set(range(512))
        assert sum(counts.values()) - 512 == (-512) % world  # padding, as DistributedSampler
        chunks_of = [{chunk_of[i] for i in s} for s in shares]
        shared = sum(len(a & b) for k, a in enumerate(chunks_of) for b in chunks_of[k + 1:])
        assert shared <= world  # a chunk is read on one rank, two at a share's edge
    cut = [list(ChunkShuffleSampler(ds, seed=3, num_replicas=3, rank=r, drop_last=True))
           for r in range(3)]
    assert [len(s) for s in cut] == [170] * 3 and len(set(sum(cut, []))) == 510


def test_stripes_give_each_worker_its_own_chunks(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    chunk_of = {i: c for c, r in enumerate(ds.chunk_ranges) for i in r}
    sampler = ChunkShuffleSampler(ds, window=2, seed=0, batch_size=24, num_workers=3)
    order = list(sampler)
    assert sorted(order) == list(range(512))
    batches = [order[b:b + 24] for b in range(0, 512, 24)]
    per_worker = [{chunk_of[i] for b in batches[w::3] for i in b} for w in range(3)]
    overlap = sum(len(a & b) for k, a in enumerate(per_worker) for b in per_worker[k + 1:])
    assert overlap <= 2  # a chunk split at a stripe's edge


def test_sampler_arguments_are_checked(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    for kwargs, match in (({"window": 0}, "window=0"), ({"num_replicas": 2, "rank": 2}, "rank=2"),
                          ({"batch_size": 0}, "batch_size=0"), ({"seed": -1}, "seed=-1"),
                          ({"num_workers": -1}, "num_workers=-1")):
        with pytest.raises(InvalidConfigError, match=match):
            ChunkShuffleSampler(ds, **kwargs)
    with pytest.raises(InvalidConfigError, match="chunk_ranges"):
        ChunkShuffleSampler(list(range(10)))


# -- workers, the factory, ranks ------------------------------------------------------------


def with_worker(sample):
    """transform: (the sample's index, which worker made it)."""
    info = get_worker_info()
    return sample[1], torch.tensor(-1 if info is None else info.id)


def test_workers_get_every_sample_once_each_reading_its_own_chunks(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False, transform=with_worker)
    ds[0]  # an open file and a cached block in the parent: the forked workers drop them
    chunk_of = {i: c for c, r in enumerate(ds.chunk_ranges) for i in r}
    sampler = ChunkShuffleSampler(ds, window=2, seed=0, batch_size=16, num_workers=2)
    loader = DataLoader(ds, batch_size=16, sampler=sampler, num_workers=2)
    for _ in range(2):
        seen = [(int(i), int(w)) for index, worker in loader for i, w in zip(index, worker)]
        assert sorted(i for i, _ in seen) == list(range(512))
        readers = collections.defaultdict(set)
        for i, w in seen:
            readers[chunk_of[i]].add(w)
        assert sum(len(r) > 1 for r in readers.values()) <= 1  # one chunk at the stripe edge


def test_spawned_workers_receive_the_dataset_without_handles(files):
    for preload in (False, True):
        ds = HDF5Dataset(files, keys=("x", "index"), preload=preload)
        ds[0]  # opens a file and caches a block in this process
        copy = pickle.loads(pickle.dumps(ds))
        assert copy.cache_info().reads == 0 and int(copy[300][1]) == 300
        loader = DataLoader(ds, batch_size=64, num_workers=1, multiprocessing_context="spawn")
        assert sorted(indices(loader)) == list(range(512))


def test_the_factory_gives_training_the_chunk_sampler_and_sizes_the_cache(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware())
    with factory.create_training_loader(ds, batch_size=16, num_workers=2,
                                        drop_last=False) as loader:
        assert isinstance(loader.sampler, ChunkShuffleSampler)
        assert (loader.sampler.num_workers, loader.sampler.batch_size) == (2, 16)
        explained = loader.autotune_config.explain()
        assert "ChunkShuffleSampler(window=8)" in explained
        assert "cache_bytes" in explained and "2 reading process(es)" in explained
        assert ds.cache_bytes == 8 * ds.block_bytes
        for _ in range(2):
            assert sorted(indices(loader)) == list(range(512))
    val = factory.create_validation_loader(ds, batch_size=100)
    assert indices(val) == list(range(512))  # in order


def test_an_explicit_shuffle_is_honoured(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware())
    shuffled = factory.create_training_loader(ds, batch_size=16, num_workers=0, shuffle=True)
    assert isinstance(shuffled.sampler, ChunkShuffleSampler)
    ordered = factory.create_training_loader(ds, batch_size=16, num_workers=0, shuffle=False)
    assert indices(ordered) == list(range(512))


def test_the_factory_keeps_a_users_cache_and_shuffles_preloaded_data_plainly(files):
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware())
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False, cache_bytes=3 * 270_000)
    loader = factory.create_training_loader(ds, batch_size=16, num_workers=0)
    assert ds.cache_bytes == 810_000 and loader.sampler.window == 3
    assert "set explicitly" in loader.autotune_config.reasons["cache_bytes"]
    loaded = HDF5Dataset(files, keys=("x", "index"), preload=True)
    loader = factory.create_training_loader(loaded, batch_size=16, num_workers=0)
    # a plain shuffle: a seeded factory's orders each epoch from (seed, epoch)
    assert type(loader.sampler) is EpochDistributedSampler and loader.sampler.num_replicas == 1
    assert "preloaded: set explicitly" in loader.autotune_config.explain()


def test_preloaded_data_too_big_for_dev_shm_warns_before_spawned_workers_fail(files):
    small = fake_hardware(shm_free_bytes=1 << 20)
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=small)
    loaded = HDF5Dataset(files, keys=("x", "index"), preload=True)  # 4.2 MB
    with pytest.warns(UserWarning, match=r"spawn workers through /dev/shm, which has 0\.00 GB"):
        factory.create_training_loader(loaded, batch_size=16, num_workers=1,
                                       multiprocessing_context="spawn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forked workers share the pages: nothing to warn of
        factory.create_training_loader(loaded, batch_size=16, num_workers=1,
                                       multiprocessing_context="fork")


def test_several_hdf5_loaders_in_one_loop_each_read_chunk_wise(files, tmp_path):
    other = HDF5Dataset(write(tmp_path / "other.h5", 0, 96), keys=("x", "index"),
                        preload=False)
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware())
    multi = factory.create_training_loaders({"a": ds, "b": other}, batch_size=16,
                                            strategy="round_robin", stop="max",
                                            num_workers=1, drop_last=False)
    seen = collections.defaultdict(list)
    for name, batch in multi:
        seen[name] += [int(i) for i in batch[1]]
    assert sorted(seen["a"]) == list(range(512)) and sorted(seen["b"]) == list(range(96))
    for loader in multi.loaders.values():
        assert isinstance(loader.sampler, ChunkShuffleSampler)
        assert "ChunkShuffleSampler" in loader.autotune_config.explain()
        loader.close()


def slow(sample):
    """transform: 6 ms a sample, so that the re-tuner adds workers."""
    time.sleep(0.006)
    return sample


def test_adapt_restripes_the_chunks_for_the_workers_it_moved_to(tmp_path):
    path = write(tmp_path / "slow.h5", 0, 320)
    ds = HDF5Dataset(path, keys=("x", "index"), preload=False, transform=slow)
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware(),
                                                profile_dir=tmp_path)
    loader = factory.create_training_loader(ds, batch_size=8, num_workers=0, adapt=True,
                                            adapt_every=8)
    sampler = loader._order.source.sampler
    assert isinstance(sampler, ChunkShuffleSampler)
    for _ in range(2):
        seen = []
        for batch in loader:
            if not seen:  # an epoch starts with stripes for the workers it runs with
                assert sampler.num_workers == loader.num_workers
                starting = loader.num_workers
            seen += [int(i) for i in batch[1]]
            time.sleep(0.1)
        assert sorted(seen) == list(range(320))
    assert starting > 0  # grown in the first epoch: the second one was striped again
    loader.close()


def test_trials_read_chunks_through_the_builder(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    config = autotune.LoaderConfig(num_workers=2)
    loader = build_loader(ds, 16, config, shuffle=True,
                          extra={"generator": torch.Generator().manual_seed(1)})
    assert isinstance(loader.sampler, ChunkShuffleSampler) and loader.sampler.num_workers == 2
    assert sorted(indices(loader)) == list(range(512))


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_with_workers_see_every_sample_once_per_epoch(files, tmp_path):
    out = tmp_path / "seen.json"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "hdf5_ranks_script.py"), str(tmp_path), str(out)],
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["sampler"] for r in ranks] == ["ChunkShuffleSampler"] * 2
    for epoch in range(2):
        zero, one = ranks[0]["epochs"][epoch], ranks[1]["epochs"][epoch]
        assert len(zero) == len(one) == 256
        assert sorted(zero + one) == list(range(512))
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]
    # evaluation: in order, unpadded, each rank one run of consecutive samples
    assert ranks[0]["val"] == list(range(256)) and ranks[1]["val"] == list(range(256, 512))


# -- measuring ------------------------------------------------------------------------------


class SlowChunks(torch.utils.data.Dataset):
    """A chunked dataset whose first read of a 100-sample chunk takes 50 ms."""

    def __init__(self) -> None:
        self.chunk_ranges = tuple(range(s, s + 100) for s in range(0, 2000, 100))
        self.read: set[int] = set()

    def __len__(self) -> int:
        return 2000

    def __getitem__(self, index: int) -> torch.Tensor:
        if index // 100 not in self.read:
            self.read.add(index // 100)
            end = time.perf_counter() + 0.05
            while time.perf_counter() < end:
                pass
        return torch.zeros(4)

    def clear_cache(self) -> None:
        self.read.clear()


def test_measuring_spreads_each_chunk_read_over_its_samples():
    ds = SlowChunks()
    for _ in range(2):  # cached chunks are cleared: the second measurement is no cheaper
        profile = measure_workload(ds)
        assert 0.3e-3 < profile.sec_per_sample < 2e-3  # ~0.5 ms: 50 ms over 100 samples
        assert 0.3e-3 < profile.single_thread_sec_per_sample < 2e-3


# -- bad input --------------------------------------------------------------------------------


def test_a_missing_key_names_the_file_and_the_key(files, tmp_path):
    other = tmp_path / "c.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros((10, WIDTH), np.float32))
    with pytest.raises(DataFileError) as err:
        HDF5Dataset([*files, other], keys=("x", "index"))
    assert err.value.path == str(other) and err.value.key == "index"
    message = str(err.value)
    assert "c.h5" in message and "'index'" in message and "it has: x" in message


def test_mismatched_lengths_name_the_file_and_both_keys(tmp_path):
    bad = write(tmp_path / "short.h5", 0, 100, label_rows=90)
    with pytest.raises(DataFileError,
                       match=r"short\.h5', key 'x': has 100 rows but key 'label' has 90"):
        HDF5Dataset(bad, keys=("x", "label"))


def test_samples_of_another_shape_in_one_file_are_refused(files, tmp_path):
    odd = tmp_path / "odd.h5"
    with h5py.File(odd, "w") as f:
        f.create_dataset("x", data=np.zeros((10, 3), np.float32))
        f.create_dataset("index", data=np.zeros(10, np.int64))
    with pytest.raises(DataFileError, match=r"odd\.h5.*'x'.*\(3,\).*a\.h5"):
        HDF5Dataset([*files, odd], keys=("x", "index"))


def test_a_truncated_file_names_the_file_and_the_keys(files):
    size = os.path.getsize(files[1])
    with open(files[1], "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(DataFileError) as err:
        HDF5Dataset(files, keys=("x", "index"))
    assert err.value.path == str(files[1])
    assert "truncated" in str(err.value) and "'x', 'index'" in str(err.value)


def test_a_corrupt_chunk_names_the_file_key_and_rows_when_read(tmp_path):
    path = write(tmp_path / "bad.h5", 0, 128)
    with h5py.File(path, "r") as f:
        info = f["x"].id.get_chunk_info(1)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\x00" * 64)
    ds = HDF5Dataset(path, keys=("x", "index"), preload=False)
    assert int(ds[0][1]) == 0  # the other chunks still read
    with pytest.raises(DataFileError, match=r"bad\.h5.*'x'.*rows 32-63 could not be read"):
        ds[40]
    with pytest.raises(DataFileError, match=r"bad\.h5.*'x'.*could not be preloaded"):
        HDF5Dataset(path, keys=("x", "index"), preload=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"files": []}, "non-empty list"),
    ({"files": "nowhere/*.h5"}, "matches no file"),
    ({"files": "missing.h5"}, "does not exist"),
    ({"keys": ()}, "at least one"),
    ({"keys": 3}, "keys=3"),
    ({"transform": 5}, "transform=5"),
    ({"cache_bytes": 0}, "cache_bytes=0"),
    ({"preload": "yes"}, "preload='yes'"),
])
def test_bad_arguments_name_the_parameter(files, kwargs, match):
    arguments = {"files": files, "keys": ("x",), **kwargs}
    with pytest.raises(InvalidConfigError, match=match):
        HDF5Dataset(arguments.pop("files"), arguments.pop("keys"), **arguments)


def test_a_group_a_scalar_or_text_is_not_a_sample_array(tmp_path):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as f:
        f.create_group("grp")
        f.create_dataset("scalar", data=3)
        f.create_dataset("text", data=np.array([b"a", b"b"]))
    for key, match in (("grp", "is a Group"), ("scalar", "is a scalar"), ("text", "no torch")):
        with pytest.raises(DataFileError, match=match):
            HDF5Dataset(path, keys=key)


def test_a_file_listed_twice_is_refused(files, tmp_path):
    with pytest.raises(InvalidConfigError, match=r"a\.h5' is listed twice.*each file once"):
        HDF5Dataset([files[0], str(tmp_path / "*.h5")], keys=("x", "index"))


def test_big_endian_files_after_the_first_are_read_in_native_order(tmp_path):
    paths = []
    for n, first in enumerate((0, 10)):
        paths.append(tmp_path / f"be{n}.h5")
        with h5py.File(paths[-1], "w") as f:
            f.create_dataset("x", data=np.arange(first, first + 10, dtype=">f4")[:, None],
                             chunks=(5, 1))
    ds = HDF5Dataset(paths, keys="x", preload=False)
    assert [float(ds[i][0]) for i in (3, 15)] == [3.0, 15.0]


def test_an_array_type_per_row_is_refused_with_the_shape_to_store(tmp_path):
    path = tmp_path / "sub.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", (10,), dtype=np.dtype(("f4", (3,))))
    with pytest.raises(DataFileError, match=r"'x': holds an array type.*shape \(rows, 3\)"):
        HDF5Dataset(path, keys="x")


def test_a_dangling_link_is_named_as_one(files):
    with h5py.File(files[0], "a") as f:
        f["ghost"] = h5py.SoftLink("/nowhere")
    with pytest.raises(DataFileError, match="'ghost' is a link to nothing"):
        HDF5Dataset(files[0], keys="ghost")


def test_a_file_rewritten_after_the_build_is_named_and_the_cache_stays_consistent(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False,
                     cache_bytes=2 * HDF5Dataset(files, keys=("x", "index")).block_bytes)
    write(files[1], 300, 40)  # fewer rows than the dataset was built with
    for index in (400, 450, 500):
        with pytest.raises(DataFileError, match=r"b\.h5', key 'x'.*changed since the dataset "
                                                r"was built"):
            ds[index]
    assert [int(ds[i][1]) for i in (0, 40, 80)] == [0, 40, 80]
    info = ds.cache_info()
    assert info.bytes == 2 * ds.block_bytes == info.limit_bytes


def test_a_workers_data_file_error_reaches_the_caller_as_one(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    os.remove(files[1])
    loader = DataLoader(ds, batch_size=64, num_workers=1)
    with pytest.raises(DataFileError, match=r"b\.h5.*cannot be opened") as err:
        list(loader)
    assert isinstance(err.value, autotune.AutotuneError)
    copy = pickle.loads(pickle.dumps(DataFileError(files[1], "x", "broken")))
    assert (copy.path, copy.key, str(copy)) == (str(files[1]), "x", f"{str(files[1])!r}, key "
                                                "'x': broken")


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 on 2 CPUs
def test_training_workers_keep_their_cache_when_validation_replans_the_dataset(files):
    def limits(batch):
        return torch.tensor([torch.utils.data.get_worker_info().dataset.cache_info().limit_bytes])

    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    tight = fake_hardware(total_bytes=30 * ds.block_bytes)  # 10%: 3 blocks for the caches
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=tight, measure=False)
    with pytest.warns(UserWarning, match="less than one block"):
        train = factory.create_training_loader(ds, batch_size=16, num_workers=4,
                                               collate_fn=limits)
    planned = ds.cache_bytes
    factory.create_validation_loader(ds, batch_size=16, num_workers=0)
    assert ds.cache_bytes != planned  # one reading process: a larger share
    with train:
        assert {int(t) for t in train} == {planned}
    plan = chunks.cache_plan(tight, workers=4, block_bytes=ds.block_bytes, blocks=17)
    assert plan.cache_bytes == ds.block_bytes and "less than one block" in plan.reason


def test_shuffle_false_under_ranks_reads_each_ranks_run_in_file_order(files, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware())
        loader = factory.create_training_loader(ds, batch_size=16, num_workers=0,
                                                shuffle=False)
        assert isinstance(loader.sampler, ChunkShuffleSampler) and not loader.sampler.shuffle
        seen.append(indices(loader))
    assert seen == [list(range(256)), list(range(256, 512))]


def test_without_h5py_the_error_says_how_to_install_it(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"autotune\[hdf5\]"):
        HDF5Dataset(files, keys="x")


def test_a_split_of_a_chunked_dataset_warns_that_it_reads_sample_by_sample(files):
    ds = HDF5Dataset(files, keys=("x", "index"), preload=False)
    factory = autotune.OptimalDataLoaderFactory(seed=0, hardware=fake_hardware())
    with pytest.warns(UserWarning, match="Split by files instead"):
        train, _, _ = factory.create_dataloaders(ds, 16, splits=(0.5, 0.5, None),
                                                 num_workers=0)
    assert len(indices(train)) == 256


class Chunked:
    """Only what a ChunkShuffleSampler reads: a length and the chunks' ranges."""

    def __init__(self, sizes: list[int]) -> None:
        starts = np.cumsum([0, *sizes])
        self.chunk_ranges = tuple(range(a, b) for a, b in itertools.pairwise(starts))

    def __len__(self) -> int:
        return self.chunk_ranges[-1].stop


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30), window=st.integers(1, 6),
       world=st.integers(1, 4), workers=st.integers(0, 4), batch=st.integers(1, 50),
       drop_last=st.booleans(), shuffle=st.booleans(), seed=st.integers(0, 2**31))
def test_any_chunking_ranks_and_workers_keep_distributed_sampler_semantics(
        sizes, window, world, workers, batch, drop_last, shuffle, seed):
    ds = Chunked(sizes)
    size = len(ds)
    shares = [list(ChunkShuffleSampler(ds, window=window, seed=seed, shuffle=shuffle,
                                       num_replicas=world, rank=r, drop_last=drop_last,
                                       batch_size=batch, num_workers=workers))
              for r in range(world)]
    per_rank = size // world if drop_last else -(-size // world)
    assert [len(s) for s in shares] == [per_rank] * world
    counts = collections.Counter(i for s in shares for i in s)
    assert all(0 <= i < size for i in counts)
    if drop_last:
        assert set(counts.values()) <= {1} and len(counts) == per_rank * world
    else:
        assert set(counts) == set(range(size))  # every sample, the padding repeats a few
        assert sum(counts.values()) - size == per_rank * world - size
    if workers > 1:  # batch i comes from stripe i % workers, a contiguous run of chunks
        chunk_of = {i: c for c, r in enumerate(ds.chunk_ranges) for i in r}
        for share in shares:
            batches = [share[b:b + batch] for b in range(0, len(share), batch)]
            stripes = [{chunk_of[i] for b in batches[w::workers] for i in b}
                       for w in range(workers)]
            extra = sum(sum(c in s for s in stripes) - 1 for c in set.union(*stripes))
            # a chunk read again at each stripe's edge, and where padding wraps around
            assert extra <= workers - 1 + max(0, per_rank * world - size)
