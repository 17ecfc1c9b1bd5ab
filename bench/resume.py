"""What exactly-once costs: the checks per epoch, per-sample seeding, a mid-epoch resume.

In one process, best of several rounds:
- the draw-ahead check (``loading.inputs.epoch_inputs`` + ``policy.epochs.why_stale``) for
  torch's samplers over 1,000,000 samples: the cost per epoch of drawing ahead safely;
- the dataset-change check (``dataset_summary`` and ``changed``) for a small dataset and one
  holding 1,281,167 (path, class) samples, as an ImageNet folder does;
- per-sample seeding (``loading.seeding.seeded_items``) against plain ``dataset[i]`` for a
  tiny sample (an int) and a real one (a 500x375 JPEG decoded and resized by Pillow);
- the time from ``load_state_dict`` to the first batch, resuming at the middle of a
  1,000,000-sample epoch (batch 256, the factory's seeded loader, no workers).

    python bench/resume.py            # ~1 minute; writes bench/RESULTS-resume.md
"""

from __future__ import annotations

import datetime
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import (BatchSampler, Dataset, DistributedSampler, RandomSampler,
                              WeightedRandomSampler)

import autotune
from autotune.loading.inputs import dataset_summary, epoch_inputs, random_source
from autotune.loading.seeding import seeded_items
from autotune.policy.epochs import changed, why_stale

N = 1_000_000


class Ints(Dataset):
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


class Folder(Ints):
    """Holds what an ImageNet ImageFolder holds: a list of (path, class)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.samples = [(f"/data/train/n{i % 1000:08d}/img_{i:08d}.JPEG", i % 1000)
                        for i in range(size)]
        self.classes = [f"n{i:08d}" for i in range(1000)]
        self.transform_size = 224


class Tiny(Ints):
    """One number per sample, as bench/workloads.py's tiny samples."""

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        return torch.tensor([float(index)])


class Jpegs(Dataset):
    """A 500x375 photo-like JPEG (gradients and noise), decoded, cropped, resized to 224."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        x = np.linspace(0, 1, 500)[None, :, None]
        y = np.linspace(0, 1, 375)[:, None, None]
        base = rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * y
        pixels = np.clip(base + rng.normal(0, 24, (375, 500, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        self.data = buffer.getvalue()

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> torch.Tensor:
        image = Image.open(io.BytesIO(self.data)).convert("RGB")
        top = int(torch.randint(0, 100, ()))
        image = image.crop((top, 0, top + 375, 375)).resize((224, 224), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy())


def best(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def draw_ahead_checks() -> list[tuple[str, float]]:
    data = Ints(N)
    samplers = {
        "RandomSampler(generator=g)": RandomSampler(data, generator=torch.Generator()),
        "RandomSampler (global generator)": RandomSampler(data),
        "WeightedRandomSampler, 1M weights": WeightedRandomSampler(torch.ones(N), N),
        "DistributedSampler": DistributedSampler(data, num_replicas=1, rank=0),
    }
    rows = []
    for name, sampler in samplers.items():
        batches = BatchSampler(sampler, 256, False)
        source = random_source(sampler)

        def check(batches=batches, sampler=sampler, source=source) -> None:
            random = source.get() if source is not None else None
            drawn = epoch_inputs(batches, sampler, data, random)
            now = epoch_inputs(batches, sampler, data, random)
            why_stale(drawn, now, expected=random)

        rows.append((name, best(check)))
    return rows


def dataset_checks() -> list[tuple[str, float]]:
    rows = []
    for name, dataset in (("a dataset of 3 scalar attributes", Ints(N)),
                          ("an ImageNet-size folder (1,281,167 samples)", Folder(1_281_167))):
        before = dataset_summary(dataset)
        rows.append((name, best(lambda d=dataset, b=before: changed(b, dataset_summary(d)))))
    return rows


def seeding_costs() -> list[tuple[str, float, float]]:
    """Per sample, plain and seeded, in interleaved rounds (the best of each)."""
    rows = []
    for name, dataset, count in (("tiny (`torch.tensor([float(i)])`)", Tiny(10_000), 10_000),
                                 ("real (a 500x375 JPEG decoded, cropped, resized to 224)",
                                  Jpegs(), 100)):
        indices = list(range(count))
        plain, seeded = [], []
        for _ in range(7):
            plain.append(best(lambda d=dataset, i=indices: [d[k] for k in i], 1) / count)
            seeded.append(best(lambda d=dataset, i=indices: seeded_items(d.__getitem__, i, 0, 1),
                               1) / count)
        rows.append((name, min(plain), min(seeded)))
    return rows


def resume_time() -> tuple[float, float]:
    factory = autotune.OptimalDataLoaderFactory(measure=False, seed=0)
    make = lambda: factory.create_training_loader(Ints(N), 256, num_workers=0)  # noqa: E731
    loader = make()
    middle = len(loader) // 2
    state = loader.state_dict()
    state.update(batches_delivered=middle, sampler_epoch=0)
    times = []
    for _ in range(3):
        resumed = make()
        start = time.perf_counter()
        resumed.load_state_dict(state)
        first = next(iter(resumed))
        times.append(time.perf_counter() - start)
        assert len(first) == 256
    fresh = make()
    start = time.perf_counter()
    next(iter(fresh))
    return min(times), time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    ahead = draw_ahead_checks()
    data = dataset_checks()
    seeding = seeding_costs()
    resume, fresh = resume_time()
    hw = autotune.probe_hardware()
    lines = [
        "# Exactly once: what the guarantees cost",
        "",
        f"`python bench/resume.py`, {datetime.date.today()}, {platform.processor() or 'cpu'}, "
        f"{hw.cpu.usable} usable CPUs, torch {torch.__version__}, Python "
        f"{sys.version.split()[0]}. One process, torch at one thread, best of 3-5 rounds.",
        "",
        "## The draw-ahead check, once per epoch (1,000,000 samples, batch 256)",
        "",
        "| sampler | ms per epoch |",
        "|---|---|",
        *[f"| {name} | {seconds * 1e3:.2f} |" for name, seconds in ahead],
        "",
        "## The dataset-change check, once per epoch (persistent workers)",
        "",
        "| dataset | ms per epoch |",
        "|---|---|",
        *[f"| {name} | {seconds * 1e3:.2f} |" for name, seconds in data],
        "",
        "## Per-sample seeding (a seeded factory)",
        "",
        "| sample | plain, us | seeded, us | added, us | seeded / plain |",
        "|---|---|---|---|---|",
        *[f"| {name} | {plain * 1e6:.1f} | {seeded * 1e6:.1f} | {(seeded - plain) * 1e6:.1f} | "
          f"{seeded / plain:.2f} |" for name, plain, seeded in seeding],
        "",
        "Seeding one sample: torch's default generator ~1.2 us, `random.seed` ~4.2 us, numpy's "
        "~1.9 us, the (seed, epoch, index) mix ~1.3 us; in the main process (no workers) the "
        "loop's generator states are saved and put back once per batch.",
        "",
        "## Resuming mid-epoch",
        "",
        f"From `load_state_dict` to the first batch at batch {N // 256 // 2} of a 1,000,000-"
        f"sample epoch (batch 256, no workers): **{resume * 1e3:.0f} ms**, against "
        f"{fresh * 1e3:.0f} ms for the first batch of a fresh epoch. The delivered batches' "
        "indices are drawn and skipped, no sample is loaded.",
        "",
    ]
    out = Path(__file__).with_name("RESULTS-resume.md")
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
