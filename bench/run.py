"""The autotuner against static rules and a full grid, measured side by side on this machine.

For each workload in ``workloads.py``: torch's defaults, Lightning's hint
(``max(1, cpus // devices - 1)`` workers), ``num_workers = os.cpu_count()``, the rules without
and with ``measure_workload``, the autotuner's choice, and the best of a full grid over
workers x prefetch. The grid and the tuner are timed; then every candidate is measured again,
interleaved, ``--rounds`` times with the same steady-state trial the tuner uses, and the
means are compared with the grid best's. Results go to ``--out`` (bench/RESULTS.md).

    python bench/run.py                       # everything (about 50 minutes on 2 CPUs)
    python bench/run.py --only tiny --budget-s 20
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

import torch  # noqa: E402

import autotune  # noqa: E402
from autotune import LoaderConfig  # noqa: E402
from autotune.policy import rules  # noqa: E402
from autotune.measure.trial import run_trial  # noqa: E402
from autotune.tuning.tuner import trial_window_s  # noqa: E402
from workloads import all_workloads  # noqa: E402

GRID_WORKERS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
GRID_PREFETCH = (1, 2, 4, 8)
HANG_S = 30.0
COMPARE_WINDOWS = 2  # the side-by-side runs count over twice the tuner's trial window
CANDIDATES = ("torch defaults", "Lightning hint", "os.cpu_count()", "rules, no measuring",
              "rules + measure_workload", "autotuner", "grid best")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=60.0, help="the autotuner's budget")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", help="run the workloads whose name contains one of these "
                        "comma-separated words")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
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
    log(f"== {name}: {len(dataset)} samples, batch {batch}")
    workload = autotune.measure_workload(dataset)
    hints = rules.DatasetHints(dataset_size=len(dataset), batch_size=batch)
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

    window = trial_window_s(args.budget_s, batch * workload.sec_per_sample)
    start = time.perf_counter()
    grid = []
    for workers in GRID_WORKERS:
        for prefetch in (GRID_PREFETCH if workers else (None,)):
            config = LoaderConfig(num_workers=workers, prefetch_factor=prefetch,
                                  persistent_workers=workers > 0)
            grid.append(run_trial(dataset, batch, config, phase="grid", window_s=window,
                                  hang_s=HANG_S))
    grid_s = time.perf_counter() - start
    ok = [t for t in grid if t.ok]
    configs["grid best"] = max(ok, key=lambda t: t.samples_per_s).config
    log(f"   grid: {grid_s:.0f} s, {len(grid)} trials -> {short(configs['grid best'])}")

    rates: dict[str, list[float]] = {k: [] for k in configs}
    for round_ in range(args.rounds):
        for label, config in configs.items():
            trial = run_trial(dataset, batch, config, phase="compare",
                              window_s=COMPARE_WINDOWS * window, hang_s=HANG_S)
            rates[label].append(trial.samples_per_s if trial.ok else 0.0)
        log(f"   round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rates.items()))
    return {
        "name": name, "batch_size": batch, "samples": len(dataset),
        "workload": workload.to_dict(), "window_s": window,
        "configs": {k: c.settings() for k, c in configs.items()},
        "rates": rates, "mean": {k: statistics.mean(v) for k, v in rates.items()},
        "tune_s": tune_s, "tune_trials": len(tuned.trials), "grid_s": grid_s,
        "grid": [(t.config.num_workers, t.config.prefetch_factor, t.samples_per_s, t.error)
                 for t in grid],
        "tuned_reason": tuned.best.reasons.get("num_workers"),
        "rules_reason": configs["rules + measure_workload"].reasons.get("num_workers"),
    }


def render(hw, results, args) -> str:
    cpu = hw.cpu
    lines = [
        "# Benchmark: the autotuner against static rules and a full grid",
        "",
        f"Measured {datetime.date.today()} on {cpu.model}, {cpu.usable} usable CPUs "
        f"({cpu.logical} logical), {hw.memory.total_bytes / 2**30:.0f} GiB RAM, "
        f"{hw.host.os}, Python {hw.host.python}, torch {torch.__version__}; "
        f"`python bench/run.py --budget-s {args.budget_s:g} --rounds {args.rounds}"
        f"{f' --only {args.only}' if args.only else ''}`.",
        "",
        "Samples/s in steady state (start-up and the prefetch burst excluded), each the mean "
        f"of {args.rounds} interleaved runs of {COMPARE_WINDOWS}x the tuner's trial window, "
        "as a fraction of the grid best's mean from the same runs. The grid (persistent "
        "workers, same trial window as the tuner, so its time compares with the tuner's) is "
        "workers "
        f"{{{', '.join(map(str, GRID_WORKERS))}}} x prefetch {{{', '.join(map(str, GRID_PREFETCH))}}} "
        "with torch's own thread settings.",
        "",
        "| workload | " + " | ".join(CANDIDATES) + " | tuning s | grid s | tuning / grid |",
        "|---|" + "---|" * (len(CANDIDATES) + 3),
    ]
    for r in results:
        best = r["mean"]["grid best"] or 1.0
        cells = [f"{r['mean'][k] / best:.2f}" for k in CANDIDATES]
        lines.append(f"| {r['name']} | " + " | ".join(cells) +
                     f" | {r['tune_s']:.0f} | {r['grid_s']:.0f} | {r['tune_s'] / r['grid_s']:.2f} |")
    lines += ["", "Worst workload per candidate (the bar is the worst, not the average):", ""]
    for k in CANDIDATES:
        worst = min(results, key=lambda r: r["mean"][k] / (r["mean"]["grid best"] or 1))
        lines.append(f"- {k}: {worst['mean'][k] / (worst['mean']['grid best'] or 1):.2f} "
                     f"({worst['name']})")
    lines += ["", "## Targets", "", *targets(results, args.budget_s), "", "## Per workload", ""]
    for r in results:
        lines += [f"### {r['name']} ({r['samples']} samples, batch {r['batch_size']}, "
                  f"window {r['window_s']:.1f} s)", "",
                  f"measured: {r['workload']['sec_per_sample'] * 1e3:.3f} ms/sample, "
                  f"{r['workload']['cpu_fraction']:.0%} computing, parallelism "
                  f"{r['workload']['parallelism']:.2f}, {r['workload']['sample_bytes']:,} "
                  "bytes/sample", "",
                  "| candidate | settings | samples/s (runs) | x grid best |", "|---|---|---|---|"]
        best = r["mean"]["grid best"] or 1.0
        for k in CANDIDATES:
            runs = ", ".join(f"{v:,.0f}" for v in r["rates"][k])
            lines.append(f"| {k} | {short_settings(r['configs'][k])} | {r['mean'][k]:,.0f} "
                         f"({runs}) | {r['mean'][k] / best:.2f} |")
        lines += ["", f"rules + measure_workload: {r['rules_reason']}",
                  f"autotuner: {r['tuned_reason']}; {r['tune_trials']} trials", ""]
    return "\n".join(lines) + "\n"


TUNER_TARGET, RULES_TARGET, TIME_SHARE_TARGET = 0.95, 0.80, 0.20


def targets(results: list[dict], budget_s: float) -> list[str]:
    """Issue 3's targets, each met or missed per workload, from this run's figures."""
    def share(r: dict, k: str) -> float:
        return r["mean"][k] / (r["mean"]["grid best"] or 1.0)

    def check(title: str, ok: Callable[[dict], bool], figure: Callable[[dict], str],
              only: str = "") -> str:
        rows = [r for r in results if only in r["name"]]
        missed = [f"{r['name']} {figure(r)}" for r in rows if not ok(r)]
        met = [f"{r['name']} {figure(r)}" for r in rows if ok(r)]
        if not rows:
            return f"- {title}: not measured in this run"
        verdict = f"**missed on {'; '.join(missed)}**" if missed else "met on every workload"
        return f"- {title}: {verdict}" + (f" (met: {'; '.join(met)})" if missed and met else "")

    return [
        check(f"autotuner >= {TUNER_TARGET} of the grid best",
              lambda r: share(r, "autotuner") >= TUNER_TARGET,
              lambda r: f"{share(r, 'autotuner'):.2f}"),
        check("autotuner above the grid best where capping BLAS pools pays",
              lambda r: share(r, "autotuner") > 1.0,
              lambda r: f"{share(r, 'autotuner'):.2f}", only="BLAS"),
        check(f"rules + measure_workload >= {RULES_TARGET} of the grid best",
              lambda r: share(r, "rules + measure_workload") >= RULES_TARGET,
              lambda r: f"{share(r, 'rules + measure_workload'):.2f}"),
        check(f"tuning within {budget_s:g} s and {TIME_SHARE_TARGET:.0%} of the grid's time",
              lambda r: r["tune_s"] <= budget_s and r["tune_s"] <= TIME_SHARE_TARGET * r["grid_s"],
              lambda r: f"{r['tune_s']:.0f} s, {r['tune_s'] / r['grid_s']:.2f}"),
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
