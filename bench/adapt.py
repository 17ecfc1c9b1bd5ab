"""The stall monitor and ``adapt=True`` on the issue's training loop, measured on this machine.

1. ``adapt=True`` from ``num_workers=0``: 2,000 samples that wait ~12 ms each (storage),
   batch 16, a 150 ms step (a sleep), 3 epochs. Per epoch: the stall the monitor measured,
   the stall measured around the loop, the changes and whether every sample came once.
2. The monitor's own cost: ``next()`` through ``StallMonitor`` against the bare iterator,
   per batch, as a share of a 1 ms step.
3. A plot of the stall over steps (``--plot``, needs matplotlib): bench/adapt-stall.png.

    python bench/adapt.py                 # about 80 s; writes bench/RESULTS-adapt.md
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import OptimalDataLoaderFactory, StallMonitor, probe_hardware


class Waiting(Dataset):
    """Sample i waits like storage, then is tensor([i])."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size, self.seconds = size, seconds

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.tensor([index])


def adapt_run(args: argparse.Namespace) -> tuple[list[dict], list, list[float], list[int]]:
    factory = OptimalDataLoaderFactory(profile_dir=tempfile.mkdtemp(), seed=0)
    dataset = Waiting(args.samples, args.sample_s)
    loader = factory.create_training_loader(dataset, batch_size=args.batch_size,
                                            num_workers=0, adapt=True)
    epochs, stalls, marks = [], [], []
    for epoch in range(1, args.epochs + 1):
        loader.monitor.reset()
        seen: list[int] = []
        stepping = 0.0
        began = time.perf_counter()
        for batch in loader:
            seen.extend(batch.flatten().tolist())
            start = time.perf_counter()
            time.sleep(args.step_s)
            stepping += time.perf_counter() - start
        total = time.perf_counter() - began
        report = loader.report()
        waits, steps = loader.monitor.history()
        stalls.extend(w / (w + s) for w, s in zip(waits, steps))
        marks.extend(c.step for c in loader.changes if c.epoch == epoch)
        epochs.append(dict(
            epoch=epoch, monitor=report.stall_fraction, around=1 - stepping / total,
            verdict=report.verdict, workers=loader.num_workers, seconds=total,
            once=sorted(seen) == list(range(args.samples)),
            changes=[c for c in loader.changes if c.epoch == epoch]))
    loader.close()
    return epochs, loader.changes, stalls, marks


def overhead(n: int = 200_000) -> tuple[float, float]:
    """Seconds per batch of the bare iterator and through the monitor (best of 5)."""
    items = list(range(n))
    bare, monitored = [], []
    for _ in range(5):
        start = time.perf_counter()
        for _item in items:
            pass
        bare.append(time.perf_counter() - start)
        monitor = StallMonitor(items, log_every_s=60.0)
        start = time.perf_counter()
        for _item in monitor:
            pass
        monitored.append(time.perf_counter() - start)
    return min(bare) / n, min(monitored) / n


def plot(stalls: list[float], marks: list[int], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = [sum(stalls[max(0, i - window + 1):i + 1]) / len(stalls[max(0, i - window + 1):i + 1])
              for i in range(len(stalls))]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(range(1, len(stalls) + 1), [100 * s for s in smooth], lw=1.5)
    for mark in marks:
        ax.axvline(mark, color="grey", ls=":", lw=1)
    ax.axhline(20, color="red", lw=0.8, ls="--")
    ax.axhline(5, color="orange", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel(f"stall, % (mean of {window} steps)")
    ax.set_title("adapt=True from 0 workers: stall per step (dotted: changes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--sample-s", type=float, default=0.012)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--step-s", type=float, default=0.150)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--plot", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-adapt.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    epochs, changes, stalls, marks = adapt_run(args)
    bare, monitored = overhead()
    hw = probe_hardware()
    lines = [
        "# Benchmark: the stall monitor and adapt=True",
        "",
        f"Measured {datetime.date.today()} on {hw.cpu.model}, {hw.cpu.usable} usable CPUs, "
        f"{hw.host.os}, Python {hw.host.python}, torch {torch.__version__}; "
        "`python bench/adapt.py" + (" --plot" if args.plot else "") + "`.",
        "",
        f"`create_training_loader(dataset, batch_size={args.batch_size}, num_workers=0, "
        f"adapt=True)` over {args.samples:,} samples that each sleep {args.sample_s * 1e3:g} ms "
        f"(storage latency), a {args.step_s * 1e3:g} ms step (a sleep), {args.epochs} epochs. "
        "'around the loop': 1 - (time in the step) / (time of the epoch), measured by the "
        "benchmark itself; 'monitor': the loader's own StallMonitor.",
        "",
        "| epoch | stall (monitor) | stall (around the loop) | verdict | workers at the end | "
        "epoch s | every sample once | changes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in epochs:
        moves = "; ".join(f"step {c.step}: {c.from_workers} -> {c.to_workers}"
                          for c in e["changes"]) or "-"
        lines.append(f"| {e['epoch']} | {e['monitor']:.1%} | {e['around']:.1%} | {e['verdict']} "
                     f"| {e['workers']} | {e['seconds']:.1f} | {'yes' if e['once'] else 'NO'} "
                     f"| {moves} |")
    lines += ["", "Why each change was made (the loader's log):", ""]
    lines += [f"- epoch {c.epoch}, step {c.step}: {c.from_workers} -> {c.to_workers}: {c.reason}"
              for c in changes]
    lines += ["", f"Monitor overhead: {bare * 1e9:.0f} ns per batch bare, "
              f"{monitored * 1e9:.0f} ns through StallMonitor: {(monitored - bare) * 1e6:.2f} us "
              f"added per batch = {(monitored - bare) / 1e-3:.2%} of a 1 ms step (target < 1%)."]
    if args.plot:
        png = args.out.with_name("adapt-stall.png")
        plot(stalls, marks, png, window=10)
        lines += ["", f"![stall over steps]({png.name})"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
