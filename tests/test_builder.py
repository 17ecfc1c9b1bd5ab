"""The one builder: factory loaders and tuning trials are the same loader, and both release
their worker processes when told to, not when the garbage collector gets to them."""

from __future__ import annotations

import gc
import time
from multiprocessing import forkserver, resource_tracker

import psutil
import pytest

from autotune import (AutotuneError, LoaderConfig, MultiLoader, OptimalDataLoaderFactory,
                      TunedDataLoader)
from autotune.loading.builder import build_loader
from autotune.tuning.trial import run_trial

from datasets import FailsAt, Indexed, KillsWorker


_BEFORE: set[int] = set()  # the processes alive when the current test began


@pytest.fixture(autouse=True)
def only_this_tests_processes():
    """What a test counts are the processes it started: an earlier test's leftovers (another
    file's, in the same pytest-xdist process) are not its own."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))
    yield


def workers_alive() -> list[psutil.Process]:
    """The live processes this test started, but multiprocessing's own helpers (the
    forkserver and the resource tracker), which stay once started; the workers the
    forkserver forks are counted."""
    helpers = {_helper_pid(forkserver._forkserver, "_forkserver_pid"),
               _helper_pid(resource_tracker._resource_tracker, "_pid")}
    alive = []
    for process in psutil.Process().children(recursive=True):
        try:
            if (process.pid in helpers or process.pid in _BEFORE
                    or process.status() == psutil.STATUS_ZOMBIE):
                continue
        except psutil.NoSuchProcess:
            continue
        alive.append(process)
    return alive


def _helper_pid(helper: object, attribute: str) -> int | None:
    return getattr(helper, attribute, None)


def wait_for_no_workers(seconds: float = 5.0) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (alive := workers_alive()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.fixture
def no_gc():
    """The garbage collector off: only deterministic release may stop workers."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()
    gc.collect()


PERSISTENT = LoaderConfig(num_workers=2, persistent_workers=True)


def test_close_stops_persistent_workers_at_once(no_gc):
    loader = build_loader(Indexed(64), 8, PERSISTENT, shuffle=True)
    assert sorted(int(i) for b in loader for i in b.flatten()) == list(range(64))
    assert len(workers_alive()) == 2  # persistent: held between epochs
    loader.close()
    assert workers_alive() == []
    assert sorted(int(i) for b in loader for i in b.flatten()) == list(range(64))  # reusable
    loader.close()
    loader.close()  # idempotent


def test_with_block_closes_a_loader_left_mid_epoch(no_gc):
    with build_loader(Indexed(64), 8, LoaderConfig(num_workers=2), shuffle=False) as loader:
        iterator = iter(loader)
        next(iterator)
        assert len(workers_alive()) == 2
    assert workers_alive() == []
    del iterator


def test_recreating_loaders_in_a_loop_does_not_pile_up_processes(no_gc):
    factory = OptimalDataLoaderFactory(measure=False)
    kept = []  # what a training script keeps around (logs, references in closures)
    for _ in range(6):
        with factory.create_training_loader(Indexed(64), batch_size=8, num_workers=2,
                                            persistent_workers=True) as loader:
            next(iter(loader))
        kept.append(loader)
    assert workers_alive() == []


def test_without_close_the_workers_outlive_the_loop(no_gc):
    # The failure the lifecycle prevents: references kept, workers kept (2 per loader).
    factory = OptimalDataLoaderFactory(measure=False)
    kept = []
    for _ in range(3):
        loader = factory.create_training_loader(Indexed(64), batch_size=8, num_workers=2,
                                                persistent_workers=True)
        next(iter(loader))
        kept.append(loader)
    assert len(workers_alive()) == 6
    for loader in kept:
        loader.close()
    assert workers_alive() == []


def test_wrappers_dropped_without_close_stop_their_workers_at_once(no_gc):
    # an AdaptiveLoader or a MultiLoader, left mid-epoch and dropped: no cycle keeps it
    factory = OptimalDataLoaderFactory(measure=False)
    adaptive = factory.create_training_loader(Indexed(64), batch_size=4, num_workers=2,
                                              adapt=True)
    multi = MultiLoader({"a": factory.create_training_loader(Indexed(64), batch_size=4,
                                                             num_workers=1)})
    for wrapper in (adaptive, multi):
        for i, _batch in enumerate(wrapper):
            if i == 2:
                break
    assert len(workers_alive()) == 3
    monitor = adaptive.monitor
    del adaptive, multi, wrapper, _batch
    assert wait_for_no_workers() == []
    with pytest.raises(AutotuneError, match="keep the loader and iterate it"):
        iter(monitor)


def test_a_trial_releases_its_workers_even_when_the_dataset_fails(no_gc):
    trial = run_trial(FailsAt(20, 256), 8, LoaderConfig(num_workers=2, persistent_workers=True),
                      phase="test", window_s=0.5, hang_s=10)
    assert not trial.ok and "ValueError" in trial.error
    assert wait_for_no_workers() == []


def test_trials_measure_the_factory_loader():
    # A worker killed in a trial is named by the builder's crash naming, as in a user's loader.
    trial = run_trial(KillsWorker(64), 8, LoaderConfig(num_workers=2, persistent_workers=True),
                      phase="test", window_s=0.5, hang_s=10)
    assert trial.error.startswith("WorkerCrashError: DataLoader worker")
    loader = OptimalDataLoaderFactory(measure=False).create_training_loader(
        Indexed(8), batch_size=2, num_workers=1)
    assert isinstance(loader, TunedDataLoader)
    assert type(loader.dataset).__name__ == "NamedErrors"


def test_closing_a_loader_mid_epoch_says_so_instead_of_ending_the_epoch(no_gc):
    loader = build_loader(Indexed(64), 8, PERSISTENT, shuffle=False)
    iterator = iter(loader)
    next(iterator)
    loader.close()
    with pytest.raises(AutotuneError, match=r"closed .* iter\(loader\)"):
        next(iterator)
    assert len(list(loader)) == 8  # a new epoch, fresh workers
    loader.close()


def test_a_trial_whose_step_exits_is_a_failed_trial():
    def step(batch):
        raise SystemExit(3)

    trial = run_trial(Indexed(64), 8, LoaderConfig(), phase="test", window_s=0.2, hang_s=5,
                      consumer=step)
    assert not trial.ok and trial.error.startswith("SystemExit")
