"""The ``autotune`` command: thin over the Python API, human tables or ``--json``.

Exit codes: 0 success, 1 an expected error (one line, no traceback), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import AutotuneError
from .profiles import check_writable, find_profile, load_profile, save_hardware
from .records import HardwareInfo
from .system.hardware import probe_hardware

GIB = 1 << 30


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help is 0, bad usage is 2
        return int(exc.code or 0)
    try:
        return args.run(args)
    except AutotuneError as exc:
        print(f"autotune: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("autotune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `autotune probe --json | head -1`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotune", description="Hardware-aware settings for PyTorch DataLoaders.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    probe = commands.add_parser("probe", help="what this process may use: CPUs, memory, GPUs")
    probe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    probe.add_argument("--save", action="store_true", help="write this host's profile")
    probe.add_argument("--profile-dir", metavar="DIR",
                       help="profile directory (default: $AUTOTUNE_PROFILE_DIR or ./profiles)")
    probe.set_defaults(run=cmd_probe)

    rec = commands.add_parser("recommend", help="the rules' settings for a dataset, with reasons")
    rec.add_argument("--dataset-size", type=_positive_int, required=True, metavar="N")
    rec.add_argument("--augmentation", action="store_true", help="samples are augmented")
    rec.add_argument("--standardization", action="store_true", help="samples are standardized")
    rec.add_argument("--batch-size", type=_positive_int, metavar="B")
    rec.add_argument("--validation", action="store_true", help="for a validation loader")
    rec.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rec.set_defaults(run=cmd_recommend)

    tune = commands.add_parser("tune", help="measure settings on your dataset, save the best")
    tune.add_argument("target", metavar="MODULE:CALLABLE",
                      help="returns the dataset, e.g. examples/datasets.py:make_dataset or "
                           "mypkg.data:make_dataset; or a mapping name -> dataset, tuned as "
                           "one training loop (with --strategy)")
    tune.add_argument("--batch-size", type=_positive_int, required=True, metavar="B")
    tune.add_argument("--budget-s", type=_positive_float, default=60.0, metavar="S",
                      help="time to spend measuring (default 60)")
    tune.add_argument("--key", help="profile key (default: the dataset's class name; several "
                      "datasets: their class names joined by +)")
    tune.add_argument("--step-time-s", type=_non_negative_float, metavar="T",
                      help="simulate a training step of T seconds per batch: choose the "
                           "cheapest settings that keep up, not the fastest")
    tune.add_argument("--max-workers", type=_positive_int, metavar="N")
    tune.add_argument("--hang-timeout-s", type=_positive_float, metavar="S",
                      help="a batch (or, while measuring, a sample) slower than this counts "
                           "as hung (default: 20x the measured batch time, at least 10 s; "
                           "30 s for a sample)")
    tune.add_argument("--strategy", choices=("round_robin", "alternating", "weighted"),
                      help="several datasets: how the loop interleaves them (MultiLoader)")
    tune.add_argument("--weights", type=_weights, metavar="NAME=W,...",
                      help="several datasets: weights for alternating or weighted, e.g. "
                           "images=3,text=1")
    tune.add_argument("--profile-dir", metavar="DIR")
    tune.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tune.add_argument("--quiet", action="store_true",
                      help="no progress bar (there is none when stderr is not a terminal)")
    tune.add_argument("--plot", metavar="FILE.png", help="draw samples/s of every trial "
                      "(needs matplotlib: pip install 'autotune[plot]')")
    tune.set_defaults(run=cmd_tune)

    show = commands.add_parser("show", help="this host's profile and whether it applies")
    show.add_argument("--profile-dir", metavar="DIR")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.set_defaults(run=cmd_show)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _weights(text: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = int(value)
        except ValueError:
            try:
                weights[name.strip()] = float(value)
            except ValueError:
                sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"{part!r} must look like NAME=WEIGHT, e.g. "
                                             "images=3,text=1")
    return weights


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return value


def cmd_probe(args: argparse.Namespace) -> int:
    hw = probe_hardware()
    if args.json:
        _print_json(hw.to_dict())
    else:
        print(format_hardware(hw))
    if args.save:
        path = save_hardware(hw, args.profile_dir)
        print(f"saved {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .factory.factory import OptimalDataLoaderFactory

    factory = OptimalDataLoaderFactory(measure=False)
    config = factory.get_optimal_config(
        args.dataset_size, args.augmentation, args.standardization,
        batch_size=args.batch_size, training=not args.validation)
    if args.json:
        _print_json({"config": config.to_dict(), "dataloader_kwargs": {
            k: v for k, v in config.dataloader_kwargs().items() if k != "worker_init_fn"}})
    else:
        print(config.explain())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure, print every trial, then save: a failed save still shows what was measured.

    Under torchrun (``WORLD_SIZE`` > 1) it joins torchrun's ranks in a gloo process group
    for the run: every rank measures each trial at once, rank 0 decides, writes the one
    profile entry and prints; the other ranks print nothing unless it fails, then every
    rank prints the same error line (before any leaves the group) and exits 1.
    """
    from .tuning.ranks import torchrun_group

    with torchrun_group() as joined:
        if not joined:
            return _tune(args)
        try:
            return _tune(args)
        except AutotuneError as exc:  # said on every rank before the group's last barrier
            print(f"autotune: error: {exc}", file=sys.stderr)
            return 1


