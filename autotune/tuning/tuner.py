"""The autotuner: measure candidate settings on the real dataset and keep the lean winner.

It measures a few samples (``measure_workload``), asks the rules where to start, and runs
the search (``policy.search``) with real steady-state trials (``measure.trial``) built by
the same builder as the factory's loaders. Choosing is the search's job, measuring the
trial's, saving the result's; this module wires them to one dataset and one time budget.
Under torchrun (a process group of several ranks) every rank measures each trial at once and
rank 0 decides (``tuning.ranks``).

With a consumer (``step_time_s`` or ``train_step``) the goal is no input stall: among the
settings that keep up, the cheapest (fewest workers, then least memory) wins. Without one,
the leanest setting within measurement noise of the fastest wins.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

from .._check import check_int, check_seconds, dataset_size, is_stream
from ..config import GroupConfig, LoaderConfig
from ..errors import InvalidConfigError
from ..loading.safety import check_stream_sharding
from ..measure.workload import measure_workload
from ..policy import rules
from ..policy.resolve import resolve
from ..policy.search import Search, SearchSpace
from ..profiles import check_key, dataset_key
from ..records import HardwareInfo, Trial, WorkloadProfile
from ..sources.images import image_folder_in
from ..system.distributed import current_ranks
from ..system.hardware import probe_hardware
from ._progress import Progress
from .ranks import RankTrial, Team
from .result import TuningResult, measured_fields
from .trial import CONSUMER_STEPS, ROUNDS, run_trial

DEFAULT_BUDGET_S = 60.0
MIN_WINDOW_S, MAX_WINDOW_S = 0.5, 3.0
WINDOWS_PER_BUDGET = 30  # a trial's base measuring window is about budget_s / this
MIN_HANG_S = 10.0  # a batch slower than this (or 20x the measured batch time) is a hang
MEASURE_SHARE = 10  # the quick workload measurement takes at most budget_s / this


class Autotuner:
    """Finds the leanest fast DataLoader settings for ``dataset`` on this machine by measuring.

    Args:
        dataset: a map-style dataset (``__len__`` and ``__getitem__``) or an
            ``IterableDataset`` that splits its items by worker (trials run across the
            stream's own epochs).
        batch_size: samples per batch, as training will use it.
        budget_s: seconds to spend; the run stops starting trials before it would pass.
        collate_fn: the ``collate_fn`` training will use, if not torch's default (an
            ``ImageFolder`` forced to ``placement="device"`` packs its batches with its own
            ``collate``: trials time the workers' part, and ``train_step`` gets its
            ``EncodedImages`` batches, for ``dataset.device_transform(device)`` to finish).
        step_time_s: simulate a training step of this many seconds per batch: choose the
            cheapest setting that keeps up instead of the fastest.
        train_step: a callable run on each batch instead (the real step).
        hardware: the machine (default: ``probe_hardware()``).
        max_workers: never try more workers than this.
        progress: a progress line on stderr (default: only when stderr is a terminal).
        key: profile key for ``result.save()`` (default: the dataset's class name).
        hang_timeout_s: how long one batch, or one sample while measuring, may take before
            it counts as hung (default: 20 times the measured batch time, at least 10 s;
            while measuring samples, 30 s).

    Example::

        result = autotune.Autotuner(dataset, batch_size=64, budget_s=60).run()
        print(result.table())
        result.save(key="my-dataset")
    """

    def __init__(self, dataset: Any, batch_size: int, *, budget_s: float = DEFAULT_BUDGET_S,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 step_time_s: float | None = None,
                 train_step: Callable[[Any], Any] | None = None,
                 hardware: HardwareInfo | None = None, max_workers: int | None = None,
                 progress: bool | None = None, key: str | None = None,
                 hang_timeout_s: float | None = None) -> None:
        check_int("batch_size", batch_size, minimum=1)
        check_tuning(budget_s=budget_s, step_time_s=step_time_s, train_step=train_step,
                     hang_timeout_s=hang_timeout_s, max_workers=max_workers, progress=progress)
        self.dataset = dataset
        self.size = dataset_size(dataset, who="the autotuner")
        self.batch_size = batch_size
        self.budget_s = float(budget_s)
        images = image_folder_in(dataset)
        if collate_fn is None and images is not None and images.in_effect.where != "cpu":
            collate_fn = images.collate  # its samples are bytes and crop boxes
        self.collate_fn = collate_fn
        self.hardware = hardware or probe_hardware()
        self.max_workers = max_workers
        self.hang_timeout_s = hang_timeout_s
        self.key = check_key(key) if key is not None else dataset_key(dataset)
        self.step_time_s = step_time_s
        self.consumer = consumer_for(step_time_s, train_step)
        self.objective = objective(step_time_s, self.consumer)
        self.progress = Progress(sys.stderr.isatty() if progress is None else progress,
                                 self.budget_s)
        # a stream's samples per epoch (if known) and the most drawn without an epoch end,
        # for trials to judge whether whole epochs fit (measure.trial._WholeEpochs)
        self._epoch: tuple[int | None, int] = (self.size, 0)

    def run(self) -> TuningResult:
        """Measure, search, confirm; returns the chosen setting, the fastest and every trial.

        Inside a process group of several ranks (torchrun), every rank must call ``run()``
        with the same arguments: each trial runs on all ranks at once, rank 0 searches on
        the slowest rank's samples/s and the node's memory, and every rank returns rank 0's
        result (``tuning.ranks``). A rank's failure raises ``AutotuneError`` on every rank,
        naming it. Alone, or without a process group, it tunes this process alone.
        """
        start = time.perf_counter()
        team = Team.current(self.hardware.host.hostname)
        if team is None:
            return self._search(self._workload(), start, None)
        workload = team.from_leader(team.each(self._workload))  # windows agree on all ranks
        if not team.leads:
            followed: TuningResult = team.follow(self._trial)  # rank 0's result
            return followed
        try:
            result = self._search(workload, start, team)
        except Exception as exc:
            team.abort(exc)
            raise
        return team.finish(result)

    def _workload(self) -> WorkloadProfile:
        return measure_for_tuning(self.dataset, min(1.0, self.budget_s / MEASURE_SHARE),
                                  hang_timeout_s=self.hang_timeout_s,
                                  max_workers=self.max_workers, collate_fn=self.collate_fn)

    def _trial(self, config: LoaderConfig, phase: str, window_s: float,
               hang_s: float) -> Trial:
        trial = run_trial(self.dataset, self.batch_size, config, phase=phase,
                          window_s=window_s, hang_s=hang_s, collate_fn=self.collate_fn,
                          consumer=self.consumer, epoch=self._epoch)
        epoch, at_least = self._epoch  # a stream's epochs, as trials saw them
        if trial.epoch_samples:
            epoch = trial.epoch_samples
        elif trial.samples_drawn:
            at_least = max(at_least, trial.samples_drawn)
        self._epoch = (epoch, at_least)
        return trial

    def _search(self, workload: WorkloadProfile, start: float,
                team: Team | None) -> TuningResult:
        hints = rules.DatasetHints(dataset_size=self.size, batch_size=self.batch_size,
                                   stream=is_stream(self.dataset))
        cap = rules.max_workers(self.hardware, hints, workload)
        if self.max_workers is not None:
            cap = min(cap, self.max_workers)
        batch_s = batch_seconds(workload, self.batch_size)
        hang_s = self.hang_timeout_s or max(MIN_HANG_S, 20 * batch_s)
        ruled = resolve(self.hardware, hints, workload)
        ladder_start = ruled.num_workers
        if self.step_time_s:  # enough workers to hand over one batch per step, with margin
            ladder_start = math.ceil(1.2 * batch_s / self.step_time_s)

        def configure(workers: int) -> LoaderConfig:
            return resolve(self.hardware, hints, workload, workers=workers)

        def measure(config: LoaderConfig | GroupConfig, phase: str) -> Trial:
            assert isinstance(config, LoaderConfig)  # the search of one loader
            number = len(trials) + 1
            self.progress.show(number, phase, config, time.perf_counter() - start)
            window = window_for(workload, self.batch_size, config.num_workers,
                                cpus=self.hardware.cpu_budget, budget_s=self.budget_s,
                                step_s=self.step_time_s or 0.0)
            if team is None:
                trial = self._trial(config, phase, window, hang_s)
            else:  # every rank at once
                trial, each_rank = team.measure(config, phase, window, hang_s, self._trial)
                ranks_of[id(trial)] = each_rank
            trials.append(trial)
            self.progress.result(trial)
            return trial

        trials: list[Trial] = []
        ranks_of: dict[int, tuple[RankTrial, ...]] = {}
        space = SearchSpace(
            configure=configure, cap=cap, rules_workers=min(ruled.num_workers, cap),
            start=ladder_start, cpu_budget=self.hardware.cpu_budget,
            native_threads=workload.parallelism > rules.PARALLEL_THRESHOLD,
            cuda=self.hardware.accelerator == "cuda")
        left = self.budget_s - (time.perf_counter() - start)
        try:
            outcome = Search(measure, space, budget_s=left,
                             keep_up=self.consumer is not None).run()
        finally:
            self.progress.done()
        chosen = outcome.chosen.config
        assert isinstance(chosen, LoaderConfig)
        best = chosen.replace(source="tuned", reason=outcome.why, **chosen.settings())
        return TuningResult(
            best=best, **measured_fields(outcome, start), batch_size=self.batch_size,
            key=self.key, objective=self.objective,
            workload=workload, hardware=self.hardware,
            local_world_size=current_ranks().local_world_size,
            rank_trials=tuple(ranks_of[id(t)] for t in outcome.trials) if team else ())


def window_for(workload: WorkloadProfile, batch_size: int, workers: int, *, cpus: int,
               budget_s: float = DEFAULT_BUDGET_S, step_s: float = 0.0) -> float:
    """The trial window for ``workers`` on this workload (``trial_window_s``'s inputs)."""
    batch_s = batch_seconds(workload, batch_size)
    batch_cpu_s = batch_size * (
        (workload.cpu_sec_per_sample if workload.single_thread_cpu_sec_per_sample is None
         else workload.single_thread_cpu_sec_per_sample)
        + (workload.collate_sec_per_sample or 0.0))
    return trial_window_s(budget_s, batch_s, step_s, workers=workers, batch_cpu_s=batch_cpu_s,
                          cpus=cpus)


def batch_seconds(workload: WorkloadProfile, batch_size: int) -> float:
    """Wall seconds one worker takes to make a batch (the slower of the two passes)."""
    return batch_size * max(workload.sec_per_sample,
                            workload.single_thread_sec_per_sample or 0.0)


def trial_window_s(budget_s: float, batch_s: float, step_s: float = 0.0, *, workers: int = 0,
                   batch_cpu_s: float = 0.0, cpus: int = 1) -> float:
    """How long one trial counts samples.

    A share of the budget, several batches, enough training steps that one slow batch does
    not decide whether a setting keeps up, and ``ROUNDS`` rounds of the workers: with more
    workers than CPUs a round (one batch from each) takes workers x batch CPU time / CPUs,
    and its batches arrive in a burst that a shorter window would count as the rate.
    """
    base = min(max(MIN_WINDOW_S, budget_s / WINDOWS_PER_BUDGET, 3 * batch_s,
                   CONSUMER_STEPS * step_s),
               max(MAX_WINDOW_S, budget_s / 6))
    round_s = max(batch_s, workers * batch_cpu_s / max(1, cpus)) if workers else 0.0
    return max(base, min(ROUNDS * round_s, max(MAX_WINDOW_S, budget_s / 4)))


def measure_for_tuning(dataset: Any, max_seconds: float, *, hang_timeout_s: float | None,
                       max_workers: int | None,
                       collate_fn: Callable[[list[Any]], Any] | None = None) -> WorkloadProfile:
    """The quick measurement a tuner starts from; a stream must split by worker first, else
    more workers would count duplicates."""
    measuring: dict[str, Any] = {"max_seconds": max_seconds}
    if hang_timeout_s is not None:
        measuring["sample_timeout_s"] = hang_timeout_s
    workload = measure_workload(dataset, collate_fn=collate_fn, **measuring)
    if is_stream(dataset) and (max_workers is None or max_workers > 1):
        check_stream_sharding(dataset)
    return workload


def check_tuning(*, budget_s: Any, step_time_s: Any, train_step: Any, hang_timeout_s: Any,
                 max_workers: Any, progress: Any) -> None:
    """The arguments every tuner takes, each checked with a clear error."""
    check_seconds("budget_s", budget_s)
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


def objective(step_time_s: float | None, consumer: Callable[[Any], None] | None) -> str:
    """What the choice optimises, in words."""
    if consumer is None:
        return "lean throughput"
    if step_time_s is not None:
        return f"no stall with a {step_time_s * 1e3:g} ms step"
    return "no stall with train_step"


def consumer_for(step_time_s: float | None,
                 train_step: Callable[[Any], Any] | None) -> Callable[[Any], None] | None:
    """What a trial feeds its batches to: the real step, a sleep as long as the step, or
    nothing (the loader alone)."""
    if train_step is not None:
        return train_step
    if step_time_s is not None:
        return lambda batch: time.sleep(step_time_s)
    return None

