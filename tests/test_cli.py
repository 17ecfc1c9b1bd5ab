"""The CLI through real subprocesses (and once in-process through ``main``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from autotune import probe_hardware
from autotune.cli import main
from autotune.profiles import save_hardware

TESTS = Path(__file__).parent
# A target that cannot load: a profile problem must be reported before the dataset is touched.
TUNE = ("tune", "no_such_module_here:make", "--batch-size", "8")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autotune", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def run_with_fault(fault: str, fault_args: tuple[str, ...], *args: str
                   ) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess with one filesystem fault of test_profiles installed first."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_profiles; "
            f"test_profiles.{fault}(*{fault_args!r}); from autotune.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 if code == 1 else True


def test_probe_json_reports_affinity_as_usable():
    result = run("probe", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    quota = data["cpu"]["quota"]
    assert data["cpu"]["usable"] == max(1, min(len(os.sched_getaffinity(0)), int(quota or 10**9)))
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
    assert as_json["applies"] is True and as_json["path"] == str(files[0])
    assert "this host's profile" in as_json["why"]


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


# --- profiles on disk: every filesystem failure is one stderr line, exit 1, no traceback ----

@pytest.mark.parametrize("command", [("probe", "--save"), ("show",), TUNE], ids=lambda c: c[0])
def test_cli_profile_dir_that_is_a_file(command, tmp_path):
    blocker = tmp_path / "profiles"
    blocker.write_text("not a directory\n")
    result = run(*command, "--profile-dir", str(blocker))
    assert_one_line_error(result, 1)
    assert f"{blocker}: is a file, not a directory: remove it or pass --profile-dir" \
        in result.stderr


@pytest.mark.parametrize("command", [("probe", "--save"), TUNE], ids=lambda c: c[0])
def test_cli_unwritable_profile_dir(command, tmp_path):
    directory = tmp_path / "profiles"
    directory.mkdir()
    result = run_with_fault("deny_writes", (str(directory),), *command,
                            "--profile-dir", str(directory))
    assert_one_line_error(result, 1)
    assert f"{directory}: cannot write here (permission denied): make it writable" \
        in result.stderr
    assert os.listdir(directory) == []


@pytest.mark.parametrize("command", [("probe", "--save"), TUNE], ids=lambda c: c[0])
def test_cli_disk_full_keeps_the_old_profile(command, tmp_path):
    path = save_hardware(probe_hardware(), tmp_path)
    before = path.read_bytes()
    result = run_with_fault("fill_disk", (), *command, "--profile-dir", str(tmp_path))
    assert_one_line_error(result, 1)
    assert f"{tmp_path}" in result.stderr and "disk full" in result.stderr
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


def test_cli_unreadable_profile(tmp_path):
    path = save_hardware(probe_hardware(), tmp_path)
    result = run_with_fault("deny_reads", (str(path),), "show", "--profile-dir", str(tmp_path))
    assert_one_line_error(result, 1)
    assert f"{path}: cannot read (permission denied): make it readable" in result.stderr


def test_cli_missing_profile_dir(tmp_path):
    directory = tmp_path / "a" / "b" / "profiles"
    shown = run("show", "--profile-dir", str(directory))
    assert_one_line_error(shown, 1)
    assert f"{directory}/ does not exist yet" in shown.stderr and not directory.exists()
    saved = run("probe", "--save", "--profile-dir", str(directory))
    assert saved.returncode == 0, saved.stderr
    assert [p.name for p in directory.glob("*.yaml")] == [f"{probe_hardware().host.hostname}.yaml"]


# --- show: which file applied and why ---------------------------------------------------

def test_show_finds_an_earlier_jobs_profile_by_fingerprint(tmp_path):
    hw = probe_hardware()
    pod = save_hardware(hw, tmp_path).rename(tmp_path / "pod-7f9c.yaml")  # an earlier hostname
    shown = run("show", "--profile-dir", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert f"{pod}: applies to this machine" in shown.stdout
    assert (f"no profile named for host {hw.host.hostname}; {pod} matches this hardware's "
            f"fingerprint {hw.fingerprint}") in shown.stdout
    data = json.loads(run("show", "--json", "--profile-dir", str(tmp_path)).stdout)
    assert data["path"] == str(pod) and data["applies"] is True and "matches" in data["why"]
    assert data["profile"]["fingerprint"] == hw.fingerprint


def test_show_own_profile_from_other_hardware_is_calm(tmp_path):
    hw = probe_hardware()
    path = save_hardware(hw, tmp_path)
    data = yaml.safe_load(path.read_text())
    data["fingerprint"] = "0123456789abcdef"
    path.write_text(yaml.safe_dump(data))
    shown = run("show", "--profile-dir", str(tmp_path))
    assert shown.returncode == 0 and shown.stderr == ""
    assert f"{path}: does NOT apply to this machine" in shown.stdout
    assert (f"{path} was tuned on other hardware (fingerprint 0123456789abcdef, this machine "
            f"{hw.fingerprint}): not applied; run `autotune tune` here") in shown.stdout


def test_a_reader_that_leaves_early_is_no_traceback(tmp_path):
    # `autotune probe --json | head -1`: the pipe closes before autotune writes.
    proc = subprocess.Popen([sys.executable, "-m", "autotune", "probe", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipe" not in err


def _tune_on(stderr_is_terminal: bool, *extra: str, tmp_path) -> str:
    """``autotune tune`` (2 s) with stderr on a pseudo-terminal or a pipe: what it wrote."""
    import os
    import pty

    target = str(Path(__file__).with_name("tune_target.py")) + ":make_quick"
    args = [sys.executable, "-m", "autotune", "tune", target, "--batch-size", "8",
            "--budget-s", "2", "--max-workers", "1", "--profile-dir", str(tmp_path), *extra]
    env = {**os.environ, "COLUMNS": "120"}
    if not stderr_is_terminal:
        return subprocess.run(args, capture_output=True, text=True, timeout=120,
                              env=env).stderr
    import fcntl
    import struct
    import termios

    main, side = pty.openpty()
    fcntl.ioctl(side, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a real size
    try:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=side, env=env)
        os.close(side)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=120) == 0
    finally:
        os.close(main)
    return b"".join(chunks).decode(errors="replace")


def test_tune_shows_a_tqdm_bar_in_a_terminal_and_none_in_a_pipe(tmp_path):
    on_terminal = _tune_on(True, tmp_path=tmp_path / "a")
    assert "autotune tune:" in on_terminal and "|" in on_terminal and " s, trial" in on_terminal
    assert "trial 1" in on_terminal
    assert "autotune tune:" not in _tune_on(False, tmp_path=tmp_path / "b")
    assert "autotune tune:" not in _tune_on(True, "--quiet", tmp_path=tmp_path / "c")