def _tune(args: argparse.Namespace) -> int:
    from ._load import load_dataset
    from .tuning.ranks import Team

    def prepare() -> Any:
        check_writable(args.profile_dir)  # fail now, not after the whole budget was spent
        return load_dataset(args.target)

    team = Team.current()
    dataset = prepare() if team is None else team.each(prepare)
    leads = team is None or team.leads
    tuner = _tuner(args, dataset, progress=False if args.quiet or not leads else None)
    result = tuner.run()
    prints = team is None or team.leads

    def save() -> Any:
        return result.save(args.profile_dir)

    try:
        path = save() if team is None else team.on_leader(save)
    except AutotuneError:
        if prints and args.json:
            _print_json(result.to_dict())
        elif prints:
            print(result.table())
        raise
    if not prints:
        return 0
    if args.json:
        _print_json({**result.to_dict(), "profile": str(path)})
    else:
        print(result.table())
        print(f"saved key {result.key!r} to {path}")
        if isinstance(dataset, Mapping):
            print(f"use it: factory.create_training_loaders(datasets, batch_size="
                  f"{args.batch_size}, strategy={args.strategy!r}"
                  + ("" if args.weights is None else f", weights={args.weights!r}")
                  + f", profile_key={result.key!r})")
        else:
            print(f"use it: factory.create_training_loader(dataset, batch_size="
                  f"{args.batch_size}, profile_key={result.key!r})")
    if args.plot:
        from .tuning._plot import plot_trials

        plot_trials(result, args.plot)
    return 0


def _tuner(args: argparse.Namespace, dataset: Any, progress: bool | None) -> Any:
    """An ``Autotuner`` for one dataset, a ``MultiAutotuner`` for a mapping of them."""
    from .tuning.group import MultiAutotuner
    from .tuning.tuner import Autotuner

    common = dict(budget_s=args.budget_s, key=args.key, step_time_s=args.step_time_s,
                  max_workers=args.max_workers, hang_timeout_s=args.hang_timeout_s,
                  progress=progress)
    if not isinstance(dataset, Mapping):
        if args.strategy is not None or args.weights is not None:
            raise AutotuneError(f"--strategy and --weights are for several datasets; "
                                f"{args.target} returned one ({type(dataset).__name__})")
        return Autotuner(dataset, args.batch_size, **common)
    if args.strategy is None:
        raise AutotuneError(f"{args.target} returned {len(dataset)} datasets "
                            f"({', '.join(map(str, dataset))}): pass --strategy round_robin, "
                            "alternating or weighted (how the loop interleaves them) to tune "
                            "them as one loop")
    if args.plot:
        raise AutotuneError("--plot draws one dataset's trials; leave it out for several")
    return MultiAutotuner(dataset, args.batch_size, strategy=args.strategy,
                          weights=args.weights, **common)


