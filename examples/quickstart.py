"""Probe this machine, recommend settings for an example dataset, build the loader, run one epoch.

    bash scripts/demo.sh        (or: python examples/quickstart.py, with autotune installed)
"""

from __future__ import annotations

import time

from torch.utils.data import DataLoader

import autotune
from autotune.cli import format_hardware

from datasets import make_dataset

BATCH_SIZE = 64


def samples_per_s(loader: DataLoader, seconds: float | None = None) -> tuple[int, float]:
    """Iterate one epoch (or stop after ``seconds``): (samples seen, samples/s)."""
    seen, start = 0, time.perf_counter()
    for images, _labels in loader:
        seen += images.shape[0]
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    return seen, seen / (time.perf_counter() - start)


def main() -> None:
    print("== This machine (autotune probe)")
    hardware = autotune.probe_hardware()
    print(format_hardware(hardware))

    dataset = make_dataset()
    print(f"\n== Example dataset: {len(dataset)} synthetic 3x64x64 images, 2 ms storage "
          "latency each, random flips")
    workload = autotune.measure_workload(dataset)
    print(f"measured: {workload.sec_per_sample * 1e3:.2f} ms/sample, "
          f"CPU {workload.cpu_fraction:.0%} of that, {workload.sample_bytes / 1e3:.0f} kB/sample")

    factory = autotune.OptimalDataLoaderFactory()
    config = factory.get_optimal_config(len(dataset), has_augmentation=True,
                                        batch_size=BATCH_SIZE, workload=workload)
    print("\n== Recommended settings (autotune recommend, with the measurement)")
    print(config.explain())

    loader = factory.create_training_loader(dataset, batch_size=BATCH_SIZE,
                                            has_augmentation=True, workload=workload)
    print(f"\n== One epoch with the factory's loader ({type(loader).__name__}, a DataLoader)")
    seen, rate = samples_per_s(loader)
    print(f"{seen} samples in {seen / rate:.2f} s: {rate:,.0f} samples/s")

    _, default_rate = samples_per_s(DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True),
                                    seconds=2.0)
    print(f"torch's defaults (num_workers=0), 2 s sample: {default_rate:,.0f} samples/s "
          f"-> the factory's loader is {rate / default_rate:.1f}x faster here")


if __name__ == "__main__":
    main()
