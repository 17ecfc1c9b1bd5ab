"""Worker safety: pickling under spawn, per-worker randomness, wrappers, shm, copy-on-read
and workers that die.

Each protection is shown against the failure it prevents.
"""

from __future__ import annotations

import functools
import multiprocessing
import pickle
import re
import shlex
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from autotune import (AugmentedDataset, AutotuneError, DatasetHints, OptimalDataLoaderFactory,
                      StandardizedDataset, WorkerCrashError, WorkerSafetyError, WorkloadProfile,
                      check_worker_safety, compute_stats, copy_on_read_risks)
from autotune.factory import pipeline as factory_module
from autotune.policy import rules
from autotune.loading.crash import explain_crash

from datasets import (ArrayBacked, DiesInWorker, FailsAt, GcInWorker, Indexed, ManyPaths,
                      NaiveAugmented, Pairs, RandomDraws, WithLambda, add_noise)
from fakes import fake_hardware

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


# -- pickling under spawn / forkserver ------------------------------------------------------

def test_lambda_is_named_by_its_path():
    with pytest.raises(WorkerSafetyError) as err:
        check_worker_safety(WithLambda(), context="spawn")
    assert err.value.path == "dataset.transform.fn"
    assert "is a lambda" in str(err.value) and "'spawn'" in str(err.value)
    check_worker_safety(WithLambda(), context="fork")  # fork pickles nothing


def test_local_function_and_partial_are_named():
    def local_collate(batch):
        return batch

    with pytest.raises(WorkerSafetyError, match=r"collate_fn is a function defined inside"):
        check_worker_safety(Indexed(4), collate_fn=local_collate, context="forkserver")
    with pytest.raises(WorkerSafetyError) as err:
        check_worker_safety(Indexed(4), worker_init_fn=functools.partial(lambda w, k: None,
                                                                         k=1), context="spawn")
    assert err.value.path == "worker_init_fn.func"