def cmd_show(args: argparse.Namespace) -> int:
    """Which profile applies to this machine, which file it came from and why."""
    hw = probe_hardware()
    lookup = find_profile(hw, args.profile_dir)
    if lookup.path is None:
        raise AutotuneError(f"{lookup.why}; run `autotune probe --save` or `autotune tune`")
    applies = lookup.profile is not None
    profile = lookup.profile or load_profile(lookup.path)  # the host's file that did not apply
    if args.json:
        _print_json({"path": str(lookup.path), "applies": applies, "why": lookup.why,
                     "profile": None if profile is None else profile.to_dict()})
        return 0
    verdict = "applies to this machine" if applies else "does NOT apply to this machine"
    print(f"{lookup.path}: {verdict}")
    print(f"  why: {lookup.why}")
    if profile is None:
        return 0
    print(f"  updated {profile.updated}, {len(profile.loaders)} tuned loader(s)")
    for key, entry in sorted(profile.loaders.items()):
        if entry.members:
            print(f"  {key}: a group of {len(entry.members)} loaders")
        for name, settings in (entry.members or {"": entry.settings}).items():
            listed = ", ".join(f"{k}={v}" for k, v in settings.items())
            print(f"    {name}: {listed}" if name else f"  {key}: {listed}")
        if entry.measured:
            measured = ", ".join(f"{k}={_short(v)}" for k, v in entry.measured.items())
            print(f"    measured: {measured}")
    return 0


def format_hardware(hw: HardwareInfo) -> str:
    cpu, mem, dist = hw.cpu, hw.memory, hw.distributed
    quota = "none" if cpu.quota is None else f"{cpu.quota:g} CPUs"
    rows = [
        ("CPU", f"{cpu.model or 'unknown model'}: {_n(cpu.logical)} logical, "
                f"{_n(cpu.physical)} physical"),
        ("  affinity", _ranges(cpu.affinity)),
        ("  cgroup quota", quota),
        ("  usable", f"{cpu.usable} (budget per process: {hw.cpu_budget})"),
        ("Memory", f"{_gib(mem.total_bytes)} total, {_gib(mem.available_bytes)} available"),
        ("  cgroup limit", "none" if mem.limit_bytes is None else _gib(mem.limit_bytes)),
        ("/dev/shm", f"{_gib(mem.shm_total_bytes)} total, {_gib(mem.shm_free_bytes)} free"),
        ("GPUs", "none found through NVML" if not hw.gpus else ""),
        *[(f"  {g.index}", f"{g.name}, {_gib(g.memory_total_bytes)}, compute "
                           f"{g.compute_capability or '?'}, PCIe gen {_n(g.pcie_generation)} "
                           f"x{_n(g.pcie_width)}") for g in hw.gpus],
        ("Accelerator", hw.accelerator or "none (torch computes on the CPU)"),
        ("torchrun", "not under torchrun" if dist.local_world_size is None else
         f"rank {dist.rank} of {dist.world_size}, {dist.local_world_size} on this host"),
        ("Host", f"{hw.host.hostname}, {hw.host.os}, Python {hw.host.python}, "
                 f"torch {hw.host.torch or 'not installed'}"),
        ("Fingerprint", hw.fingerprint),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}".rstrip() for name, value in rows)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)


def _gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GIB:.1f} GiB"


def _short(value: Any) -> str:
    return f"{value:,.4g}" if isinstance(value, float) else str(value)


def _ranges(cpus: tuple[int, ...] | None) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    if not cpus:
        return "unknown"
    spans: list[list[int]] = []
    for cpu in cpus:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
