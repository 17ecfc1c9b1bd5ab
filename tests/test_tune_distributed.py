"""Tuning under torchrun: real processes in a gloo group on the CPU, no mocks.

Every rank measures each trial at once, rank 0 decides on the slowest rank and the node's
memory, every rank ends with the same result, and one profile entry is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from autotune import probe_hardware
from autotune.config import LoaderConfig
from autotune.records import Trial
from autotune.records import WorkloadProfile
from autotune.tuning.ranks import RankTrial, combine
from autotune.tuning.result import TuningResult

HERE = Path(__file__).parent
TARGET = str(HERE / "tune_target.py")
QUICK = ("--batch-size", "8", "--budget-s", "4", "--max-workers", "2")


def torchrun(*args: str, logs: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Two ranks on this host; each rank's stdout and stderr go to files under ``logs``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "--redirects", "3", "--log-dir", str(logs), *args]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return subprocess.run(command, capture_output=True, text=True, timeout=100, cwd=cwd,
                          env=env, check=False)


def rank_output(logs: Path, rank: int, stream: str) -> str:
    (path,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def one_entry(profile_dir: Path) -> tuple[str, dict]:
    (path,) = profile_dir.glob("*.yaml")
    loaders = yaml.safe_load(path.read_text())["loaders"]
    assert len(loaders) == 1, loaders
    return next(iter(loaders.items()))


# -- the combination, without processes ---------------------------------------------------

def _rank(rank: int, host: str = "node", **measured) -> RankTrial:
    return RankTrial(rank=rank, host=host,
                     trial=Trial(config=LoaderConfig(num_workers=2), phase="ladder", **measured))


def test_combine_takes_the_slowest_rank_and_the_node_totals():
    reports = [_rank(0, samples_per_s=900.0, peak_memory_bytes=300, cpu_percent=80.0,
                     first_batch_s=0.2, stall_fraction=0.01, window_s=1.0),
               _rank(1, samples_per_s=700.0, peak_memory_bytes=200, cpu_percent=60.0,
                     first_batch_s=0.5, stall_fraction=0.03, window_s=1.1)]
    trial = combine(reports, config=LoaderConfig(num_workers=2), phase="ladder")
    assert trial.ok and trial.samples_per_s == 700.0 and trial.window_s == 1.1
    assert trial.peak_memory_bytes == 500 and trial.cpu_percent == 140.0
    assert trial.first_batch_s == 0.5 and trial.stall_fraction == 0.03


def test_combine_sums_memory_per_host_and_keeps_the_busiest_host():
    reports = [_rank(0, "a", samples_per_s=1.0, peak_memory_bytes=100),
               _rank(1, "a", samples_per_s=1.0, peak_memory_bytes=100),
               _rank(2, "b", samples_per_s=1.0, peak_memory_bytes=300),
               _rank(3, "b", samples_per_s=1.0, peak_memory_bytes=None)]
    assert combine(reports, config=LoaderConfig(), phase="x").peak_memory_bytes == 300


def test_combine_fails_the_trial_naming_the_rank():
    reports = [_rank(0, samples_per_s=900.0), _rank(1, error="WorkerCrashError: killed"),
               _rank(2, error="hung")]
    trial = combine(reports, config=LoaderConfig(num_workers=2), phase="ladder")
    assert not trial.ok and trial.samples_per_s is None
    assert trial.error == "rank 1: WorkerCrashError: killed (also failed on rank(s) 2)"


def test_only_rank_0_writes_the_profile(tmp_path, monkeypatch):
    config = LoaderConfig(num_workers=2, reasons={"num_workers": "measured"}, source="tuned")
    trial = Trial(config=config, phase="rules", samples_per_s=100.0)

    def result() -> TuningResult:
        return TuningResult(best=config, best_samples_per_s=100.0, baseline_samples_per_s=None,
                            trials=(trial,), elapsed_s=1.0, batch_size=8, key="quick",
                            objective="lean throughput", hardware=probe_hardware(),
                            workload=WorkloadProfile(samples=1, sec_per_sample=0.001,
                                                     cpu_sec_per_sample=0.0, sample_bytes=32),
                            local_world_size=2)

    monkeypatch.setenv("RANK", "1")
    path = result().save(tmp_path)
    assert not path.exists()
    monkeypatch.setenv("RANK", "0")
    assert result().save(tmp_path) == path
    assert one_entry(tmp_path)[1]["measured"]["local_world_size"] == 2


# -- real ranks ---------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_cli_under_torchrun_writes_one_agreed_entry_and_prints_once(tmp_path):
    profiles, logs = tmp_path / "profiles", tmp_path / "logs"
    run = torchrun("-m", "autotune", "tune", f"{TARGET}:make_quick", *QUICK, "--key", "quick",
                   "--profile-dir", str(profiles), logs=logs, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    key, entry = one_entry(profiles)
    assert key == "quick" and entry["measured"]["local_world_size"] == 2
    leader, follower = rank_output(logs, 0, "stdout"), rank_output(logs, 1, "stdout")
    assert leader.count("saved key 'quick'") == 1 and "each trial ran on 2 ranks" in leader
    assert follower == ""
    assert "autotune: error" not in rank_output(logs, 1, "stderr")


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_cli_json_under_torchrun_shows_the_combined_numbers(tmp_path):
    profiles, logs = tmp_path / "profiles", tmp_path / "logs"
    run = torchrun("-m", "autotune", "tune", f"{TARGET}:make_quick", *QUICK, "--json",
                   "--profile-dir", str(profiles), logs=logs, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(rank_output(logs, 0, "stdout"))
    assert rank_output(logs, 1, "stdout") == ""
    assert data["local_world_size"] == 2 and Path(data["profile"]).parent == profiles
    assert data["trials"]
    for trial in data["trials"]:
        ranks = trial["ranks"]
        assert [r["rank"] for r in ranks] == [0, 1]
        if trial["error"] is None:
            assert trial["samples_per_s"] == min(r["samples_per_s"] for r in ranks)
            assert trial["peak_memory_bytes"] == sum(r["peak_memory_bytes"] for r in ranks)
            assert trial["cpu_percent"] == pytest.approx(sum(r["cpu_percent"] for r in ranks))
    assert one_entry(profiles)[1]["measured"]["local_world_size"] == 2


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_autotuner_in_a_gloo_group_gives_every_rank_the_same_result(tmp_path):
    out, profiles, logs = tmp_path / "out", tmp_path / "profiles", tmp_path / "logs"
    out.mkdir()
    run = torchrun(TARGET, str(out), str(profiles), logs=logs, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:] + rank_output(logs, 0, "stderr")
    leader, follower = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert leader == follower  # settings, samples/s, trials and the path rank 0 wrote
    assert leader["local_world_size"] == 2
    key, entry = one_entry(profiles)
    assert key == "quick" and entry["settings"]["num_workers"] == \
        leader["settings"]["num_workers"]


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_rank_that_fails_stops_every_rank_with_one_line(tmp_path):
    profiles, logs = tmp_path / "profiles", tmp_path / "logs"
    start = time.perf_counter()
    run = torchrun("-m", "autotune", "tune", f"{TARGET}:make_fails_on_rank_1", *QUICK,
                   "--profile-dir", str(profiles), logs=logs, cwd=tmp_path)
    assert run.returncode != 0
    assert time.perf_counter() - start < 90
    for rank in (0, 1):
        lines = rank_output(logs, rank, "stderr").strip().splitlines()
        errors = [line for line in lines if line.startswith("autotune: error:")]
        assert errors == [("autotune: error: rank 1 of 2 failed: dataset[0] raised "
                           "ValueError: this rank's storage is unreachable")], lines
        assert "Traceback" not in "\n".join(lines)
        assert rank_output(logs, rank, "stdout") == ""
    assert not list(profiles.glob("*.yaml"))


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_when_rank_0_gives_up_every_rank_raises_its_error(tmp_path):
    """The training step fails on rank 1: every combined trial fails, rank 0's search raises,
    and rank 1 raises the same message instead of waiting for the next trial."""
    out, profiles, logs = tmp_path / "out", tmp_path / "profiles", tmp_path / "logs"
    out.mkdir()
    run = torchrun(TARGET, str(out), str(profiles), "step-fails-on-rank-1", logs=logs,
                   cwd=tmp_path)
    assert run.returncode != 0
    leader, follower = ((out / f"rank{r}.error").read_text() for r in (0, 1))
    assert leader.startswith("InvalidConfigError: every trial failed: rank 1: RuntimeError: "
                             "out of memory in the training step")
    assert follower == "AutotuneError: " + leader.removeprefix("InvalidConfigError: ")
    assert not list(profiles.glob("*.yaml"))
