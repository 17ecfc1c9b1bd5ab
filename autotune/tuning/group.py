"""``MultiAutotuner``: several datasets that share one training loop, tuned as one.

Each dataset is measured, the rules' joint split (``policy.joint``) is where the search
starts, and the joint search (``policy.joint_search``) measures worker counts for all the
loaders together: each trial is the steady-state rate of the ``MultiLoader`` loop over real
loaders (``measure.trial.run_group_trial``). The result is one profile entry, under one key,
holding every loader's settings; ``factory.create_training_loaders`` applies it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from .._check import check_int, check_seconds, is_stream
from ..config import GroupConfig
from ..errors import InvalidConfigError
from ..loading.group import _named_datasets, group_config, plan_members
from ..loading.multi import check_weights
from ..loading.safety import check_stream_sharding
from ..loading.schedule import STRATEGIES
from ..measure.trial import Trial, run_group_trial
from ..measure.workload import WorkloadProfile, measure_workload
from ..policy import joint, rules
from ..policy.joint_search import JointSearch, JointSpace
from ..profiles import check_key, group_key
from ..system.distributed import current_ranks
from ..system.hardware import HardwareInfo, probe_hardware
from ._progress import Progress
from .result import MultiTuningResult
from .tuner import DEFAULT_BUDGET_S, MEASURE_SHARE, MIN_HANG_S, _batch_s, _consumer, window_for

TRIAL_SEED = 0  # every trial draws the same weighted order


class MultiAutotuner:
    """Finds the leanest fast worker split for loaders that share one loop, by measuring.

    Args:
        datasets: a mapping name -> dataset (or a list, named "0", "1", ...), as
            ``factory.create_training_loaders`` takes them.
        batch_size: samples per batch, for every loader.
        strategy: how the loop interleaves them: ``"round_robin"``, ``"alternating"`` or
            ``"weighted"`` (``MultiLoader``); ``"sequential"`` runs one loader at a time, so
            each is tuned alone (``Autotuner``).
        weights: for ``alternating`` and ``weighted``, as ``MultiLoader`` takes them.
        budget_s: seconds to spend; the run stops starting trials before it would pass.
        step_time_s: simulate a training step of this many seconds per batch: choose the
            cheapest split that keeps up instead of the fastest.
        train_step: a callable run on each ``(name, batch)`` the loop yields instead (the
            real step).
        hardware: the machine (default: ``probe_hardware()``).
        max_workers: never try more workers than this for any one loader.
        progress: a progress line on stderr (default: only when stderr is a terminal).
        key: profile key for ``result.save()`` (default: the datasets' class names joined
            by ``+``, as the factory looks it up).
        hang_timeout_s: how long one batch may take before it counts as hung.

    Example::

        result = autotune.MultiAutotuner({"images": ds_a, "text": ds_b}, batch_size=64,
                                         strategy="weighted", weights={"images": 3, "text": 1},
                                         budget_s=120).run()
        print(result.table())
        result.save()   # create_training_loaders(...) with the same datasets applies it
    """

    def __init__(self, datasets: Any, batch_size: int, *, strategy: str, weights: Any = None,
                 budget_s: float = DEFAULT_BUDGET_S, step_time_s: float | None = None,
                 train_step: Callable[[Any], Any] | None = None,
                 hardware: HardwareInfo | None = None, max_workers: int | None = None,
                 progress: bool | None = None, key: str | None = None,
                 hang_timeout_s: float | None = None) -> None:
        self.datasets = _named_datasets(datasets)
        check_int("batch_size", batch_size, minimum=1)
        check_seconds("budget_s", budget_s)
        if strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy={strategy!r} must be one of "
                                     f"{', '.join(STRATEGIES)}")
        if strategy == "sequential":
            raise InvalidConfigError("strategy='sequential' runs one loader at a time, so "
                                     "nothing is shared: tune each dataset alone with "
                                     "autotune.Autotuner")
        if len(self.datasets) < 2:
            raise InvalidConfigError("datasets= has one dataset: tune it with autotune.Autotuner")
        if step_time_s is not None:
            check_seconds("step_time_s", step_time_s, allow_zero=True)
        if step_time_s is not None and train_step is not None:
            raise InvalidConfigError("pass step_time_s or train_step, not both")
        if train_step is not None and not callable(train_step):
            raise InvalidConfigError(f"train_step={train_step!r} must be a callable(batch)")
        if hang_timeout_s is not None:
            check_seconds("hang_timeout_s", hang_timeout_s)
        if max_workers is not None:
            check_int("max_workers", max_workers, minimum=0)
        if progress is not None and not isinstance(progress, bool):
            raise InvalidConfigError(f"progress={progress!r} must be True, False or None")
        if current_ranks().world_size > 1:
            raise InvalidConfigError("MultiAutotuner tunes in one process: run it without "
                                     "torchrun (each rank's share of the machine is then "
                                     "yours to divide; see the README)")
        self.names = list(self.datasets)
        self.shares = joint.batch_shares(strategy, check_weights(weights, self.names, strategy))
        self.batch_size = batch_size
        self.strategy, self.weights = strategy, weights
        self.budget_s = float(budget_s)
        self.hardware = hardware or probe_hardware()
        self.max_workers = max_workers
        self.hang_timeout_s = hang_timeout_s
        self.key = check_key(key) if key is not None else group_key(self.datasets)
        self.step_time_s = step_time_s
        self.consumer = _consumer(step_time_s, train_step)
        self.objective = ("lean throughput" if self.consumer is None else
                          f"no stall with a {step_time_s * 1e3:g} ms step"
                          if step_time_s is not None else "no stall with train_step")
        self.progress = Progress(sys.stderr.isatty() if progress is None else progress,
                                 self.budget_s)

    def run(self) -> MultiTuningResult:
        """Measure each dataset, search the joint split, confirm; returns the chosen split,
        the fastest and every trial."""
        start = time.perf_counter()
        workloads = {name: self._workload(dataset) for name, dataset in self.datasets.items()}
        members = plan_members(
            self.hardware, self.datasets, self.shares, workloads,
            lambda size, stream: rules.DatasetHints(dataset_size=size,
                                                    batch_size=self.batch_size, stream=stream))
        caps = {m.name: rules.max_workers(self.hardware, m.hints, m.workload) for m in members}
        if self.max_workers is not None:
            caps = {name: min(cap, self.max_workers) for name, cap in caps.items()}
        splits = joint.split_workers(self.hardware, members)
        batch_s = max(_batch_s(w, self.batch_size) for w in workloads.values())
        hang_s = self.hang_timeout_s or max(MIN_HANG_S, 20 * batch_s)

        def configure(counts: Any) -> GroupConfig:
            return group_config(self.hardware, members, counts, self.strategy,
                                "tried by the joint search")

        def measure(config: GroupConfig, phase: str) -> Trial:
            self.progress.show(len(trials) + 1, phase, config, time.perf_counter() - start)
            window = max(window_for(workloads[name], self.batch_size, member.num_workers,
                                    cpus=self.hardware.cpu_budget, budget_s=self.budget_s,
                                    step_s=self.step_time_s or 0.0)
                         for name, member in config.members.items())
            trial = run_group_trial(self.datasets, self.batch_size, config,
                                    strategy=self.strategy, weights=self.weights,
                                    seed=TRIAL_SEED, phase=phase, window_s=window,
                                    hang_s=hang_s, consumer=self.consumer)
            trials.append(trial)
            self.progress.result(trial)
            return trial

        trials: list[Trial] = []
        space = JointSpace(configure=configure, caps=caps,
                           start={n: min(s.workers, caps[n]) for n, s in splits.items()},
                           alone={m.name: min(m.alone, caps[m.name]) for m in members})
        left = self.budget_s - (time.perf_counter() - start)
        try:
            outcome = JointSearch(measure, space, budget_s=left,
                                  keep_up=self.consumer is not None).run()
        finally:
            self.progress.done()
        chosen, fastest = outcome.chosen, outcome.fastest
        best = GroupConfig(members={
            name: config.replace(source="tuned", reason=outcome.why, **config.settings())
            for name, config in chosen.config.members.items()})
        return MultiTuningResult(
            best=best, best_samples_per_s=chosen.samples_per_s,
            best_memory_bytes=chosen.peak_memory_bytes,
            fastest=fastest.config, fastest_samples_per_s=fastest.samples_per_s,
            fastest_memory_bytes=fastest.peak_memory_bytes, noise=outcome.noise,
            baseline_samples_per_s=outcome.baseline.samples_per_s
            if outcome.baseline.ok else None,
            trials=outcome.trials, elapsed_s=time.perf_counter() - start,
            batch_size=self.batch_size, key=self.key, objective=self.objective,
            strategy=self.strategy,
            shares={name: round(share, 3) for name, share in zip(self.names, self.shares)},
            workloads=workloads, hardware=self.hardware)

    def _workload(self, dataset: Any) -> WorkloadProfile:
        seconds = min(1.0, self.budget_s / MEASURE_SHARE / len(self.datasets))
        measuring: dict[str, Any] = {"max_seconds": seconds}
        if self.hang_timeout_s is not None:
            measuring["sample_timeout_s"] = self.hang_timeout_s
        workload = measure_workload(dataset, **measuring)
        if is_stream(dataset) and (self.max_workers is None or self.max_workers > 1):
            check_stream_sharding(dataset)  # else more workers would count duplicates
        return workload

