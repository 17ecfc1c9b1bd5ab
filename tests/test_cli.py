"""The CLI through real subprocesses (and once in-process through ``main``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from autotune.cli import main


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 if code == 1 else True


def test_probe_json_reports_affinity_as_usable():
    result = run("probe", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["cpu"]["usable"] == len(os.sched_getaffinity(0))
    assert data["cpu_budget"] >= 1 and data["fingerprint"]
    assert "shm_free_bytes" in data["memory"] and isinstance(data["gpus"], list)


def test_probe_table_and_console_script():
    script = shutil.which("autotune", path=os.path.dirname(sys.executable))
    assert script, "the autotune console script is installed beside this Python"
    result = subprocess.run([script, "probe"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usable" in result.stdout and "Fingerprint" in result.stdout


def test_probe_save_then_show(tmp_path):
    saved = run("probe", "--save", "--profile-dir", str(tmp_path))
    assert saved.returncode == 0, saved.stderr
    files = list(tmp_path.glob("*.yaml"))
    assert len(files) == 1 and str(files[0]) in saved.stdout
    shown = run("show", "--profile-dir", str(tmp_path))
    assert shown.returncode == 0 and "applies to this machine" in shown.stdout
    as_json = json.loads(run("show", "--json", "--profile-dir", str(tmp_path)).stdout)
    assert as_json["applies"] is True


def test_show_without_profile_is_a_one_line_error(tmp_path):
    result = run("show", "--profile-dir", str(tmp_path))
    assert_one_line_error(result, 1)
    assert "autotune probe --save" in result.stderr


def test_show_malformed_profile_names_the_file(tmp_path):
    run("probe", "--save", "--profile-dir", str(tmp_path))
    path = next(tmp_path.glob("*.yaml"))
    path.write_text("schema_version: 99\nhostname: h\nfingerprint: f\n")
    result = run("show", "--profile-dir", str(tmp_path))
    assert_one_line_error(result, 1)
    assert str(path) in result.stderr and "schema_version" in result.stderr


def test_recommend_json_and_table():
    result = run("recommend", "--dataset-size", "50000", "--augmentation", "--batch-size", "64",
                 "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data["config"]["num_workers"], int)
    assert set(data["config"]["reasons"]) >= {"num_workers", "prefetch_factor", "pin_memory"}
    table = run("recommend", "--dataset-size", "100")
    assert "num_workers" in table.stdout and "no measurement" in table.stdout


@pytest.mark.parametrize("args", [
    ("recommend",), ("recommend", "--dataset-size", "0"), ("recommend", "--dataset-size", "x"),
    ("nonsense",), (),
])
def test_bad_usage_exits_2_without_traceback(args):
    result = run(*args)
    assert_one_line_error(result, 2)
    assert "usage" in result.stderr


def test_main_is_callable_from_python(capsys):
    assert main(["probe", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cpu"]["usable"] >= 1
    assert main(["recommend"]) == 2
