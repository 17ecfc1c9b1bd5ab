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

from .._check import check_int, dataset_size
from ..config import GroupConfig, LoaderConfig
from ..errors import InvalidConfigError
from ..factory.group import group_config, named_datasets, plan_members
from ..feed.multi import check_weights
from ..feed.schedule import STRATEGIES
from ..policy import joint, rules
from ..policy.joint_search import JointSearch, JointSpace
from ..profiles import check_key, group_key
from ..records import HardwareInfo, Trial
from ..system.distributed import current_ranks
from ..system.hardware import probe_hardware
from ._progress import Progress
from .result import MultiTuningResult, measured_fields
from .trial import run_group_trial
from .tuner import (DEFAULT_BUDGET_S, MEASURE_SHARE, MIN_HANG_S, batch_seconds, check_tuning,
                    consumer_for, measure_for_tuning, objective, window_for)

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
        self.datasets = named_datasets(datasets)
        check_int("batch_size", batch_size, minimum=1)
        check_tuning(budget_s=budget_s, step_time_s=step_time_s, train_step=train_step,
                     hang_timeout_s=hang_timeout_s, max_workers=max_workers, progress=progress)
        if strategy not in STRATEGIES:
            raise InvalidConfigError(f"strategy={strategy!r} must be one of "
                                     f"{', '.join(STRATEGIES)}")
        if strategy == "sequential":
            raise InvalidConfigError("strategy='sequential' runs one loader at a time, so "
                                     "nothing is shared: tune each dataset alone with "
                                     "autotune.Autotuner")
        if len(self.datasets) < 2:
            raise InvalidConfigError("datasets= has one dataset: tune it with autotune.Autotuner")
        if current_ranks().world_size > 1:
            raise InvalidConfigError("MultiAutotuner tunes in one process: run it without "
                                     "torchrun (each rank's share of the machine is then "
                                     "yours to divide; see docs/several-loaders.md)")
        for name, dataset in self.datasets.items():  # an empty one fails now, not later
            try:
                dataset_size(dataset, who="MultiAutotuner")
            except InvalidConfigError as exc:
                raise InvalidConfigError(f"datasets[{name!r}]: {exc}") from None
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
        self.consumer = consumer_for(step_time_s, train_step)
        self.objective = objective(step_time_s, self.consumer)
        self.progress = Progress(sys.stderr.isatty() if progress is None else progress,
                                 self.budget_s)

    def run(self) -> MultiTuningResult:
        """Measure each dataset, search the joint split, confirm; returns the chosen split,
        the fastest and every trial."""
        start = time.perf_counter()
        seconds = min(1.0, self.budget_s / MEASURE_SHARE / len(self.datasets))
        workloads = {name: measure_for_tuning(dataset, seconds,
                                              hang_timeout_s=self.hang_timeout_s,
                                              max_workers=self.max_workers)
                     for name, dataset in self.datasets.items()}
        members = plan_members(
            self.hardware, self.datasets, self.shares, workloads,
            lambda size, stream: rules.DatasetHints(dataset_size=size,
                                                    batch_size=self.batch_size, stream=stream),
            who="MultiAutotuner")
        caps = {m.name: rules.max_workers(self.hardware, m.hints, m.workload) for m in members}
        if self.max_workers is not None:
            caps = {name: min(cap, self.max_workers) for name, cap in caps.items()}
        splits = joint.split_workers(self.hardware, members)
        batch_s = max(batch_seconds(w, self.batch_size) for w in workloads.values())
        hang_s = self.hang_timeout_s or max(MIN_HANG_S, 20 * batch_s)

        def configure(counts: Any) -> GroupConfig:
            return group_config(self.hardware, members, counts, self.strategy,
                                "tried by the joint search")

        def measure(config: LoaderConfig | GroupConfig, phase: str) -> Trial:
            assert isinstance(config, GroupConfig)  # the joint search of the group
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
        chosen = outcome.chosen.config
        assert isinstance(chosen, GroupConfig)
        best = GroupConfig(members={
            name: config.replace(source="tuned", reason=outcome.why, **config.settings())
            for name, config in chosen.members.items()})
        return MultiTuningResult(
            best=best, **measured_fields(outcome, start), batch_size=self.batch_size,
            key=self.key, objective=self.objective,
            strategy=self.strategy,
            shares={name: round(share, 3) for name, share in zip(self.names, self.shares)},
            workloads=workloads, hardware=self.hardware)
