"""The factory's training loaders now against an earlier commit, side by side on this machine.

For each workload of ``workloads.py`` (the stream too), the loader that
``OptimalDataLoaderFactory(measure=False[, seed=0]).create_training_loader(ds, batch,
num_workers=W)`` builds is timed over whole epochs (after one warm-up epoch, a step of no
cost), once with this checkout and once with ``--before`` (a git revision, checked out in a
temporary worktree), in separate processes, alternating, ``--rounds`` times. The ratio
now/before of the median samples/s says whether a change made the loaders slower.

    python bench/ab.py --before 79c1e09 --limit 4000    # ~30 minutes on 2 CPUs
    python bench/ab.py --before 79c1e09 --only tiny --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (workload name in workloads.py, epochs timed, workers): sized to ~5-20 s a measurement
CASES = [
    ("tiny samples", 1, 2),
    ("storage latency, heavy tail", 1, 8),
    ("stream: sharded, storage latency", 1, 8),
    ("JPEG decode (Pillow)", 1, 2),
    ("large cheap tensors (600 KB)", 1, 2),
]


def measure(name: str, epochs: int, workers: int, seed: int | None, limit: int) -> float:
    """Samples/s of the factory's loader over ``epochs`` epochs after a warm-up one (in the
    process whose ``autotune`` is on ``sys.path``)."""
    sys.path.insert(0, str(HERE))
    import torch  # noqa: F401  (import time outside the timing)
    from torch.utils.data import Subset
    from workloads import all_workloads

    import autotune

    with tempfile.TemporaryDirectory() as directory:
        (found,) = [w for w in all_workloads(Path(directory)) if w[0] == name]
        _, dataset, batch = found
        if hasattr(dataset, "__len__") and len(dataset) > limit:
            dataset = Subset(dataset, range(limit))
        elif hasattr(dataset, "shards"):  # the stream: as many shards as make ``limit``
            dataset.shards = max(8, min(dataset.shards, limit // dataset.per_shard))
        factory = autotune.OptimalDataLoaderFactory(measure=False, seed=seed)
        with factory.create_training_loader(dataset, batch, num_workers=workers,
                                            drop_last=False) as loader:
            for _ in loader:  # warm-up: workers start, files open
                pass
            start, samples = time.perf_counter(), 0
            for _ in range(epochs):
                for batch_ in loader:
                    samples += len(batch_)
            return samples / (time.perf_counter() - start)


def run(tree: Path, case: tuple[str, int, int], seed: int | None, limit: int) -> float:
    name, epochs, workers = case
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(HERE)!r});"
            f"import ab, json; print(json.dumps(ab.measure({name!r}, {epochs}, {workers}, "
            f"{seed!r}, {limit})))")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tempfile.gettempdir(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} in {tree}: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="workloads whose name contains one of these (a,b)")
    parser.add_argument("--limit", type=int, default=20_000,
                        help="samples per epoch at most (the stream: whole shards)")
    parser.add_argument("--seeds", default="none,0",
                        help="the factory seeds to measure with: none and/or integers")
    parser.add_argument("--out", default=str(HERE / "RESULTS-ab.md"))
    args = parser.parse_args()
    seeds = [None if part == "none" else int(part) for part in args.seeds.split(",")]
    cases = [c for c in CASES if not args.only
             or any(part in c[0] for part in args.only.split(","))]
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.before], check=True, capture_output=True)
        try:
            rows = []
            for case in cases:
                for seed in seeds:
                    now, then = [], []
                    for number in range(args.rounds):  # each side first in every other round
                        if number % 2:
                            then.append(run(before, case, seed, args.limit))
                        now.append(run(ROOT, case, seed, args.limit))
                        if not number % 2:
                            then.append(run(before, case, seed, args.limit))
                    ratio = statistics.median(now) / statistics.median(then)
                    rows.append((case, seed, statistics.median(now), statistics.median(then),
                                 ratio, min(now), max(now), min(then), max(then)))
                    print(rows[-1], flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False, capture_output=True)
    lines = [
        f"# The factory's loaders against {args.before}",
        "",
        f"`python bench/ab.py --before {args.before} --rounds {args.rounds}"
        f"{' --only ' + args.only if args.only else ''} --limit {args.limit} "
        f"--seeds {args.seeds}`, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs. Samples/s over whole epochs "
        "after a warm-up epoch, the median of the rounds (min-max), each round one process "
        "per side, each side first in every other round.",
        "",
        "| workload | workers | seed | now | before | now / before |",
        "|---|---|---|---|---|---|",
    ]
    for case, seed, now, then, ratio, lo, hi, tlo, thi in rows:
        lines.append(f"| {case[0]} | {case[2]} | {seed} | {now:,.0f} ({lo:,.0f}-{hi:,.0f}) | "
                     f"{then:,.0f} ({tlo:,.0f}-{thi:,.0f}) | {ratio:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
