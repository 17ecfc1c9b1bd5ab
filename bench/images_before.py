"""``ImageFolder`` of an earlier autotune tree, measured as ``bench/images.py`` measures (one
worker, images per CPU-second, best of 3 rounds, against the same reference), on the same
image sets: the before of a change to the CPU path.

    git worktree add /tmp/before 56285ed
    python bench/images_before.py /tmp/before      # ~3 minutes on 2 CPUs
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

tree = sys.argv[1] if len(sys.argv) > 1 else sys.exit(__doc__)
sys.path.insert(0, tree)  # that tree's autotune, not this one's
sys.path.insert(1, str(Path(__file__).parent))

import torch  # noqa: E402

import autotune  # noqa: E402
import images as bench  # noqa: E402

SETS = [("ImageNet-size, 400-600 px", 512, (400, 600), 224, 64),
        ("large photos, 2,000-4,000 px", 96, (2000, 4000), 224, 16),
        ("small images, 64-128 px, to 56 px", 2048, (64, 128), 56, 64)]


def main() -> None:
    print(f"autotune from {Path(autotune.__file__).parent}")
    photos, _source = bench.photographs()
    with tempfile.TemporaryDirectory(prefix="autotune-before-") as tmp:
        for n, (name, count, (low, high), size, batch) in enumerate(SETS):
            root = bench.make_set(Path(tmp) / str(n), photos, count, low, high, seed=n)
            ours = autotune.ImageFolder(root, size=size, placement="cpu")
            reference = bench.Reference(ours, True, size)
            best = {"reference": 0.0, "ImageFolder": 0.0}
            for _round in range(3):
                best["reference"] = max(best["reference"], bench.images_per_cpu_second(
                    reference, torch.utils.data.default_collate, batch))
                best["ImageFolder"] = max(best["ImageFolder"], bench.images_per_cpu_second(
                    ours, ours.collate, batch))
            print(f"| {name} | {best['reference']:.0f} | {best['ImageFolder']:.0f} | "
                  f"{best['ImageFolder'] / best['reference']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
