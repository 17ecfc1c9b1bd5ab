"""Keep a GPU fed: ResNet-50 training on a folder of JPEGs, each loader for the same wall time.

The job of issues 21 and 22: ResNet-50 (bf16 autocast, channels_last, SGD, batch 256) on generated
JPEGs of 400-600 x 300-450 px through torchvision's ImageNet training transforms
(RandomResizedCrop 224, horizontal flip, ToTensor, Normalize). First both ceilings: the GPU
step alone (the batch already on the GPU) and decoding (one process's time per image x the
usable CPUs). Then each loader runs across epochs for ``--seconds``; images/s count from the
4th step, with the loop's stall (``StallMonitor``), GPU utilisation sampled over the run,
workers, and the wait for the first batch of the first epoch and of the later ones. Then
``autotune.ImageFolder`` in each placement (decoded by the workers, on the device, and where
the factory's measurement puts it), and one batch of each placement compared.

    python bench/gpu.py             # the GPU machine: ~5.5 minutes; writes bench/RESULTS-gpu.md
    python bench/gpu.py --smoke     # anywhere: small images, a tiny model on the CPU, ~1 minute;
                                    # checks the script, writes nothing unless --out is given

Without torchvision (the CPU machines here cannot load it with their torch build) the same
transforms are done with Pillow and a small convolutional model stands in for ResNet-50;
the results say which ran.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import autotune
from autotune import OptimalDataLoaderFactory, StallMonitor, probe_hardware

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WARMUP_STEPS = 3


# -- the data ------------------------------------------------------------------------------

def _write_one(job: tuple[str, int, int, int]) -> None:
    path, seed, low, high = job
    rng = np.random.default_rng(seed)
    width = int(rng.integers(low, high))
    height = int(width * rng.uniform(0.6, 0.8))
    # smooth gradients plus noise: JPEG sizes and decode times like photos, not flat colour
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * y
    pixels = np.clip(base + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_folder(root: Path, count: int, *, small: bool) -> list[Path]:
    """``count`` JPEGs of 400-600 px wide (``small``: 80-120), written by every CPU."""
    low, high = (80, 120) if small else (400, 600)
    jobs = [(str(root / f"{i:06d}.jpg"), i, low, high) for i in range(count)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        pool.map(_write_one, jobs, chunksize=64)
    return [Path(job[0]) for job in jobs]


class PillowTrainTransform:
    """torchvision's RandomResizedCrop(size) + RandomHorizontalFlip + ToTensor + Normalize,
    in Pillow, for machines without torchvision."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        area = width * height
        for _ in range(10):
            target = area * random.uniform(0.08, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                break
        else:
            w = h = min(width, height)
            left, top = (width - w) // 2, (height - h) // 2
        image = image.resize((self.size, self.size), Image.BILINEAR,
                             box=(left, top, left + w, top + h))
        if random.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        return (tensor - mean) / std


def train_transform(size: int) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    try:
        from torchvision import transforms
    except Exception:  # not installed, or built for another torch
        return PillowTrainTransform(size), "Pillow (torchvision not importable)"
    return transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(MEAN, STD)]), "torchvision"


class JpegFolder(Dataset):
    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], torch.Tensor]
                 ) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index % 1000


# -- the step ------------------------------------------------------------------------------