class Holder(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data


class Unpicklable(torch.Tensor):
    def __reduce_ex__(self, protocol):
        raise TypeError("no")


def test_arrays_are_not_copied_to_check_them_but_object_arrays_are_looked_into():
    # a tensor is taken as picklable, not copied to check (a preloaded dataset's gigabytes)
    check_worker_safety(Holder(torch.zeros(4).as_subclass(Unpicklable)), context="spawn")
    with pytest.raises(WorkerSafetyError) as err:
        check_worker_safety(Holder(np.array([lambda: 0], dtype=object)), context="spawn")
    assert err.value.path.startswith("dataset.data")


@pytest.mark.filterwarnings("ignore:Got pickle error")  # torch's, from the plain loader
def test_without_the_check_spawn_fails_obscurely_with_the_check_clearly():
    plain = DataLoader(WithLambda(), batch_size=2, num_workers=1,
                       multiprocessing_context="spawn")
    with pytest.raises(Exception) as raw:
        next(iter(plain))
    assert "dataset.transform.fn" not in str(raw.value)  # torch cannot say where
    factory = OptimalDataLoaderFactory(measure=False)
    with pytest.raises(WorkerSafetyError, match=r"dataset\.transform\.fn is a lambda"):
        factory.create_training_loader(WithLambda(), batch_size=2, num_workers=1,
                                       multiprocessing_context="spawn")


# -- per-worker randomness ----------------------------------------------------------------------

def _epochs(dataset, *, seed: int, workers: int, context: str | None = None, epochs: int = 2):
    factory = OptimalDataLoaderFactory(measure=False, seed=seed)
    with factory.create_training_loader(dataset, batch_size=4, num_workers=workers,
                                        persistent_workers=True,
                                        multiprocessing_context=context) as loader:
        # closed here: 8 persistent workers are not left to the garbage collector
        return [torch.cat([x for x, _ in loader]) for _ in range(epochs)]


def _noise_by_sample(epoch: torch.Tensor) -> torch.Tensor:
    return epoch - epoch.round()  # inputs are whole numbers; what is left is the noise


def test_shared_generator_repeats_across_workers_without_the_wrapper():
    naive = _epochs(NaiveAugmented(Pairs(32)), seed=1, workers=8, epochs=1)[0]
    noise = _noise_by_sample(naive).flatten(1)
    assert len({tuple(row[:3].tolist()) for row in noise}) < len(noise)  # workers repeat draws


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_augmented_dataset_differs_across_workers_and_epochs_and_reproduces(context):
    dataset = AugmentedDataset(Pairs(32), add_noise)
    first = _epochs(dataset, seed=3, workers=8, context=context)
    again = _epochs(dataset, seed=3, workers=8, context=context)
    noise = _noise_by_sample(first[0]).flatten(1)
    assert len({tuple(row[:3].tolist()) for row in noise}) == len(noise)  # all distinct
    assert not torch.equal(first[0], first[1])  # epochs differ
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # same seed, same batches


def test_augmentation_off_for_evaluation_and_wrappers_pickle():
    plain = AugmentedDataset(Pairs(4), add_noise, training=False)
    assert torch.equal(plain[2][0], Pairs(4)[2][0])
    for dataset in (AugmentedDataset(Pairs(4), add_noise), StandardizedDataset(Pairs(4), 1.0, 2.0)):
        assert len(pickle.loads(pickle.dumps(dataset))) == 4


# -- standardization ----------------------------------------------------------------------------

def test_compute_stats_in_chunks_matches_one_pass():
    data = Pairs(50)
    every = torch.stack([data[i][0] for i in range(50)]).double()
    mean, std = compute_stats(data, chunk_size=7)
    assert mean == pytest.approx(every.mean().item()) and std == pytest.approx(every.std().item())
    per_channel = compute_stats(data, chunk_size=9, channel_dim=0)
    assert per_channel[0].shape == (3,)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_standardized_dataset_with_8_workers(context):
    data = Pairs(64)
    mean, std = compute_stats(data)
    dataset = StandardizedDataset(data, mean, std)
    loader = OptimalDataLoaderFactory(measure=False).create_validation_loader(
        dataset, batch_size=8, num_workers=8, multiprocessing_context=context)
    values = torch.cat([x for x, _ in loader])
    assert values.mean().item() == pytest.approx(0, abs=1e-5)
    assert values.std().item() == pytest.approx(1, abs=1e-3)


# -- /dev/shm -----------------------------------------------------------------------------------

BIG = WorkloadProfile(samples=8, sec_per_sample=0.005, cpu_sec_per_sample=0.0001,
                      sample_bytes=1 << 20, single_thread_sec_per_sample=0.005,
                      single_thread_cpu_sec_per_sample=0.0001)


def test_small_shm_lowers_settings_and_warns_with_the_fix():
    hints = DatasetHints(dataset_size=10_000, batch_size=16)
    small = fake_hardware(cpus=2, shm_free_bytes=64 << 20)
    config = rules.recommend(small, hints, BIG)
    assert config.num_workers * (config.prefetch_factor or 0) * 16 * (1 << 20) <= 32 << 20
    assert rules.recommend(fake_hardware(cpus=2), hints, BIG).num_workers > config.num_workers
    message = rules.shm_warning(small, hints, BIG)
    assert "--shm-size" in message and "--ipc=host" in message
    assert rules.shm_warning(fake_hardware(cpus=2), hints, BIG) is None


def test_batch_larger_than_shm_means_no_workers():
    hints = DatasetHints(dataset_size=10_000, batch_size=64)
    config = rules.recommend(fake_hardware(cpus=2, shm_free_bytes=64 << 20), hints, BIG)
    assert config.num_workers == 0 and "bus error" in config.reasons["num_workers"]


def test_factory_warns_once_about_small_shm(monkeypatch):
    monkeypatch.setattr(factory_module, "_warned", set())
    factory = OptimalDataLoaderFactory(hardware=fake_hardware(cpus=2, shm_free_bytes=64 << 20))
    with pytest.warns(UserWarning, match="--shm-size") as caught:
        for _ in range(3):
            factory.create_training_loader(Indexed(10_000), batch_size=16, workload=BIG)
    assert sum("--shm-size" in str(w.message) for w in caught) == 1


# -- copy-on-read -------------------------------------------------------------------------------

def test_copy_on_read_risk_is_found_and_warned(monkeypatch):
    risks = copy_on_read_risks(ManyPaths())
    assert len(risks) == 1 and risks[0].startswith("dataset.paths is a list of 600,000")
    assert copy_on_read_risks(ArrayBacked()) == []
    assert copy_on_read_risks(torch.utils.data.Subset(Indexed(50_000), range(50_000))) == []
    monkeypatch.setattr(factory_module, "_warned", set())
    factory = OptimalDataLoaderFactory(measure=False)
    with pytest.warns(UserWarning, match="numpy array"):
        factory.create_training_loader(ManyPaths(), batch_size=64, num_workers=1)


def _in_small_shm(mode: str) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).with_name("shm_script.py")
    command = (f"mount -t tmpfs -o size=64m tmpfs /dev/shm && "
               f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {mode}")
    return subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True,
                          text=True, timeout=240)


