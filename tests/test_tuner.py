"""The autotuner on real DataLoaders: failures, budget, consumer-aware choice, profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune import Autotuner, InvalidConfigError, OptimalDataLoaderFactory
from autotune.profiles import load_profile, profile_path

from datasets import HangsInWorker, Indexed, KillsWorker, Sleepy

HERE = Path(__file__).parent


def test_a_worker_that_dies_is_a_failed_trial_never_chosen():
    result = Autotuner(KillsWorker(64), 8, budget_s=6, max_workers=2, progress=False).run()
    failed = [t for t in result.trials if not t.ok]
    assert failed and all(t.config.num_workers > 0 for t in failed)
    assert any(t.error.startswith("WorkerCrashError") for t in failed)  # the builder's naming
    assert result.best.num_workers == 0
    assert "FAILED" in result.table()


def test_a_worker_that_hangs_is_a_failed_trial():
    start = time.perf_counter()
    result = Autotuner(HangsInWorker(64), 8, budget_s=6, max_workers=2, hang_timeout_s=2,
                       progress=False).run()
    failed = [t for t in result.trials if not t.ok]
    assert failed and any("timed out" in t.error for t in failed)
    assert result.best.num_workers == 0
    assert time.perf_counter() - start < 60


def test_budget_is_respected():
    start = time.perf_counter()
    result = Autotuner(Sleepy(512, 0.002), 16, budget_s=8, progress=False).run()
    took = time.perf_counter() - start
    assert took < 8 * 1.5 and result.elapsed_s < 8 * 1.5
    assert len(result.trials) >= 3
    assert result.baseline_samples_per_s and result.best_samples_per_s


@pytest.mark.serial
def test_slow_consumer_gets_the_cheapest_setting_that_keeps_up():
    # 16 samples x 2 ms = 32 ms to load a batch; the step takes 150 ms: one worker keeps up,
    # while the fastest loader (throughput objective) would use many more.
    dataset = Sleepy(512, 0.002)
    result = Autotuner(dataset, 16, budget_s=20, step_time_s=0.15, progress=False).run()
    assert 1 <= result.best.num_workers <= 2
    chosen = [t for t in result.trials if t.config.settings() == result.best.settings()]
    assert all(t.stall_fraction <= 0.05 for t in chosen)
    in_process = [t for t in result.trials if t.config.num_workers == 0]
    assert in_process and in_process[0].stall_fraction > 0.05  # loading blocks the step


def test_save_merges_and_the_factory_applies_the_entry(tmp_path):
    dataset = Sleepy(256, 0.002)
    first = Autotuner(dataset, 16, budget_s=5, progress=False).run()
    path = first.save(tmp_path, key="sleepy-a")
    assert first.best.source == "profile"
    second = Autotuner(Indexed(512), 16, budget_s=3, progress=False).run()
    assert second.save(tmp_path, key="indexed-b") == path
    profile = load_profile(path)
    assert set(profile.loaders) == {"sleepy-a", "indexed-b"}
    measured = profile.loaders["sleepy-a"].measured
    assert measured["batch_size"] == 16 and measured["peak_memory_mb"] > 0
    assert measured["fastest"]["samples_per_s"] >= 0.95 * measured["samples_per_s"]
    assert measured["fastest"]["num_workers"] >= first.best.num_workers  # what was traded
    assert 0.02 <= measured["noise"] <= 0.05
    factory = OptimalDataLoaderFactory(profile_dir=tmp_path)
    loader = factory.create_training_loader(dataset, batch_size=16, profile_key="sleepy-a")
    assert loader.autotune_config.source == "profile"
    assert loader.num_workers == first.best.num_workers
    assert loader.autotune_config.settings() == first.best.settings()
    val = factory.create_validation_loader(dataset, batch_size=16, profile_key="sleepy-a")
    assert val.num_workers == first.best.num_workers and val.autotune_config.source == "profile"
    assert not val.drop_last and not val.autotune_config.persistent_workers  # still validation
    assert "drop_last" not in profile.loaders["sleepy-a"].settings  # semantics are not tuned


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 4, "budget_s": 0}, "budget_s"),
    ({"batch_size": 4, "step_time_s": -1}, "step_time_s"),
    ({"batch_size": 4, "key": "a/b"}, "profile key"),
    ({"batch_size": 4, "budget_s": float("nan")}, "budget_s=nan"),
    ({"batch_size": 4, "budget_s": True}, "budget_s=True"),
    ({"batch_size": 4, "max_workers": -1}, "max_workers=-1"),
    ({"batch_size": 4, "hang_timeout_s": float("inf")}, "hang_timeout_s=inf"),
    ({"batch_size": 4, "step_time_s": 0.1, "train_step": print}, "not both"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        Autotuner(Indexed(8), **kwargs)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, timeout=180, cwd=cwd, env=env)


def test_cli_tune_writes_the_profile_and_show_lists_it(tmp_path):
    result = _cli("tune", str(HERE / "datasets.py") + ":make_small", "--batch-size", "16",
                  "--budget-s", "5", "--key", "small", "--profile-dir", str(tmp_path),
                  "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["key"] == "small" and data["trials"] and data["best_samples_per_s"] > 0
    assert Path(data["profile"]) == profile_path(os.uname().nodename, tmp_path)
    assert "small" in load_profile(data["profile"]).loaders
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    shown = _cli("show", "--profile-dir", str(tmp_path), cwd=tmp_path)
    assert "small:" in shown.stdout


@pytest.mark.parametrize("target, words", [
    ("nocolon", "MODULE:CALLABLE"), ("no_such_module_xyz:f", "cannot import"),
    ("datasets:missing", "no attribute"), ("missing.py:f", "no such file"),
    (".relative:f", "importing '.relative' raised TypeError"),
])
def test_cli_tune_bad_target_is_one_line(target, words, tmp_path):
    result = _cli("tune", target, "--batch-size", "4", "--profile-dir", str(tmp_path),
                  cwd=tmp_path)
    assert result.returncode == 1 and words in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.timeout(120)
def test_cli_tune_a_sample_that_never_returns_is_one_line(tmp_path):
    start = time.perf_counter()
    result = _cli("tune", str(HERE / "datasets.py") + ":make_never_returns", "--batch-size", "4",
                  "--hang-timeout-s", "2", "--profile-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "dataset[0]" in result.stderr and "2.0 s" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert time.perf_counter() - start < 60


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_factory_measurement_of_a_sample_that_never_returns_is_bounded(monkeypatch):
    """The factory's own measurement keeps measure_workload's bound (its default, 30 s, made
    2 s here so the suite does not wait it out)."""
    from autotune import DatasetError
    from autotune.measure import workload

    from datasets import NeverReturns

    assert workload.measure_workload.__kwdefaults__["sample_timeout_s"] == 30.0
    monkeypatch.setitem(workload.measure_workload.__kwdefaults__, "sample_timeout_s", 2.0)
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=r"dataset\[0\].*sample_timeout_s=2\b"):
        OptimalDataLoaderFactory().create_training_loader(NeverReturns(), batch_size=4)
    assert time.perf_counter() - start < 2.0 + 10


def test_cli_tune_a_target_that_is_not_python_is_one_line(tmp_path):
    (tmp_path / "data.txt").write_text("not python")
    result = _cli("tune", str(tmp_path / "data.txt") + ":f", "--batch-size", "4",
                  "--profile-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "is not a Python file" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
