"""Example datasets for the quick start and for
``autotune tune examples/datasets.py:make_dataset``."""

from __future__ import annotations

import time

import torch
from torch.utils.data import Dataset


class SyntheticImages(Dataset):
    """3x64x64 float images with a label, made from the index (so every run sees the same data).

    ``latency_s`` waits per sample the way a read from network storage or a slow disk does;
    ``augment`` flips half the images at random, drawing from torch's per-worker RNG.
    """

    def __init__(self, size: int = 4096, *, latency_s: float = 0.002, augment: bool = True,
                 image_size: int = 64) -> None:
        self.size = size
        self.latency_s = latency_s
        self.augment = augment
        self.image_size = image_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        if self.latency_s:
            time.sleep(self.latency_s)
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, self.image_size, self.image_size, generator=generator)
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, index % 10


def make_dataset() -> SyntheticImages:
    """The quick start's dataset: 4096 images, 2 ms of simulated storage latency each."""
    return SyntheticImages()