def test_real_64mb_shm_plain_loader_dies_factory_loader_completes():
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
            capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace (unshare -m, root) for a real small /dev/shm")
    plain = _in_small_shm("plain")
    assert plain.returncode != 0
    assert "shared memory" in plain.stderr or "Bus error" in plain.stderr
    tuned = _in_small_shm("factory")
    assert tuned.returncode == 0, tuned.stderr
    assert "completed 96" in tuned.stdout


def _worker_uss(loader) -> list[int]:
    import psutil

    return [psutil.Process(w.pid).memory_full_info().uss for w in loader._iterator._workers]


def test_soak_many_epochs_persistent_workers_bounded_memory():
    """30 epochs through persistent workers: worker memory settles after the first epochs."""
    loader = OptimalDataLoaderFactory(measure=False, seed=0).create_training_loader(
        ArrayBacked(30_000), batch_size=500, num_workers=2)
    readings = []
    for epoch in range(30):
        for _ in loader:
            pass
        if epoch in (2, 29):
            readings.append(_worker_uss(loader))
    growth = [late - early for early, late in zip(*readings)]
    assert max(growth) < 8 << 20, f"worker memory grew by {[g >> 20 for g in growth]} MiB"


@pytest.mark.filterwarnings("ignore:dataset.paths")
def test_copy_on_read_is_real_for_python_lists():
    """What the warning is about: workers copy the pages of a list of strings they read."""
    lists = OptimalDataLoaderFactory(measure=False).create_training_loader(
        ManyPaths(), batch_size=1000, num_workers=1)
    arrays = OptimalDataLoaderFactory(measure=False).create_training_loader(
        ArrayBacked(), batch_size=1000, num_workers=1)
    grown = {}
    for name, loader in (("lists", lists), ("arrays", arrays)):
        iterator = iter(loader)
        next(iterator)
        before = _worker_uss(loader)[0]
        for _ in iterator:
            pass
        grown[name] = _worker_uss(loader)[0] - before
    assert grown["lists"] > grown["arrays"] + (16 << 20), grown


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes arrived in Python 3.11")
@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_sample_names_its_index(workers):
    factory = OptimalDataLoaderFactory(measure=False)
    loader = factory.create_validation_loader(FailsAt(bad_index=13, size=16), batch_size=4,
                                              num_workers=workers)
    with pytest.raises(ValueError) as err:
        list(loader)
    text = str(err.value) + "".join(getattr(err.value, "__notes__", []))
    assert "dataset[13]" in text and "corrupt record" in text
    plain = iter(DataLoader(FailsAt(bad_index=13, size=16), batch_size=4,
                            num_workers=workers))
    with pytest.raises(ValueError) as raw:
        list(plain)
    assert "dataset[13]" not in str(raw.value) + "".join(getattr(raw.value, "__notes__", []))
    assert loader.dataset.size == 16  # attributes pass through the wrapper
    # Let the workers go now: the errors' tracebacks hold both loaders in a cycle, and torch's
    # workers, shut down from the garbage collector, each wait out a 5 s poll (a 20 s stall in
    # whichever later test the collector runs).
    loader.close()
    if workers:
        plain._shutdown_workers()


# -- what the audit found untested: default start method, each RNG, epochs, gc.freeze -------

@pytest.fixture(params=["spawn", "forkserver"])
def default_start_method(request):
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(request.param, force=True)
    yield request.param
    multiprocessing.set_start_method(before, force=True)


def test_lambda_is_refused_under_the_default_start_method(default_start_method):
    # Python 3.14 makes forkserver the default on Linux: no multiprocessing_context passed
    factory = OptimalDataLoaderFactory(measure=False)
    with pytest.raises(WorkerSafetyError,
                       match=rf"dataset\.transform\.fn is a lambda.*'{default_start_method}'"):
        factory.create_training_loader(WithLambda(), batch_size=2, num_workers=1)


@pytest.mark.parametrize("persistent", [False, True])
def test_each_rng_differs_across_workers_and_epochs(persistent):
    loader = OptimalDataLoaderFactory(measure=False, seed=7).create_training_loader(
        RandomDraws(32), batch_size=4, num_workers=2, persistent_workers=persistent)
    epochs = [torch.cat(list(loader)) for _ in range(2)]

    def first_draws(epoch, worker, column):  # the worker's first batch: its first 4 draws
        return epoch[epoch[:, 1] == worker][:4, column]

    for column, name in ((2, "random"), (3, "numpy"), (4, "torch")):
        assert not torch.equal(first_draws(epochs[0], 0, column),
                               first_draws(epochs[0], 1, column)), f"{name}: workers repeat"
        assert not torch.equal(first_draws(epochs[0], 0, column),
                               first_draws(epochs[1], 0, column)), f"{name}: epochs repeat"


