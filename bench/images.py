"""Images per CPU-second: ``ImageFolder``'s CPU path against torchvision's ImageNet recipe.

One worker process (torch's DataLoader, ``num_workers=1``, one torch thread as torch sets it
there), batches of 64: the worker's CPU seconds between its first and its last batch, read
with ``time.process_time()`` in the worker as each batch is collated. Each variant is measured
in interleaved rounds (every variant once per round, the order turned each round) and the
best round is kept. The reference is torchvision's transforms where torchvision imports, else
the same recipe written on Pillow (``reference_recipe``: Pillow crop and bilinear resize,
``ToTensor``, ``Normalize``, as torchvision does on a Pillow image), with torch's
``default_collate``.

Image sets: ImageNet-size JPEGs (400-600 px) and photos of 2,000-4,000 px made from the two
photographs scikit-learn ships (cropped and rescaled; generated photo-like images where
scikit-learn is missing), and small images of 64-128 px. Then a loader row per set: all
CPUs' workers, images/s, torch's DataLoader of the reference against the factory's loader
of ``ImageFolder`` (normalised float batches on arrival), same worker count and batch size.

    python bench/images.py            # ~5 minutes on 2 CPUs; writes bench/RESULTS-images.md
    python bench/images.py --quick    # fewer images and rounds, a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import autotune
from autotune import ImageFolder, probe_hardware

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# -- the images ----------------------------------------------------------------------------

def photographs() -> tuple[list[Image.Image], str]:
    """scikit-learn's two sample photographs (640 x 427), or generated photo-like images."""
    try:
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(a) for a in load_sample_images().images], \
            "scikit-learn's two sample photographs"
    except ImportError:
        rng = np.random.default_rng(0)
        x, y = np.linspace(0, 1, 640)[None, :, None], np.linspace(0, 1, 427)[:, None, None]
        made = []
        for _ in range(2):
            base = rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * y
            noisy = base + rng.normal(0, 24, (427, 640, 3))
            made.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
        return made, "generated photo-like images (scikit-learn is not installed)"


def make_set(root: Path, photos: list[Image.Image], count: int, low: int, high: int,
             seed: int) -> Path:
    """``count`` JPEGs (quality 90) ``low``-``high`` px wide: random crops of ``photos``
    rescaled; large ones get a little sensor-like noise (an upscaled photo is smoother than
    a camera's)."""
    rng = np.random.default_rng(seed)
    folder = root / "all"
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        w = int(rng.integers(photo.width // 2, photo.width + 1))
        h = min(photo.height, int(w * rng.uniform(0.6, 0.8)))
        left = int(rng.integers(0, photo.width - w + 1))
        top = int(rng.integers(0, photo.height - h + 1))
        width = int(rng.integers(low, high + 1))
        image = photo.crop((left, top, left + w, top + h)).resize(
            (width, max(1, round(width * h / w))), Image.Resampling.BICUBIC)
        if width > 1000:
            pixels = np.asarray(image).astype(np.float32)
            pixels += rng.normal(0, 3, pixels.shape).astype(np.float32)
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"{i}.jpg", quality=90)
    return root


# -- the reference -------------------------------------------------------------------------

def reference_recipe(train: bool, size: int) -> tuple[object, str]:
    """torchvision's ImageNet transforms (a callable of a Pillow image) and their source."""
    try:
        from torchvision import transforms  # type: ignore[import-not-found, unused-ignore]

        steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] \
            if train else [transforms.Resize(round(size / 0.875)), transforms.CenterCrop(size)]
        return transforms.Compose([*steps, transforms.ToTensor(),
                                   transforms.Normalize(MEAN, STD)]), "torchvision"
    except Exception:  # absent, or built for another torch (torchvision::nms)
        return _PillowRecipe(train, size), "the recipe written on Pillow"


