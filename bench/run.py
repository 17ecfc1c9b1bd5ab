"""The autotuner against static rules and a full grid, measured side by side on this machine.

For each workload in ``workloads.py``: torch's defaults, Lightning's hint
(``max(1, cpus // devices - 1)`` workers), ``num_workers = os.cpu_count()``, the rules without
and with ``measure_workload``, the autotuner's choice, and a full grid over workers x prefetch
(each grid setting with the thread budget the rules give that worker count, so the grid
covers the space the tuner searches). The grid and the tuner are timed, and every trial uses
the tuner's burst-safe window for its worker count. Then every candidate, the grid's top
setting and its leanest near-top settings among them, is measured again, interleaved,
``--rounds`` times; the grid best is the best of those means, and the leanest grid setting
is the one with the fewest workers within 3% of it. Results go to ``--out``
(bench/RESULTS.md), with workers and memory (peak PSS) beside every ratio.

A stream (``IterableDataset``) has no len() for the rules or the tuner, and its
side-by-side runs count whole epochs (after one warm-up epoch) instead of a window: each
worker reads its own shards, so batches come in epoch-sized waves that a window shorter than
an epoch catches or misses (``--stream-epochs``).

    python bench/run.py                       # everything (about 60 minutes on 2 CPUs)
    python bench/run.py --only tiny --budget-s 20
    python bench/run.py --only stream --out /tmp/stream.md   # ~9 minutes; fold into RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch

import autotune
from autotune import LoaderConfig
from autotune.policy import rules
from autotune.loading.builder import build_loader
from autotune.tuning.trial import batch_length, run_trial
from autotune.system.usage import PeakMemory
from autotune.tuning.tuner import window_for
from workloads import all_workloads

GRID_WORKERS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GRID_PREFETCH = (1, 2, 4, 8)
HANG_S = 30.0
COMPARE_WINDOWS = 2  # the side-by-side runs count over twice the tuner's trial window
LEAN_WITHIN = 0.97  # the leanest grid setting: fewest workers within 3% of the grid best
GRID_NEAR = 0.90  # grid settings this close to the grid's top trial are measured again ...
GRID_RECHECK = 4  # ... the leanest this many of them
CANDIDATES = ("torch defaults", "Lightning hint", "os.cpu_count()", "rules, no measuring",
              "rules + measure_workload", "autotuner", "grid best", "grid leanest")
TUNER_TARGET, RULES_TARGET, LEAN_FACTOR = 0.95, 0.85, 1.5
STREAM_WARMUP_CAP_S = 12.0  # a stream's warm-up epoch longer than this: count a window instead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=60.0, help="the autotuner's budget")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="run the workloads whose name contains one of these "
                        "comma-separated words")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--stream-epochs", type=int, default=2, help="whole epochs a stream's "
                        "side-by-side runs count (0: a window, as for map-style datasets)")
    args = parser.parse_args()

    hw = autotune.probe_hardware()
    with tempfile.TemporaryDirectory() as tmp:
        words = args.only.split(",") if args.only else []
        workloads = [w for w in all_workloads(Path(tmp))
                     if not words or any(word in w[0] for word in words)]
        results: list[dict] = []
        for name, dataset, batch in workloads:
            results.append(bench_workload(hw, name, dataset, batch, args))
            report = render(hw, results, args)  # after each workload: a cut-off run keeps some
            Path(args.out).write_text(report)
            Path(args.out).with_suffix(".json").write_text(
                json.dumps(results, indent=1, default=str))
    print(report)


def bench_workload(hw, name, dataset, batch, args) -> dict:
    # A stream (IterableDataset) has no len(): the tuner and the rules see an unknown size,
    # as they would in training; the report shows its samples per epoch if it says them.
    stream = isinstance(dataset, torch.utils.data.IterableDataset)
    size = None if stream else len(dataset)
    samples = getattr(dataset, "samples", None) if stream else size
    log(f"== {name}: {'stream, ' if stream else ''}{samples} samples"
        f"{' per epoch' if stream else ''}, batch {batch}")
    workload = autotune.measure_workload(dataset)
    hints = rules.DatasetHints(dataset_size=size, batch_size=batch, stream=stream)
    cpus = os.cpu_count() or 1
    configs = {
        "torch defaults": LoaderConfig(),
        "Lightning hint": LoaderConfig(num_workers=max(1, cpus // 1 - 1)),
        "os.cpu_count()": LoaderConfig(num_workers=cpus),
        "rules, no measuring": rules.recommend(hw, hints),
        "rules + measure_workload": rules.recommend(hw, hints, workload),
    }
    start = time.perf_counter()
    tuned = autotune.Autotuner(dataset, batch, budget_s=args.budget_s, progress=False).run()
    tune_s = time.perf_counter() - start
    configs["autotuner"] = tuned.best
    log(f"   tuner: {tune_s:.0f} s, {len(tuned.trials)} trials -> {short(tuned.best)}")

    def window(config: LoaderConfig) -> float:
        return window_for(workload, batch, config.num_workers, cpus=hw.cpu_budget,
                          budget_s=args.budget_s)

    start = time.perf_counter()
    grid = []
    for workers in GRID_WORKERS:
        for prefetch in (GRID_PREFETCH if workers else (None,)):
            config = rules.recommend(hw, hints, workload, workers=workers).replace(
                prefetch_factor=prefetch, persistent_workers=workers > 0, in_order=True)
            grid.append(run_trial(dataset, batch, config, phase="grid", window_s=window(config),
                                  hang_s=HANG_S))
    grid_s = time.perf_counter() - start
    ok = sorted((t for t in grid if t.ok), key=lambda t: -t.samples_per_s)
    top = ok[0]
    near = [t for t in ok if t.samples_per_s >= GRID_NEAR * top.samples_per_s and t is not top]
    near.sort(key=lambda t: (t.config.num_workers, t.peak_memory_bytes or 0))
    grid_configs = {"grid #1": top.config}
    for i, t in enumerate(near[:GRID_RECHECK], 2):
        grid_configs[f"grid #{i}"] = t.config
    log(f"   grid: {grid_s:.0f} s, {len(grid)} trials -> top {short(top.config)}; rechecking "
        + ", ".join(short(c) for c in grid_configs.values()))

    measured = {**configs, **grid_configs}
    rates: dict[str, list[float]] = {k: [] for k in measured}
    memory: dict[str, list[int]] = {k: [] for k in measured}
    by_epochs = stream and args.stream_epochs > 0
    for round_ in range(args.rounds):
        for label, config in measured.items():
            if by_epochs:
                rate, peak = stream_epochs_rate(dataset, batch, config, args.stream_epochs,
                                                COMPARE_WINDOWS * window(config))
            else:
                trial = run_trial(dataset, batch, config, phase="compare",
                                  window_s=COMPARE_WINDOWS * window(config), hang_s=HANG_S)
                rate, peak = (trial.samples_per_s if trial.ok else 0.0), trial.peak_memory_bytes
            rates[label].append(rate)
            memory[label].append(peak or 0)
        log(f"   round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
    mean = {k: statistics.mean(v) for k, v in rates.items()}
    best_label = max(grid_configs, key=mean.__getitem__)
    lean_label = min((k for k in grid_configs if mean[k] >= LEAN_WITHIN * mean[best_label]),
                     key=lambda k: (grid_configs[k].num_workers, statistics.mean(memory[k])))
    for label, source in (("grid best", best_label), ("grid leanest", lean_label)):
        measured[label], rates[label], memory[label] = (measured[source], rates[source],
                                                        memory[source])
        mean[label] = mean[source]
    return {
        "name": name, "batch_size": batch, "samples": samples, "stream": stream,
        "compare": f"{args.stream_epochs} whole epochs" if by_epochs else "window",
        "workload": workload.to_dict(), "window_s": window(LoaderConfig()),
        "configs": {k: c.settings() for k, c in measured.items()},
        "rates": rates, "mean": mean,
        "memory_mb": {k: statistics.mean(v) / 1e6 for k, v in memory.items()},
        "tune_s": tune_s, "tune_trials": len(tuned.trials), "grid_s": grid_s,
        "grid": [(t.config.num_workers, t.config.prefetch_factor, t.config.worker_threads,
                  t.samples_per_s, t.peak_memory_bytes, t.error) for t in grid],
        "grid_rechecked": {k: measured[k].settings() for k in grid_configs},
        "tuned_fastest": tuned.fastest.settings() if tuned.fastest else None,
        "tuned_reason": tuned.best.reasons.get("num_workers"),
        "rules_reason": configs["rules + measure_workload"].reasons.get("num_workers"),
    }


def stream_epochs_rate(dataset, batch: int, config: LoaderConfig, epochs: int,
                       window_s: float) -> tuple[float, int | None]:
    """(samples/s over ``epochs`` whole epochs of a stream after a warm-up epoch, peak PSS).

    The loader is the tuner's (``build_loader``), with the config as given (a new epoch
    restarts non-persistent workers, as in training). A setting whose warm-up epoch runs
    past ``STREAM_WARMUP_CAP_S`` (few workers: slow, and not wave-like) is counted over
    ``window_s`` from there instead. 0.0 if the loader fails.
    """
    built = config.replace(timeout=HANG_S) if config.num_workers else config
    memory = PeakMemory()
    memory.start()
    loader = None
    try:
        loader = build_loader(dataset, batch, built, shuffle=False)
        start = time.perf_counter()
        iterator = iter(loader)
        for _ in iterator:  # warm-up epoch: worker start-up and the first fill
            if time.perf_counter() - start > STREAM_WARMUP_CAP_S:
                return window_rate(loader, iterator, window_s), memory.peak
        samples, began = 0, time.perf_counter()
        for _ in range(epochs):
            for b in loader:
                samples += batch_length(b)
        return samples / (time.perf_counter() - began), memory.peak
    except Exception as exc:  # a failed setting scores 0, as a failed trial
        log(f"   {short(config)} failed: {type(exc).__name__}: {exc}")
        return 0.0, memory.peak
    finally:
        if loader is not None:
            loader.close()
        memory.stop()


def window_rate(loader, iterator, window_s: float) -> float:
    """Samples/s over ``window_s`` from here, going on into new epochs."""
    samples, began = 0, time.perf_counter()
    while time.perf_counter() - began < window_s:
        try:
            b = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        samples += batch_length(b)
    return samples / (time.perf_counter() - began)


def render(hw, results, args) -> str:
    cpu = hw.cpu
    lines = [
        "# Benchmark: the autotuner against static rules and a full grid",
        "",
        f"Measured {datetime.date.today()} on {cpu.model}, {cpu.usable} usable CPUs "
        f"({cpu.logical} logical), {hw.memory.total_bytes / 2**30:.0f} GiB RAM, "
        f"{hw.host.os}, Python {hw.host.python}, torch {torch.__version__}; "
        f"`python bench/run.py --budget-s {args.budget_s:g} --rounds {args.rounds}"
        f"{f' --only {args.only}' if args.only else ''}"
        f"{f' --stream-epochs {args.stream_epochs}' if args.stream_epochs != 2 else ''}`.",
        "",
        "Each cell: samples/s in steady state (start-up and the prefetch burst excluded), the "
        f"mean of {args.rounds} interleaved runs of {COMPARE_WINDOWS}x the tuner's trial window "
        "for that worker count, as a fraction of the grid best's mean from the same runs; then "
        "workers and memory (peak PSS of the main process and its workers, MB). The grid "
        "(persistent workers, the tuner's burst-safe window, so its time compares with the "
        "tuner's) is workers "
        f"{{{', '.join(map(str, GRID_WORKERS))}}} x prefetch "
        f"{{{', '.join(map(str, GRID_PREFETCH))}}}, each with the thread budget the rules give "
        f"that worker count. Its top setting and the {GRID_RECHECK} leanest within "
        f"{1 - GRID_NEAR:.0%} of it are measured again with the others; 'grid best' is the best "
        f"of those, 'grid leanest' the fewest workers within {1 - LEAN_WITHIN:.0%} of it.",
        "",
        "| workload | " + " | ".join(CANDIDATES) + " | tuning s | grid s |",
        "|---|" + "---|" * (len(CANDIDATES) + 2),
    ]
    for r in results:
        cells = [cell(r, k) for k in CANDIDATES]
        lines.append(f"| {r['name']} | " + " | ".join(cells) +
                     f" | {r['tune_s']:.0f} | {r['grid_s']:.0f} |")
    lines += ["", "Worst workload per candidate (the bar is the worst, not the average):", ""]
    for k in CANDIDATES:
        worst = min(results, key=lambda r: share(r, k))
        lines.append(f"- {k}: {share(worst, k):.2f} ({worst['name']})")
    lines += ["", "## Targets", "", *targets(results, args.budget_s), "", "## Per workload", ""]
    for r in results:
        kind = "stream, no len(), " if r.get("stream") else ""
        per = " per epoch" if r.get("stream") else ""
        lines += [(f"### {r['name']} ({kind}{r['samples']} samples{per}, batch "
                   f"{r['batch_size']})"), ""]
        if r.get("compare", "window") != "window":
            lines += [(f"Side-by-side runs of this stream count {r['compare']} after a warm-up "
                       f"epoch (a warm-up epoch over {STREAM_WARMUP_CAP_S:g} s: a window from "
                       "there), not a window: its batches come in epoch-sized waves. The grid "
                       "and the tuner's trials are windows, as for the others."), ""]
        lines += [f"measured: {r['workload']['sec_per_sample'] * 1e3:.3f} ms/sample, "
                  f"{r['workload']['cpu_fraction']:.0%} computing, parallelism "
                  f"{r['workload']['parallelism']:.2f}, {r['workload']['sample_bytes']:,} "
                  "bytes/sample", "",
                  "| candidate | settings | samples/s (runs) | x grid best | memory MB |",
                  "|---|---|---|---|---|"]
        for k in [*CANDIDATES, *r["grid_rechecked"]]:
            runs = ", ".join(f"{v:,.0f}" for v in r["rates"][k])
            lines.append(f"| {k} | {short_settings(r['configs'][k])} | {r['mean'][k]:,.0f} "
                         f"({runs}) | {share(r, k):.2f} | {r['memory_mb'][k]:,.0f} |")
        fastest = r["tuned_fastest"]
        lines += ["", f"rules + measure_workload: {r['rules_reason']}",
                  f"autotuner: {r['tuned_reason']}"
                  + (f"; its fastest trial: {short_settings(fastest)}" if fastest else ""), ""]
    return "\n".join(lines) + "\n"


def share(r: dict, k: str) -> float:
    return r["mean"][k] / (r["mean"]["grid best"] or 1.0)


def cell(r: dict, k: str) -> str:
    return (f"{share(r, k):.2f} ({r['configs'][k]['num_workers']}w, "
            f"{r['memory_mb'][k]:,.0f} MB)")


def lean_ok(r: dict) -> bool:
    limit = max(2, LEAN_FACTOR * r["configs"]["grid leanest"]["num_workers"])
    return r["configs"]["autotuner"]["num_workers"] <= limit


def targets(results: list[dict], budget_s: float) -> list[str]:
    """The targets, each met or missed per workload, from this run's figures."""
    def check(title: str, ok: Callable[[dict], bool], figure: Callable[[dict], str]) -> str:
        missed = [f"{r['name']} {figure(r)}" for r in results if not ok(r)]
        met = [f"{r['name']} {figure(r)}" for r in results if ok(r)]
        if not results:
            return f"- {title}: not measured in this run"
        verdict = f"**missed on {'; '.join(missed)}**" if missed else "met on every workload"
        return f"- {title}: {verdict}" + (f" (met: {'; '.join(met)})" if missed and met else "")

    def workers(r: dict) -> str:
        return (f"{r['configs']['autotuner']['num_workers']} vs "
                f"{r['configs']['grid leanest']['num_workers']}")

    return [
        check(f"autotuner >= {TUNER_TARGET} of the grid best",
              lambda r: share(r, "autotuner") >= TUNER_TARGET,
              lambda r: f"{share(r, 'autotuner'):.2f}"),
        check(f"autotuner workers <= max(2, {LEAN_FACTOR}x the grid's leanest within "
              f"{1 - LEAN_WITHIN:.0%} of its best)", lean_ok, workers),
        check(f"rules + measure_workload >= {RULES_TARGET} of the grid best",
              lambda r: share(r, "rules + measure_workload") >= RULES_TARGET,
              lambda r: f"{share(r, 'rules + measure_workload'):.2f}"),
        check(f"tuning within {budget_s:g} s",
              lambda r: r["tune_s"] <= budget_s, lambda r: f"{r['tune_s']:.0f} s"),
    ]


def short(config: LoaderConfig) -> str:
    return short_settings(config.settings())


def short_settings(s: dict) -> str:
    text = f"{s['num_workers']} workers"
    if s["num_workers"]:
        text += f", prefetch {s['prefetch_factor'] or 2}"
        if s["worker_threads"] is not None:
            text += f", {s['worker_threads']} thread(s)"
        if not s["in_order"]:
            text += ", out of order"
    return text


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