@pytest.mark.parametrize("persistent", [False, True])
def test_augmentation_of_each_sample_changes_every_epoch(persistent):
    # order fixed, so the check cannot pass merely because shuffling reordered the samples
    loader = OptimalDataLoaderFactory(measure=False, seed=3).create_validation_loader(
        AugmentedDataset(Pairs(32), add_noise), batch_size=4, num_workers=2,
        persistent_workers=persistent)
    first, second = (torch.cat([x for x, _ in loader]) for _ in range(2))
    changed = (first - second).flatten(1).abs().amax(dim=1) > 0
    assert changed.all(), f"samples {(~changed).nonzero().flatten().tolist()} repeat their noise"


def test_worker_gc_does_not_copy_the_parents_heap():
    heap = [[i] for i in range(500_000)]  # ~40 MB of objects the collector tracks
    loader = OptimalDataLoaderFactory(measure=False).create_validation_loader(
        GcInWorker(2), batch_size=1, num_workers=1)
    (before, after), _ = (row.flatten().tolist() for row in loader)
    grown = after - before
    assert grown < 8 << 20, f"a collection in the worker copied {grown >> 20} MiB of the parent"
    del heap


# -- a worker that dies -------------------------------------------------------------------------

@pytest.mark.parametrize("sig, words", [
    (signal.SIGKILL, ["killed by SIGKILL", "out-of-memory", "dmesg"]),
    (signal.SIGBUS, ["killed by SIGBUS", "/dev/shm", "--shm-size", "--ipc=host"]),
    (signal.SIGSEGV, ["killed by SIGSEGV", "native library", "num_workers=0"]),
    (None, ["exited with code 3", "num_workers=0"]),
], ids=["SIGKILL", "SIGBUS", "SIGSEGV", "exit-3"])
def test_a_dead_worker_is_named_with_the_likely_fix(sig, words):
    loader = OptimalDataLoaderFactory(measure=False).create_training_loader(
        DiesInWorker(bad_index=20, sig=sig), batch_size=4, num_workers=2)
    iterator = iter(loader)
    assert len(iterator) == len(loader) == 8 and iterator._num_workers == 2  # passes through
    with pytest.raises(WorkerCrashError) as err:
        for _ in iterator:
            pass
    text = str(err.value)
    assert all(word in text for word in words), text
    assert re.search(r"worker [01] \(pid \d+\)", text)
    assert "num_workers=2, prefetch_factor=2" in text
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, AutotuneError)
    # what torch raised is chained: its RuntimeError, or (when a batch the worker had sent
    # could not be read) a ConnectionResetError or EOFError
    assert isinstance(err.value.__cause__, (RuntimeError, OSError, EOFError))
    # Shut the dead loader down now: the error's traceback would leave that to the garbage
    # collector, which may run it late, or in a later test's newly forked worker.
    iterator._shutdown_workers()


@pytest.mark.parametrize("error", [ValueError, RuntimeError, FileNotFoundError])
def test_a_sample_that_raises_in_a_worker_keeps_its_type(error):
    loader = OptimalDataLoaderFactory(measure=False).create_validation_loader(
        FailsAt(bad_index=5, size=16, error=error), batch_size=4, num_workers=2)
    iterator = iter(loader)
    with pytest.raises(error, match="corrupt record") as err:
        list(iterator)
    assert not isinstance(err.value, WorkerCrashError)
    iterator._shutdown_workers()


@pytest.mark.parametrize("torch_message, words", [  # the texts of torch 2.x's SIGCHLD handler
    ("DataLoader worker (pid 123) is killed by signal: Killed. ", ["killed by SIGKILL", "dmesg"]),
    ("DataLoader worker (pid 123) is killed by signal: Bus error. It is possible that "
     "dataloader's workers are out of shared memory. Please try to raise your shared memory "
     "limit.", ["killed by SIGBUS", "--shm-size"]),
    ("DataLoader worker (pid 123) exited unexpectedly with exit code 1. Details are lost due "
     "to multiprocessing. Rerunning with num_workers=0 may give better error trace.",
     ["exited with code 1", "num_workers=0"]),
    ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback", None),
    ("Pin memory thread exited unexpectedly", None),
], ids=["SIGKILL", "SIGBUS", "exit-1", "sample-error", "pin-thread"])
def test_torch_crash_texts_are_recognized(torch_message, words):
    message = explain_crash(torch_message, (), "num_workers=2, prefetch_factor=2")
    if words is None:
        assert message is None
    else:
        assert message.startswith("DataLoader worker (pid 123) ")
        assert all(word in message for word in words) and "num_workers=2" in message
