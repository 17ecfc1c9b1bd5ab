"""Run inside a mount namespace with a 64 MB /dev/shm (see test_safety.py): 2 MB samples,
batches of 8, a slow consumer so batches pile up in shared memory."""

import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader, Dataset

import autotune


class Big(Dataset):
    def __len__(self) -> int:
        return 96

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.005)  # waits like storage: the rules want many workers
        return torch.full((500_000,), float(index))  # 2 MB


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if sys.argv[1] == "plain":  # 4 workers x prefetch 2 x 16 MB = 128 MB in flight
        loader = DataLoader(Big(), batch_size=8, num_workers=4, prefetch_factor=2)
    else:
        loader = autotune.OptimalDataLoaderFactory().create_training_loader(Big(), batch_size=8)
    seen = 0
    for batch in loader:
        time.sleep(0.2)  # a slow training step
        seen += batch.shape[0]
    print("completed", seen, getattr(loader, "autotune_config", None) and
          (loader.num_workers, loader.prefetch_factor))
