"""Is my training input-bound? The stall monitor on a simulated training loop, then
``adapt=True`` fixing the stall while the loop runs (about 40 s on 2 CPUs).

    python examples/stall.py               # add --plot for stall.png (needs matplotlib)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autotune
from examples.datasets import SyntheticImages

STEP_S = 0.100  # the "model": a 100 ms step


def train(loader, epochs: int) -> None:
    for _ in range(epochs):
        for _images, _labels in loader:
            time.sleep(STEP_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("stall.png"), default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("autotune.tuning.adapt").setLevel(logging.INFO)
    dataset = SyntheticImages(2048, latency_s=0.004)  # storage: 4 ms a sample
    factory = autotune.OptimalDataLoaderFactory(profile_dir=tempfile.mkdtemp(), seed=0)

    print("1. torch's default, num_workers=0, watched by StallMonitor:")
    loader = factory.create_training_loader(dataset, batch_size=32, num_workers=0)
    monitor = autotune.StallMonitor(loader, name="train", log_every_s=None)
    train(monitor, epochs=1)
    print(monitor.report(), "\n")

    print("2. the same loop with adapt=True, starting from num_workers=0:")
    adaptive = factory.create_training_loader(dataset, batch_size=32, num_workers=0,
                                              adapt=True, adapt_every=10)
    stalls = []
    for epoch in range(1, 4):
        adaptive.monitor.reset()
        train(adaptive, epochs=1)
        report = adaptive.report()
        waits, steps = adaptive.monitor.history()
        stalls += [w / (w + s) for w, s in zip(waits, steps)]
        print(f"   epoch {epoch}: stall {report.stall_fraction:.1%} ({report.verdict}), "
              f"{adaptive.num_workers} workers")
    print(adaptive.report())
    adaptive.close()
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot([100 * s for s in stalls])
        ax.set_xlabel("step")
        ax.set_ylabel("stall, % of the step's time")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
