"""What decoding costs a worker in each ``ImageFolder`` placement, on this machine's CPU.

Per image, in one process (torch at one thread, as in a worker), for generated photo-like
JPEGs: the CPU placement (Pillow decode, crop, resize, flip, normalise), what a worker does
in the device placement (open the header, draw the crop, read the bytes), and Pillow's
reduced-size decoding (``draft``) against a full decode on large photos.

    python bench/images.py            # ~1 minute; writes bench/RESULTS-images.md
"""

from __future__ import annotations

import argparse
import datetime
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


def photo(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Gradients plus noise: JPEG sizes and decode times like photos, not flat colour."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = rng.uniform(0, 255, 3) * x + rng.uniform(0, 255, 3) * y
    return np.clip(base + rng.normal(0, 24, (height, width, 3)), 0, 255).astype(np.uint8)


def make(root: Path, count: int, low: int, high: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "all").mkdir(parents=True)
    for i in range(count):
        width = int(rng.integers(low, high))
        Image.fromarray(photo(width, int(width * 0.75), rng)).save(root / "all" / f"{i}.jpg",
                                                                    quality=90)
    return root


def per_image_ms(dataset: ImageFolder, seconds: float) -> float:
    """Milliseconds of CPU per sample, cycling over the dataset for ``seconds``."""
    count = 0
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or count < len(dataset):
        dataset[count % len(dataset)]
        count += 1
    return (time.process_time() - cpu) / count * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-images.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    hw = probe_hardware()
    rows = []
    with tempfile.TemporaryDirectory(prefix="autotune-images-") as tmp:
        sets = {"400-600 px (the GPU issue's)": make(Path(tmp) / "small", 64, 400, 600, 0),
                "2000-2600 px (camera photos)": make(Path(tmp) / "large", 16, 2000, 2600, 1)}
        for name, root in sets.items():
            for train in (True, False):
                cpu = per_image_ms(ImageFolder(root, train=train, placement="cpu"),
                                   args.seconds)
                full = per_image_ms(ImageFolder(root, train=train, placement="cpu",
                                                reduced_decode=False), args.seconds)
                device = per_image_ms(ImageFolder(root, train=train, placement="device"),
                                      args.seconds)
                rows.append((name, "training" if train else "evaluation", cpu, full, device))
                print(rows[-1], flush=True)
    lines = [
        "# Decoding in a worker, per placement (`bench/images.py`)", "",
        f"Measured {datetime.date.today()} on {hw.cpu.model or platform.processor()}, "
        f"{hw.cpu.usable} usable CPUs, Python {sys.version.split()[0]}, torch "
        f"{torch.__version__}, Pillow {Image.__version__}, autotune {autotune.__version__}; "
        f"`python bench/images.py`. CPU milliseconds per image in one process at one torch "
        "thread (as in a worker), 224 px output.", "",
        "| JPEGs | samples | CPU placement (reduced decode where it applies) | CPU placement, "
        "full decode | device placement: the worker's part |",
        "|---|---|---|---|---|",
    ]
    for name, kind, cpu, full, device in rows:
        lines.append(f"| {name} | {kind} | {cpu:.2f} ms | {full:.2f} ms | {device:.3f} ms |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
