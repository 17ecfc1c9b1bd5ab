"""Soak: many epochs through persistent workers, worker memory measured (USS, MiB).

The parent holds a large Python heap, as a training script does (metadata, vocabularies);
forked workers share it until they write to it. A plain DataLoader's workers copy those
pages when their garbage collector walks the inherited objects; autotune's workers freeze
them out of its reach first. The dataset itself is numpy-backed, so only that differs.

    python bench/soak.py [--epochs 30]     (about 2 minutes; prints a Markdown table)
"""

from __future__ import annotations

import argparse
import gc
import sys

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

import autotune

MIB = 1 << 20


class ArrayBacked(Dataset):
    def __init__(self, size: int = 200_000) -> None:
        self.values = np.arange(size, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(self.values[index])])


def worker_uss(loader: DataLoader) -> float:
    return max(psutil.Process(w.pid).memory_full_info().uss for w in loader._iterator._workers)


def soak(label: str, loader: DataLoader, epochs: int) -> list[str]:
    readings = {}
    for epoch in range(1, epochs + 1):
        for _ in loader:
            pass
        if epoch in (1, epochs // 3, epochs):
            readings[epoch] = worker_uss(loader) / MIB
    first, last = readings[1], readings[epochs]
    print(f"{label}: {readings}", file=sys.stderr)
    return [f"| {label} | {epochs} | {first:,.1f} | {last:,.1f} | {last - first:+,.1f} |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    heap = [{"id": i, "name": f"item-{i}", "tags": [i, i + 1]} for i in range(1_000_000)]
    dataset = ArrayBacked()
    rows = ["| loader (2 persistent workers, batch 500) | epochs | worker USS after epoch 1 "
            "(MiB) | after the last | growth |", "|---|---|---|---|---|"]
    plain = DataLoader(dataset, batch_size=500, shuffle=True, num_workers=2,
                       persistent_workers=True)
    rows += soak("plain torch DataLoader", plain, args.epochs)
    del plain
    gc.collect()
    factory = autotune.OptimalDataLoaderFactory(measure=False)
    tuned = factory.create_training_loader(dataset, batch_size=500, num_workers=2)
    rows += soak("autotune factory loader", tuned, args.epochs)
    print(f"Parent heap: {len(heap):,} Python dicts "
          f"({psutil.Process().memory_info().rss / MIB:,.0f} MiB RSS).\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