class _PillowRecipe:
    """torchvision's transforms on a Pillow image, written out: RandomResizedCrop's draws,
    Pillow crop and bilinear resize, flip, ToTensor, Normalize."""

    def __init__(self, train: bool, size: int) -> None:
        self.train, self.size, self.resize = train, size, round(size / 0.875)
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.train:
            i, j, h, w = _crop_params(*image.size)
            out = image.crop((j, i, j + w, i + h)).resize((self.size, self.size),
                                                          Image.Resampling.BILINEAR)
            if torch.rand(1) < 0.5:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            width, height = image.size
            long_new = int(self.resize * max(width, height) / min(width, height))
            new = (self.resize, long_new) if width <= height else (long_new, self.resize)
            resized = image.resize(new, Image.Resampling.BILINEAR)
            left = round((new[0] - self.size) / 2.0)
            top = round((new[1] - self.size) / 2.0)
            out = resized.crop((left, top, left + self.size, top + self.size))
        tensor = torch.from_numpy(np.array(out, copy=True)).permute(2, 0, 1).contiguous()
        return tensor.float().div(255).sub_(self.mean).div_(self.std)


def _crop_params(width: int, height: int) -> tuple[int, int, int, int]:
    area = width * height
    log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(0.08, 1.0).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return (int(torch.randint(0, height - h + 1, size=(1,)).item()),
                    int(torch.randint(0, width - w + 1, size=(1,)).item()), h, w)
    return 0, 0, height, width


class Reference(torch.utils.data.Dataset):
    """torchvision's ``ImageFolder`` loading (``pil_loader``) with the reference recipe."""

    def __init__(self, folder: ImageFolder, train: bool, size: int) -> None:
        self.samples = folder.samples
        self.transform, self.source = reference_recipe(train, size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        with open(path, "rb") as file:
            image = Image.open(file).convert("RGB")
        return self.transform(image), target


# -- measuring -----------------------------------------------------------------------------

class _Timed:
    """A collate that also returns the worker's CPU clock once the batch is made."""

    def __init__(self, collate: object) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> tuple[object, float]:
        batch = self.collate(samples)  # type: ignore[operator]
        return batch, time.process_time()


def images_per_cpu_second(dataset: torch.utils.data.Dataset, collate: object,
                          batch: int) -> float:
    """One worker's images per CPU-second, from its first batch to its last."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=1,
                                         collate_fn=_Timed(collate), shuffle=True)
    clocks = [clock for _batch, clock in loader]
    return (len(dataset) - batch) / max(clocks[-1] - clocks[0], 1e-9)


def variants(root: Path, size: int, eval_too: bool, float_too: bool) -> dict:
    """``name: (dataset, collate)`` for one image set."""
    torch_collate = torch.utils.data.default_collate
    uint8 = ImageFolder(root, size=size, output="uint8")
    out = {"reference, training": (Reference(uint8, True, size), torch_collate),
           "ImageFolder, training, to uint8": (uint8, uint8.collate)}
    if float_too:
        floats = ImageFolder(root, size=size)
        floats = floats.placed(floats.in_effect, normalised_in="collate")
        out["ImageFolder, training, to normalised float"] = (floats, floats.collate)
    if eval_too:
        evaluation = ImageFolder(root, size=size, train=False, output="uint8")
        out["reference, evaluation"] = (Reference(evaluation, False, size), torch_collate)
        out["ImageFolder, evaluation, to uint8"] = (evaluation, evaluation.collate)
    return out


def interleaved(named: dict, rounds: int, batch: int) -> dict[str, float]:
    """Each variant's best images per CPU-second over ``rounds`` interleaved rounds."""
    best = dict.fromkeys(named, 0.0)
    names = list(named)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            best[name] = max(best[name], images_per_cpu_second(*named[name], batch))
    return best


def loader_rate(dataset: torch.utils.data.Dataset, ours: bool, workers: int, batch: int,
                seconds: float) -> float:
    """Images/s of a loader with ``workers`` workers over whole epochs for ``seconds``."""
    if ours:
        loader = autotune.OptimalDataLoaderFactory(measure=False).create_training_loader(
            dataset, batch, num_workers=workers, persistent_workers=True, drop_last=False)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers,
                                             shuffle=True, persistent_workers=True)
    for _batch in loader:  # the workers' start and first epoch
        break
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for images, _targets in loader:
            assert images.dtype == torch.float32
            count += len(images)
    rate = count / (time.perf_counter() - start)
    if hasattr(loader, "close"):
        loader.close()
    return rate