def make_step(device: torch.device, *, smoke: bool) -> tuple[Callable[[Any], None], str]:
    """One training step on a batch (moved to ``device`` here if it is not there yet)."""
    try:
        if smoke:
            raise ImportError
        from torchvision.models import resnet50
        model, name = resnet50(), "ResNet-50 (torchvision)"
    except Exception:
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(16, 1000))
        name = "a 2-layer CNN (smoke)" if smoke else "a 2-layer CNN (torchvision missing)"
    model = model.to(device, memory_format=torch.channels_last)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    cuda = device.type == "cuda"

    def step(batch: Any) -> None:
        images, labels = batch
        images = images.to(device, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return step, name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- measuring -----------------------------------------------------------------------------

def gpu_ceiling(step: Callable[[Any], None], batch: int, size: int, device: torch.device,
                seconds: float) -> float:
    """Images/s of the step alone, the batch already on the device."""
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    for _ in range(WARMUP_STEPS):
        step((images, labels))
    sync(device)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step((images, labels))
        steps += 1
        if steps % 5 == 0:
            sync(device)
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def cpu_ceiling(dataset: JpegFolder, cpus: int, seconds: float = 3.0) -> tuple[float, float]:
    """(seconds per image in one process, images/s with every usable CPU doing that)."""
    start, count = time.perf_counter(), 0
    torch.set_num_threads(1)  # as in a worker
    while time.perf_counter() - start < seconds:
        dataset[count % len(dataset)]
        count += 1
    torch.set_num_threads(cpus)
    per_image = (time.perf_counter() - start) / count
    return per_image, cpus / per_image


def run_row(loader: Any, step: Callable[[Any], None], batch: int, device: torch.device,
            seconds: float, *, tail_s: float | None = None) -> dict[str, Any]:
    """Train for ``seconds`` across epochs; images/s from the 4th step (and over the last
    ``tail_s`` seconds), stall, GPU utilisation, first-batch waits."""
    monitor = StallMonitor(loader, device=str(device) if device.type == "cuda" else "cpu",
                           log_every_s=None)
    start = time.perf_counter()
    steps, counted_from, firsts = 0, None, []
    marks: list[tuple[float, int]] = []  # (time, images) after each step
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        for i, item in enumerate(monitor):
            if i == 0:
                firsts.append(time.perf_counter() - began)
            step(item)
            steps += 1
            if steps == WARMUP_STEPS:
                sync(device)
                counted_from = time.perf_counter()
            if counted_from is not None:
                marks.append((time.perf_counter(), (steps - WARMUP_STEPS) * batch))
            if time.perf_counter() - start >= seconds:
                break
    sync(device)
    end = time.perf_counter()
    report = monitor.report()
    monitor.release()
    images = (steps - WARMUP_STEPS) * batch
    rate = images / (end - counted_from) if counted_from and images > 0 else 0.0
    tail = None
    if tail_s is not None and marks:
        since = [m for m in marks if m[0] >= end - tail_s]
        if len(since) > 1:
            tail = (since[-1][1] - since[0][1]) / (since[-1][0] - since[0][0])
    workers = getattr(loader, "num_workers", None)
    return {"images_s": rate, "tail_images_s": tail, "stall": report.stall_fraction,
            "gpu": report.gpu_utilization, "gpu_p50": report.gpu_utilization_p50,
            "workers": workers, "first_s": firsts[0] if firsts else None,
            "later_first_s": statistics.fmean(firsts[1:]) if len(firsts) > 1 else None,
            "epochs": len(firsts)}


# -- the report ----------------------------------------------------------------------------

def _cell(value: Any, form: str) -> str:
    return "-" if value is None else format(value, form)


def write_results(out: Path, rows: list[tuple[str, dict[str, Any]]], ceilings: dict[str, Any],
                  setting: dict[str, Any]) -> str:
    lines = [
        "# GPU feed benchmark (`bench/gpu.py`)", "",
        f"Measured {datetime.date.today()} on {setting['machine']}; "
        f"`python bench/gpu.py {setting['argv']}`. Model: {setting['model']}; transforms: "
        f"{setting['transforms']}; {setting['images']} JPEGs, batch {setting['batch']}, "
        f"each loader {setting['seconds']:.0f} s across epochs.", "",
        f"- the GPU step alone (batch already on the device): "
        f"**{ceilings['gpu']:,.0f} images/s**",
        f"- decoding: {ceilings['per_image'] * 1e3:.1f} ms per image in one process x "
        f"{ceilings['cpus']} usable CPUs = **{ceilings['cpu']:,.0f} images/s**", "",
        "| loader | images/s | of the GPU step | stall | GPU util mean (p50) | workers | "
        "first batch, epoch 1 | first batch, later epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows:
        gpu = (f"{row['gpu']:.0f}% ({row['gpu_p50']:.0f}%)" if row["gpu"] is not None
               else "-")
        lines.append(
            f"| {name} | {row['images_s']:,.0f} | {row['images_s'] / ceilings['gpu']:.2f} | "
            f"{row['stall']:.0%} | {gpu} | {_cell(row['workers'], '')} | "
            f"{_cell(row['first_s'], '.2f')} s | {_cell(row['later_first_s'], '.2f')} s |")
    by_name = dict(rows)
    hand, rules = by_name.get("hand-tuned"), by_name.get("factory rules")
    lines.append("")
    if hand and rules and hand["images_s"]:
        lines.append(f"- factory rules / hand-tuned: **{rules['images_s'] / hand['images_s']:.2f}"
                     "** (target >= 1.15)")
    adapt = by_name.get("adapt=True from 2 workers")
    if adapt and rules and rules["images_s"] and adapt["tail_images_s"]:
        lines.append(f"- adapt=True over its last {setting['tail_s']:.0f} s / factory rules: "
                     f"**{adapt['tail_images_s'] / rules['images_s']:.2f}** (target >= 0.9); "
                     f"most workers: {setting['adapt_max_workers']} on {ceilings['cpus']} CPUs")
    best = max((row["images_s"] for name, row in rows if name.startswith("ImageFolder")),
               default=None)
    measured = by_name.get("ImageFolder, measured placement")
    if measured:
        lines.append(f"- ImageFolder, measured placement / the GPU step: "
                     f"**{measured['images_s'] / ceilings['gpu']:.2f}** (target >= 0.85); the "
                     f"best ImageFolder row: {best:,.0f} images/s")
    moving = by_name.get("ImageFolder, measured placement, adapt=True")
    if moving and moving["tail_images_s"]:
        lines.append(f"- ImageFolder, measured placement, adapt=True, over its last "
                     f"{setting['tail_s']:.0f} s / the GPU step: "
                     f"**{moving['tail_images_s'] / ceilings['gpu']:.2f}** (target >= 0.85)")
    for name, why in setting.get("placements", {}).items():
        lines.append(f"- {name}: {why}")
    for move in setting.get("placement_moves", []):
        lines.append(f"- adapt=True moved the placement: {move}")
    if setting.get("same_samples"):
        lines.append(f"- device vs cpu placement, one batch, same seed: "
                     f"{setting['same_samples']}")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small and on the CPU: a check")
    parser.add_argument("--images", type=int, default=None, help="JPEGs (default 8000)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 256)")
    parser.add_argument("--seconds", type=float, default=None, help="per loader (default 15)")
    parser.add_argument("--adapt-seconds", type=float, default=None, help="default 45")
    parser.add_argument("--tune-budget-s", type=float, default=None,
                        help="the Autotuner's budget (default 60; 0 skips that row)")
    parser.add_argument("--out", default=None, help="default bench/RESULTS-gpu.md (not --smoke)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    images = args.images or (96 if smoke else 8000)
    batch = args.batch or (8 if smoke else 256)
    seconds = args.seconds or (4.0 if smoke else 15.0)
    adapt_s = args.adapt_seconds or (6.0 if smoke else 45.0)
    tune_s = args.tune_budget_s if args.tune_budget_s is not None else (0.0 if smoke else 60.0)
    size = 64 if smoke else 224
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if not smoke and device.type != "cuda":
        sys.exit("bench/gpu.py measures a GPU and this machine has none: run with --smoke "
                 "to check the script here")
    hw = probe_hardware()
    cpus = hw.cpu_budget
    transform, transforms_name = train_transform(size)
    step, model_name = make_step(device, smoke=smoke)
    gpus = ", ".join(g.name or "GPU" for g in hw.gpus) or "no GPU"
    setting = {
        "machine": f"{gpus}, {cpus} usable CPUs, "
                   f"{(hw.memory.total_bytes or 0) / 2**30:.0f} GiB RAM, "
                   f"torch {torch.__version__}, autotune {autotune.__version__}",
        "argv": " ".join(argv if argv is not None else sys.argv[1:]),
        "model": model_name, "transforms": transforms_name, "images": images, "batch": batch,
        "seconds": seconds, "tail_s": min(30.0, adapt_s), "adapt_max_workers": None}
    with tempfile.TemporaryDirectory(prefix="autotune-gpu-") as tmp:
        root = Path(tmp)
        (root / "images" / "all").mkdir(parents=True)
        start = time.perf_counter()
        dataset = JpegFolder(make_folder(root / "images" / "all", images, small=smoke),
                             transform)
        print(f"{images} JPEGs written in {time.perf_counter() - start:.1f} s", flush=True)
        per_image, cpu_rate = cpu_ceiling(dataset, cpus, 1.0 if smoke else 3.0)
        ceilings = {"gpu": gpu_ceiling(step, batch, size, device, 2.0 if smoke else 10.0),
                    "per_image": per_image, "cpus": cpus, "cpu": cpu_rate}
        print(f"ceilings: GPU step {ceilings['gpu']:,.0f} images/s, decoding "
              f"{cpu_rate:,.0f} images/s", flush=True)
        factory = OptimalDataLoaderFactory(profile_dir=root / "profiles", seed=0,
                                           device=str(device))
        pin = device.type == "cuda"
        rows: list[tuple[str, dict[str, Any]]] = []

        def measure(name: str, make: Callable[[], Any], row_s: float = seconds,
                    tail_s: float | None = None) -> dict[str, Any]:
            loader = make()
            try:
                row = run_row(loader, step, batch, device, row_s, tail_s=tail_s)
            finally:
                autotune_close(loader)
            rows.append((name, row))
            print(f"{name}: {row['images_s']:,.0f} images/s, stall {row['stall']:.0%}, "
                  f"workers {row['workers']}", flush=True)
            return row

        measure("torch defaults (0 workers)", lambda: DataLoader(dataset, batch, shuffle=True))
        measure("4 workers, pin_memory", lambda: DataLoader(
            dataset, batch, shuffle=True, num_workers=4, pin_memory=pin))
        measure("hand-tuned", lambda: DataLoader(
            dataset, batch, shuffle=True, num_workers=cpus, pin_memory=pin, prefetch_factor=4,
            persistent_workers=True))
        measure("factory rules", lambda: factory.create_training_loader(dataset, batch))
        measure("factory rules, epochs with a stop", lambda: factory.create_training_loader(
            dataset, batch, prefetch_across_epochs=False))
        # the training process's own CPU: the rules' count against one CPU left to the loop
        measure("factory rules, CPUs - 1 workers", lambda: factory.create_training_loader(
            dataset, batch, num_workers=max(1, cpus - 1)))
        if tune_s > 0:
            result = autotune.Autotuner(dataset, batch, train_step=step, budget_s=tune_s,
                                        progress=False).run()
            result.save(root / "profiles")
            measure(f"factory + Autotuner profile ({tune_s:.0f} s)",
                    lambda: factory.create_training_loader(dataset, batch))
        placements = {}
        for placement in ("cpu", "device", None):
            folder = autotune.ImageFolder(root / "images", size=size, placement=placement)
            name = f"ImageFolder, {placement or 'measured'} placement"
            made: list[Any] = []

            def make(folder: Any = folder, made: list[Any] = made) -> Any:
                made.append(factory.create_training_loader(folder, batch, device=device))
                return made[-1]

            measure(name, make)
            placements[name] = made[0].autotune_config.reasons.get("placement", "-")
            print(f"  {placements[name]}", flush=True)
        setting["placements"] = placements
        setting["same_samples"] = same_samples(root / "images", size, device)
        print(f"  device vs cpu placement: {setting['same_samples']}", flush=True)
        adaptive: list[Any] = []

        def make_adaptive() -> Any:
            adaptive.append(factory.create_training_loader(dataset, batch, num_workers=2,
                                                           adapt=True))
            return adaptive[-1]

        measure("adapt=True from 2 workers", make_adaptive, adapt_s, tail_s=setting["tail_s"])
        changes = adaptive[0].changes
        setting["adapt_max_workers"] = max([2] + [c.to_workers for c in changes])
        for change in changes:
            print(f"  adapt: {change.from_workers} -> {change.to_workers} at step "
                  f"{change.step}: {change.reason}", flush=True)
        # the measured placement, moved while training when the measured step says so
        moving: list[Any] = []

        def make_moving() -> Any:
            folder = autotune.ImageFolder(root / "images", size=size)
            moving.append(factory.create_training_loader(folder, batch, device=device,
                                                         adapt=True))
            return moving[-1]

        measure("ImageFolder, measured placement, adapt=True", make_moving, adapt_s,
                tail_s=setting["tail_s"])
        setting["placement_moves"] = [
            f"epoch {c.epoch}: {c.placement}: {c.reason}"
            for c in moving[0].changes if c.placement] or ["none"]
        for move in setting["placement_moves"]:
            print(f"  placement moved: {move}", flush=True)
    out = Path(args.out) if args.out else (None if smoke else
                                          Path(__file__).with_name("RESULTS-gpu.md"))
    if out is not None:
        print(write_results(out, rows, ceilings, setting))


def same_samples(root: Path, size: int, device: torch.device) -> str:
    """One batch of 64 made by each placement from the same seed: shapes, dtypes, mean, std
    and the mean absolute difference (resampling differences only)."""
    folder = autotune.ImageFolder(root, size=size)
    indices = list(range(min(64, len(folder))))
    torch.manual_seed(0)
    on_cpu = torch.stack([folder[i][0] for i in indices]).to(device)
    encoded = autotune.ImageFolder(root, size=size, placement="device")
    torch.manual_seed(0)
    batch = encoded.collate([encoded[i] for i in indices])
    on_device = encoded.device_transform(device)(batch)[0]
    return (f"shape {tuple(on_device.shape)} / {tuple(on_cpu.shape)}, dtype {on_device.dtype} / "
            f"{on_cpu.dtype}, mean {on_device.mean():.4f} / {on_cpu.mean():.4f}, std "
            f"{on_device.std():.4f} / {on_cpu.std():.4f}, mean |difference| "
            f"{(on_device - on_cpu).abs().mean():.4f}")


def autotune_close(loader: Any) -> None:
    """Stop a loader's workers now (a plain DataLoader's persistent ones too)."""
    close = getattr(loader, "close", None)
    if close is not None:
        close()
        return
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


if __name__ == "__main__":
    main()
