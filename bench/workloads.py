"""The benchmark's workloads: the kinds of data loading people have, made on this machine.

Sizes are large enough that a measuring window spans few epoch boundaries even with
64 workers (a persistent pool refills at each new epoch, which makes small datasets noisy).

Each maker returns (name, dataset, batch size); datasets are module-level classes so they
pickle, deterministic from the index, and make their files under a temporary directory.
``ShardedStream`` is an ``IterableDataset`` (a stream of unknown length, no ``__len__``):
deterministic from the shard and the position in it, each worker reading its own shards.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info


class StorageLatency(Dataset):
    """Network storage: a heavy-tailed wait (lognormal, median ~2 ms, 1 in 100 over 20 ms)."""

    median_s, sigma, cap_s = 0.002, 1.0, 0.2

    def __init__(self, n: int = 40_000) -> None:
        rng = random.Random(0)
        self.waits = [min(self.cap_s, rng.lognormvariate(np.log(self.median_s), self.sigma))
                      for _ in range(n)]

    def __len__(self) -> int:
        return len(self.waits)

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.waits[index])
        return torch.full((256,), float(index))


class HeavyTailLatency(StorageLatency):
    """Network storage with a heavier tail: lognormal waits, median 1 ms, sigma 1.5 (mean
    ~3.1 ms, 1 in 100 over 33 ms, capped at 0.5 s): a sample of 128 usually misses the
    slowest reads, so its mean is low more often than high."""

    median_s, sigma, cap_s = 0.001, 1.5, 0.5


class ShardedStream(IterableDataset):
    """WebDataset-style shards on network storage: ``shards`` shard files of
    ``per_shard`` samples each, read in order, worker ``w`` of ``W`` taking shards
    w, w+W, ... (so with many workers each has few shards, and an epoch ends when the
    worker with the most shards is done). Reading a sample waits as ``StorageLatency`` does
    (lognormal, median ~2 ms, sigma 1, capped), drawn per shard from a seed (the same waits
    every epoch), then decodes it: 1,024 raw values into a 256-float tensor, ~0.07 ms of CPU
    alone, ~0.4 ms as measured after each wait on a 2-CPU VM (waking costs too).
    Yields (tensor, label).
    No ``__len__``: a stream of unknown length, as a WebDataset pipeline is.
    """

    median_s, sigma, cap_s = StorageLatency.median_s, StorageLatency.sigma, StorageLatency.cap_s

    def __init__(self, shards: int = 256, per_shard: int = 78, seed: int = 0) -> None:
        self.shards, self.per_shard, self.seed = shards, per_shard, seed

    @property
    def samples(self) -> int:
        """Samples in one epoch (for the report; the loader does not know it)."""
        return self.shards * self.per_shard

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard in range(worker, self.shards, workers):
            yield from self._read_shard(shard)

    def _read_shard(self, shard: int):
        rng = random.Random(self.seed * 1_000_003 + shard)  # the same waits every epoch
        for i in range(self.per_shard):
            time.sleep(min(self.cap_s, rng.lognormvariate(np.log(self.median_s), self.sigma)))
            label = shard * self.per_shard + i
            raw = np.random.default_rng(self.seed * 1_000_003 + label).standard_normal(
                1024, dtype=np.float32)
            yield torch.from_numpy(raw.reshape(256, 4).mean(1)), label


class JpegFiles(Dataset):
    """JPEG files decoded with Pillow, randomly cropped and flipped, scaled to float."""

    def __init__(self, directory: Path, n: int = 20_000, files: int = 256) -> None:
        from PIL import Image

        self.paths = []
        rng = np.random.default_rng(0)
        for i in range(files):
            path = directory / f"img{i:04d}.jpg"
            if not path.exists():
                pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path, quality=90)
            self.paths.append(str(path))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[index % len(self.paths)]) as image:
            image = image.convert("RGB")
            left, top = random.randint(0, 96), random.randint(0, 16)
            image = image.crop((left, top, left + 224, top + 224))
            if random.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)


class Hdf5Samples(Dataset):
    """One sample per read from an HDF5 file (h5py), opened once per process."""

    def __init__(self, path: Path, n: int = 20000) -> None:
        import h5py

        if not path.exists():
            with h5py.File(path, "w") as f:
                data = f.create_dataset("x", (n, 3, 32, 32), dtype="float32",
                                        chunks=(1, 3, 32, 32))
                block = np.random.default_rng(0).random((1000, 3, 32, 32), dtype=np.float32)
                for start in range(0, n, 1000):
                    data[start:start + 1000] = block
        self.path, self.n = str(path), n
        self._file, self._pid = None, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        import h5py

        if self._pid != os.getpid():  # h5py handles must not cross a fork
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return torch.from_numpy(self._file["x"][index])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": None}


class BlasAugment(Dataset):
    """Numerical augmentation with BLAS: a random 384x384 rotation-like matmul per sample."""

    def __init__(self, n: int = 8000) -> None:
        self.base = np.random.default_rng(0).random((384, 384))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        mixed = self.base @ self.base.T
        return torch.from_numpy(mixed[:16, :16].astype(np.float32) + index)


class TinySamples(Dataset):
    """One number per sample: overhead-bound."""

    def __init__(self, n: int = 100_000) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class LargeTensors(Dataset):
    """600 KB tensors that cost almost nothing to make."""

    def __init__(self, n: int = 3000) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((150_000,), float(index))


def all_workloads(directory: Path) -> list[tuple[str, Dataset, int]]:
    return [
        ("storage latency, heavy tail", StorageLatency(), 64),
        ("storage latency, heavier tail", HeavyTailLatency(), 64),
        ("stream: sharded, storage latency", ShardedStream(), 64),
        ("JPEG decode (Pillow)", JpegFiles(directory), 32),
        ("HDF5 per-sample reads (h5py)", Hdf5Samples(directory / "samples.h5"), 64),
        ("tiny samples", TinySamples(), 64),
        ("large cheap tensors (600 KB)", LargeTensors(), 64),
        ("BLAS augmentation (numpy)", BlasAugment(), 64),  # last: its grid takes ~20 minutes
    ]