def _decoder() -> str:
    """The JPEG decoder ``ImageFolder`` uses here (an older autotune has no ``_pixels``)."""
    try:
        from autotune.sources import _pixels
    except ImportError:
        return "Pillow (autotune before the uint8 path)"
    module = _pixels.simplejpeg()
    return f"simplejpeg {module.__version__}" if module else "Pillow (no simplejpeg)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loader-seconds", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-images.md")))
    args = parser.parse_args(argv)
    scale = 4 if args.quick else 1
    rounds = 1 if args.quick else args.rounds
    hw = probe_hardware()
    workers = max(1, hw.cpu.usable or os.cpu_count() or 1)
    photos, source = photographs()
    decoder = _decoder()
    # name, images, widths, output size, batch, evaluation and float variants too
    sets = [("ImageNet-size, 400-600 px", 512 // scale, (400, 600), 224, 64, True),
            ("large photos, 2,000-4,000 px", 96 // scale * 2, (2000, 4000), 224, 16, False),
            ("small images, 64-128 px, to 56 px", 2048 // scale, (64, 128), 56, 64, False)]
    rows, loaders = [], []
    with tempfile.TemporaryDirectory(prefix="autotune-images-") as tmp:
        for n, (name, count, (low, high), size, batch, more) in enumerate(sets):
            root = make_set(Path(tmp) / str(n), photos, count, low, high, seed=n)
            best = interleaved(variants(root, size, more, more), rounds, batch)
            for variant, rate in best.items():
                kind = "evaluation" if "evaluation" in variant else "training"
                ratio = rate / best[f"reference, {kind}"]
                rows.append((name, variant, rate, ratio))
                print(f"{name:36} {variant:44} {rate:8.0f} images/CPU-s  {ratio:5.2f}x",
                      flush=True)
            floats = ImageFolder(root, size=size)
            reference = Reference(floats, True, size)
            theirs = loader_rate(reference, False, workers, batch, args.loader_seconds / scale)
            ours = loader_rate(floats, True, workers, batch, args.loader_seconds / scale)
            loaders.append((name, theirs, ours))
            print(f"{name:36} loader, {workers} workers: reference {theirs:.0f}/s, "
                  f"ImageFolder {ours:.0f}/s ({ours / theirs:.2f}x)", flush=True)
    lines = [
        "# Images per CPU-second (`bench/images.py`)", "",
        f"Measured {datetime.date.today()} on {hw.cpu.model or platform.processor()}, "
        f"{hw.cpu.usable} usable CPUs, Python {sys.version.split()[0]}, torch "
        f"{torch.__version__}, Pillow {Image.__version__}, decoder {decoder}, autotune "
        f"{autotune.__version__}; `python bench/images.py{' --quick' if args.quick else ''}`"
        f". Images: {source}. Reference: {Reference(floats, True, 224).source}. One worker "
        "process, one torch thread, batches of 64 (16 of large photos): images per "
        f"CPU-second of the worker, best of {rounds} interleaved round(s); the ratio is "
        "against the reference "
        "of the same set and kind.", "",
        "| images | path | images per CPU-second | against the reference |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {variant} | {rate:.0f} | {ratio:.2f}x |"
              for name, variant, rate, ratio in rows]
    lines += ["", f"Loaders, {workers} workers (all usable CPUs), the same batches, "
              "normalised float batches on arrival, images/s over "
              f"{args.loader_seconds / scale:.0f} s after the first batch:", "",
              "| images | torch DataLoader, reference recipe | factory loader of ImageFolder "
              "| ratio |", "|---|---|---|---|"]
    lines += [f"| {name} | {theirs:.0f} | {ours:.0f} | {ours / theirs:.2f}x |"
              for name, theirs, ours in loaders]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
