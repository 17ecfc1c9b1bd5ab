"""Several loaders in one loop: sized together (``create_training_loaders``) against sized
alone and against a grid over the two worker counts, measured side by side on this machine.

1. A CPU-bound dataset (pure Python, ~2 ms a sample) and a waiting-bound one (storage
   latency, heavy tail) drawn 0.5/0.5 (``weighted``), batch 32: loop samples/s of the
   MultiLoader in steady state. The grid covers workers {1..4} x {1..48}; its top settings,
   the jointly sized, the tuned-as-one (``MultiAutotuner``) and the alone-sized ones are then
   measured again, interleaved; then the best grid setting by those means meets the chosen
   ones head to head in fresh rounds (the best of many noisy means is biased up).
2. Two CPU-bound loaders with native thread pools (numpy BLAS): the joint thread budget
   against each sized alone (each assuming the whole machine) and against uncapped pools.

    python bench/multi.py        # about 14 minutes on 2 CPUs; writes bench/RESULTS-multi.md
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from autotune import (MultiAutotuner, MultiLoader, OptimalDataLoaderFactory,
                      probe_hardware)
from autotune.loading.builder import build_loader
from autotune.policy import rules
from workloads import BlasAugment, StorageLatency

BATCH = 32
WEIGHTS = {"cpu": 0.5, "io": 0.5}


class PythonCompute(Dataset):
    """CPU-bound: a pure-Python loop per sample (no native threads)."""

    def __init__(self, n: int = 200_000, loops: int = 20_000) -> None:
        self.n, self.loops = n, loops

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        total = 0
        for i in range(self.loops):
            total += i * (index % 7)
        return torch.full((64,), float(total % 1000))


def loop_rate(datasets: dict[str, Dataset], configs: dict[str, object], window_s: float,
              warm_s: float = 1.5) -> float:
    """Samples/s of a weighted MultiLoader over loaders built with ``configs``."""
    loaders = {name: build_loader(datasets[name], BATCH, configs[name], shuffle=True)
               for name in datasets}
    multi = MultiLoader(loaders, strategy="weighted", weights=[0.5] * len(loaders),
                        stop="max_cycle", seed=0)
    iterator = iter(multi)
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        next(iterator)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < window_s:
        next(iterator)
        count += 1
    rate = count * BATCH / (time.perf_counter() - start)
    multi.close()
    return rate


def at(hw, hints, workload, workers: int, threads: object = "rules"):
    config = rules.recommend(hw, hints, workload, workers=workers)
    if threads != "rules":
        config = config.replace(worker_threads=threads)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tune-budget-s", type=float, default=90.0)
    parser.add_argument("--final-rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS-multi.md"))
    args = parser.parse_args()
    hw = probe_hardware()
    factory = OptimalDataLoaderFactory(profile_dir=tempfile.mkdtemp(), seed=0)
    lines = ["# Benchmark: several loaders in one loop", "",
             f"Measured {datetime.date.today()} on {hw.cpu.model}, {hw.cpu.usable} usable CPUs, "
             f"{hw.host.os}, Python {hw.host.python}, torch {torch.__version__}; "
             f"`python bench/multi.py --window-s {args.window_s:g} --rounds {args.rounds}`.", ""]

    # 1. CPU-bound + waiting-bound, 0.5/0.5
    datasets = {"cpu": PythonCompute(), "io": StorageLatency(200_000)}
    multi = factory.create_training_loaders(datasets, BATCH, strategy="weighted",
                                            weights=WEIGHTS)
    joint = {n: loader.num_workers for n, loader in multi.loaders.items()}
    reasons = {n: loader.autotune_config.reasons["num_workers"]
               for n, loader in multi.loaders.items()}
    multi.close()
    alone = {n: factory.create_training_loader(ds, BATCH).num_workers
             for n, ds in datasets.items()}
    hints = rules.DatasetHints(dataset_size=200_000, batch_size=BATCH)
    workloads = {n: factory.pipeline.measure_once(ds, {}) for n, ds in datasets.items()}

    def configs(workers: dict[str, int]) -> dict[str, object]:
        return {n: at(hw, hints, workloads[n], w) for n, w in workers.items()}

    tuned = MultiAutotuner(datasets, BATCH, strategy="weighted", weights=WEIGHTS,
                           budget_s=args.tune_budget_s, hardware=hw).run()
    print(tuned.table(), flush=True)
    tuned_workers = tuned.best.workers()

    grid = {}
    for w_cpu in (1, 2, 3, 4):
        for w_io in (1, 2, 4, 6, 8, 12, 16, 24, 32, 48):
            grid[(w_cpu, w_io)] = loop_rate(datasets, configs({"cpu": w_cpu, "io": w_io}),
                                            args.window_s)
            print(f"grid cpu={w_cpu} io={w_io}: {grid[(w_cpu, w_io)]:,.0f} samples/s",
                  flush=True)
    top = max(grid, key=grid.get)
    near = sorted((k for k in grid if grid[k] >= 0.90 * grid[top]), key=lambda k: (sum(k), k))
    candidates = {"jointly sized": (joint["cpu"], joint["io"]),
                  "tuned as one": (tuned_workers["cpu"], tuned_workers["io"]),
                  "sized alone": (alone["cpu"], alone["io"]), "grid top": top}
    for k in near[:4]:
        if k not in candidates.values():
            candidates[f"grid {k[0]}+{k[1]}"] = k
    joint_configs = {n: loader.autotune_config for n, loader in multi.loaders.items()}

    def interleave(names: list[str], rounds: int, first_seed: int) -> dict[str, list[float]]:
        """Each round runs every setting once, in its own shuffled order: drift hits all
        alike."""
        runs: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(rounds):
            order = list(names)
            random.Random(first_seed + round_).shuffle(order)
            for name in order:
                w_cpu, w_io = candidates[name]
                chosen = (joint_configs if name == "jointly sized" else tuned.best.members
                          if name == "tuned as one" else configs({"cpu": w_cpu, "io": w_io}))
                runs[name].append(loop_rate(datasets, chosen, args.window_s))
        return runs

    runs = interleave(list(candidates), args.rounds, 0)
    means = {name: statistics.fmean(r) for name, r in runs.items()}
    best = max(means.values())
    top_name = max(means, key=means.get)
    # the machine drifts by more than settings differ: each run against the best setting's
    # run of the same round, the median over rounds
    paired = {name: statistics.median(r / t for r, t in zip(runs[name], runs[top_name]))
              for name in runs}
    leanest = min((n for n in means if means[n] >= 0.97 * best and n.startswith("grid")),
                  key=lambda n: sum(candidates[n]), default=None)
    lines += [
        "## A CPU-bound and a waiting-bound dataset, weighted 0.5/0.5",
        "",
        f"`PythonCompute` (~{workloads['cpu'].sec_per_sample * 1e3:.1f} ms of pure Python a "
        f"sample) and `StorageLatency` (lognormal waits, median 2 ms), batch {BATCH}, "
        "`MultiLoader(strategy='weighted', weights=0.5/0.5)`: samples/s of the loop, steady "
        f"state, mean of {args.rounds} interleaved runs of {args.window_s:g} s each; 'of best' "
        "is against the best mean among these; 'paired' is the median over rounds of each run "
        "against the best setting's run in the same round (rounds run in shuffled orders), "
        "which the machine's drift over time touches less. Grid: cpu workers {1, 2, 3, 4} x "
        "io workers {1, 2, 4, 6, 8, 12, 16, 24, 32, 48}, each with the rules' other settings "
        "for its count; its top and its leanest settings within 10% were measured again here.",
        "",
        "| setting | workers (cpu + io) | samples/s | of best | paired | runs |",
        "|---|---|---|---|---|---|"]
    for name in sorted(candidates, key=lambda n: -means[n]):
        w = candidates[name]
        mark = " (leanest within 3% of best)" if name == leanest else ""
        lines.append(f"| {name}{mark} | {w[0]} + {w[1]} = {sum(w)} | {means[name]:,.0f} | "
                     f"{means[name] / best:.2f} | {paired[name]:.2f} | "
                     f"{', '.join(f'{r:,.0f}' for r in runs[name])} |")
    # The best of many noisy means is biased up (the winner's curse): the best grid setting
    # is chosen from the runs above, then measured again, head to head, in fresh runs.
    reference = max((n for n in means if n.startswith("grid")), key=means.get)
    duel = [reference, "jointly sized", "tuned as one"]
    if leanest is not None and leanest not in duel:
        duel.append(leanest)
    again = interleave(duel, args.final_rounds, 1000)
    fresh = {name: statistics.median(r / t for r, t in zip(again[name], again[reference]))
             for name in duel}
    lines += ["", f"Head to head: the best grid setting by the means above ({reference}) "
              f"against the chosen ones, {args.final_rounds} fresh rounds in shuffled orders; "
              "'paired' is the median over rounds of each run against the grid setting's run "
              "of the same round.", "",
              "| setting | workers | samples/s (mean) | paired | runs |", "|---|---|---|---|---|"]
    for name in duel:
        w = candidates[name]
        lines.append(f"| {name} | {w[0]} + {w[1]} = {sum(w)} | "
                     f"{statistics.fmean(again[name]):,.0f} | {fresh[name]:.2f} | "
                     f"{', '.join(f'{r:,.0f}' for r in again[name])} |")
    lines += ["", "Why the joint sizing chose its counts:", ""]
    lines += [f"- {n}: {reasons[n]}" for n in reasons]
    lines += ["", f"Tuned as one: `MultiAutotuner(..., strategy='weighted', budget_s="
              f"{args.tune_budget_s:g})`, {len(tuned.trials)} trials in {tuned.elapsed_s:.0f} s; "
              f"its own measurement: {tuned.best_samples_per_s:,.0f} samples/s of the loop.", "",
              "```", tuned.table(), "```"]
    if leanest is not None:
        lean_total = sum(candidates[leanest])
        lines += ["", f"Targets: jointly sized >= 0.95 of the best grid split, head to head: "
                  f"**{fresh['jointly sized']:.2f}** (of the best mean in the first table "
                  f"{means['jointly sized'] / best:.2f}); its {sum(candidates['jointly sized'])}"
                  f" workers against 1.5 x the leanest grid setting within 3% ({lean_total}): "
                  f"**{sum(candidates['jointly sized']) / lean_total:.2f}x** (target <= 1.5x); "
                  f"tuned as one: **{fresh['tuned as one']:.2f}** head to head (first table "
                  f"{means['tuned as one'] / best:.2f}) with "
                  f"{sum(candidates['tuned as one'])} workers; "
                  f"sized alone: {sum(candidates['sized alone'])} workers."]

    # 2. two BLAS-heavy loaders: thread budgets
    blas = {"cpu": BlasAugment(40_000), "io": BlasAugment(40_000)}  # names reused as keys
    multi = factory.create_training_loaders(blas, BATCH, strategy="weighted", weights=WEIGHTS)
    joint_cfg = {n: loader.autotune_config for n, loader in multi.loaders.items()}
    multi.close()
    alone_cfg = {n: factory.create_training_loader(ds, BATCH).autotune_config
                 for n, ds in blas.items()}
    uncapped = {n: c.replace(worker_threads=None) for n, c in alone_cfg.items()}
    settings = {"joint thread budget": joint_cfg, "each sized alone": alone_cfg,
                "alone, pools uncapped": uncapped}
    blas_runs: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, cfg in settings.items():
            blas_runs[name].append(loop_rate(blas, cfg, args.window_s))
    blas_means = {n: statistics.fmean(r) for n, r in blas_runs.items()}
    blas_best = max(blas_means.values())
    lines += ["", "## Two BLAS-heavy loaders (numpy matmul), weighted 0.5/0.5", "",
              "| setting | workers x threads per loader | total threads | samples/s | of best |",
              "|---|---|---|---|---|"]
    for name, cfg in settings.items():
        shape = " and ".join(f"{c.num_workers} x {c.worker_threads or 'all'}"
                             for c in cfg.values())
        total = sum(c.num_workers * (c.worker_threads or hw.cpu_budget) for c in cfg.values())
        lines.append(f"| {name} | {shape} | {total} on {hw.cpu_budget} CPUs | "
                     f"{blas_means[name]:,.0f} | {blas_means[name] / blas_best:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
