from __future__ import annotations

import errno
import io
import multiprocessing
import os
import tempfile
from pathlib import Path

import pytest
import yaml

from autotune import ProfileError, probe_hardware
from autotune.profiles import (Profile, ProfileEntry, ProfileLookup, check_writable,
                               find_profile, load_profile, profile_path, save_entry,
                               save_hardware)
from fakes import fake_hardware

FIXTURES = sorted((Path(__file__).parent / "data" / "profiles").glob("*.yaml"))
COMMITTED = sorted((Path(__file__).parents[1] / "profiles").glob("*.yaml"))


def assert_profile_roundtrip(path: Path, tmp_path: Path) -> None:
    """The one contract check: load -> to_dict -> YAML -> load gives the same profile."""
    profile = load_profile(path)
    assert profile is not None
    copy = tmp_path / "copy.yaml"
    copy.write_text(yaml.safe_dump(profile.to_dict(), sort_keys=False))
    assert load_profile(copy) == profile
    assert Profile.from_dict(profile.to_dict()) == profile


@pytest.mark.parametrize("path", FIXTURES + COMMITTED, ids=lambda p: p.name)
def test_roundtrip_every_fixture_and_committed_profile(path, tmp_path):
    assert_profile_roundtrip(path, tmp_path)


def test_save_hardware_then_entries_merge(tmp_path):
    hw = probe_hardware()
    path = save_hardware(hw, tmp_path)
    assert path == profile_path(hw.host.hostname, tmp_path)
    save_entry(hw, "a", ProfileEntry(settings={"num_workers": 2}), tmp_path)
    save_entry(hw, "b", ProfileEntry(settings={"num_workers": 0}, measured={"x": 1.5}), tmp_path)
    save_hardware(hw, tmp_path)  # refreshing the facts keeps the tuned entries
    profile = load_profile(path)
    assert set(profile.loaders) == {"a", "b"}
    assert profile.applies_to(hw) and profile.updated
    assert_profile_roundtrip(path, tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_a_group_entry_round_trips_and_is_what_needs_schema_2(tmp_path):
    hw = probe_hardware()
    path = save_entry(hw, "a", ProfileEntry(settings={"num_workers": 2}), tmp_path)
    assert yaml.safe_load(path.read_text())["schema_version"] == 1  # older autotune reads it
    group = ProfileEntry(members={"x": {"num_workers": 3}, "y": {"num_workers": 1}},
                         measured={"samples_per_s": 10.0})
    save_entry(hw, "x+y", group, tmp_path)
    assert yaml.safe_load(path.read_text())["schema_version"] == 2
    assert load_profile(path).loaders["x+y"] == group
    assert_profile_roundtrip(path, tmp_path)
    part = group.member("y")
    assert part.settings == {"num_workers": 1} and "loader 'y' of the group" in part.reason("x+y")


def _save_many(directory: str, prefix: str) -> None:
    hw = probe_hardware()
    for i in range(15):
        save_entry(hw, f"{prefix}{i}", ProfileEntry(settings={"num_workers": i % 3}), directory)


def test_concurrent_writers_lose_no_entry(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_many, args=(str(tmp_path), p)) for p in "xyz"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    path = profile_path(probe_hardware().host.hostname, tmp_path)
    assert len(load_profile(path).loaders) == 45
    assert os.listdir(tmp_path) == [path.name]  # no lock or temporary file left to commit


BAD = {
    "truncated": ("schema_version: 1\nhostname: [unclosed\n", None, "not valid YAML"),
    "python_tag": ("!!python/object/apply:os.system ['echo hacked']\n", None, "not valid YAML"),
    "not_mapping": ("- 1\n- 2\n", None, "mapping"),
    "newer": ("schema_version: 3\nhostname: h\nfingerprint: f\n", "schema_version", "newer"),
    "version_type": ("schema_version: one\n", "schema_version", "integer"),
    "unknown_top": ("schema_version: 1\nhostname: h\nfingerprint: f\nextra: 1\n", "extra",
                    "unknown"),
    "fingerprint": ("schema_version: 1\nhostname: h\nfingerprint: 3\n", "fingerprint", "string"),
    "wrong_type": ("schema_version: 1\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                   "    settings: {num_workers: many}\n", "loaders.k.settings", "num_workers"),
    "unknown_setting": ("schema_version: 1\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                        "    settings: {num_wrokers: 2}\n", "loaders.k.settings.num_wrokers",
                        "unknown setting"),
    "group_and_settings": ("schema_version: 2\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                           "    settings: {}\n    members: {a: {}}\n", "loaders.k.settings",
                           "not both"),
    "group_empty": ("schema_version: 2\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                    "    members: {}\n", "loaders.k.members", "loader name -> settings"),
    "group_setting": ("schema_version: 2\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                      "    members: {a: {num_wrokers: 2}}\n", "loaders.k.members.a.num_wrokers",
                      "unknown setting"),
    "group_value": ("schema_version: 2\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                    "    members: {a: {num_workers: -1}}\n", "loaders.k.members.a",
                    "num_workers"),
    "bad_key": ("schema_version: 1\nhostname: h\nfingerprint: f\nloaders:\n  ../../etc:\n"
                "    settings: {}\n", "loaders.../../etc", "profile key"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_malformed_profiles_name_file_and_field(name, tmp_path):
    text, field, words = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert str(path) in str(err.value) and words in str(err.value)
    assert err.value.field == field


def test_python_tag_is_never_constructed(tmp_path):
    marker = tmp_path / "constructed"
    path = tmp_path / "evil.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ProfileError):
        load_profile(path)
    assert not marker.exists()


def test_missing_file_is_none(tmp_path):
    assert load_profile(tmp_path / "nope.yaml") is None


def test_hostname_cannot_escape_the_directory(tmp_path):
    assert profile_path("../../etc/passwd", tmp_path).parent == tmp_path


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    hw = probe_hardware()
    path = save_entry(hw, "kept", ProfileEntry(settings={"num_workers": 1}), tmp_path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped midway through the write

    monkeypatch.setattr("autotune.profiles.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_entry(hw, "lost", ProfileEntry(settings={"num_workers": 2}), tmp_path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert set(load_profile(path).loaders) == {"kept"}


# --- filesystem failures: one ProfileError naming the path and the fix, never an OSError ----
# Root ignores file modes, so where the tests run as root each fault below also answers the
# way the kernel answers anyone else. ``patch`` is monkeypatch.setattr in-process, and plain
# setattr where test_cli installs the same fault in a CLI subprocess.

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _denied(path: object) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def deny_writes(directory: str | Path, patch=setattr) -> None:
    """Nothing can be created in directory (chmod a-w; as root, EACCES on create)."""
    directory = Path(directory).absolute()
    directory.chmod(0o555)
    if not AS_ROOT:
        return
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path: object) -> bool:
        return Path(os.path.abspath(path)).parent == directory

    def fake_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and inside(path):
            raise _denied(path)
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if inside(path):
            raise _denied(path)
        return real_mkdir(path, *args, **kwargs)

    patch(os, "open", fake_open)
    patch(os, "mkdir", fake_mkdir)


def deny_reads(path: str | Path, patch=setattr) -> None:
    """path (a file or directory) cannot be read (chmod; as root, EACCES on open/listdir)."""
    path = Path(path).absolute()
    path.chmod(0o300 if path.is_dir() else 0o200)
    if not AS_ROOT:
        return
    real_open, real_listdir = io.open, os.listdir

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(os.path.abspath(file)) == path:
            raise _denied(file)
        return real_open(file, *args, **kwargs)

    def fake_listdir(target="."):
        if Path(os.path.abspath(target)) == path:
            raise _denied(target)
        return real_listdir(target)

    patch(io, "open", fake_open)
    patch(os, "listdir", fake_listdir)


def fill_disk(patch=setattr, stage: str = "write") -> None:
    """ENOSPC for temporary files: half the bytes land, then the write (or fsync) fails."""
    real_write, real_fsync = os.write, os.fsync

    def is_temp(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp")
        except OSError:
            return False

    def full() -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(fd, data):
        if stage == "write" and is_temp(fd):
            real_write(fd, bytes(data[:len(data) // 2]))
            raise full()
        return real_write(fd, data)

    def fsync(fd):
        if stage == "fsync" and is_temp(fd):
            raise full()
        return real_fsync(fd)

    patch(os, "write", write)
    patch(os, "fsync", fsync)


def assert_clear(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    """One line that names the path, says what failed and how to fix it."""
    message = str(err.value)
    assert isinstance(err.value, ProfileError)
    assert "\n" not in message and str(path) in message, message
    assert all(word in message for word in words), message
    assert "--profile-dir" in message, message


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".tmp")


HW = fake_hardware(hostname="vm")


def test_missing_directory_is_created_on_save_with_parents(tmp_path):
    directory = tmp_path / "a" / "b" / "profiles"
    path = save_entry(HW, "k", ProfileEntry(settings={"num_workers": 1}), directory)
    assert path == directory / "vm.yaml" and load_profile(path).loaders["k"]
    assert check_writable(tmp_path / "c" / "profiles") == tmp_path / "c" / "profiles"


def test_missing_directory_on_read_is_no_profile(tmp_path):
    lookup = find_profile(HW, tmp_path / "nope")
    assert lookup.profile is None and lookup.path is None and "does not exist" in lookup.why
    assert load_profile(tmp_path / "nope" / "vm.yaml") is None
    assert not (tmp_path / "nope").exists()  # reading creates nothing


@pytest.mark.parametrize("action", ["save_hardware", "save_entry", "check_writable",
                                    "find_profile", "load_profile"])
@pytest.mark.parametrize("nested", [False, True], ids=["dir", "under_dir"])
def test_directory_that_is_a_file(action, nested, tmp_path):
    blocker = tmp_path / "profiles"
    blocker.write_text("not a directory\n")
    directory = blocker / "sub" if nested else blocker
    calls = {
        "save_hardware": lambda: save_hardware(HW, directory),
        "save_entry": lambda: save_entry(HW, "k", ProfileEntry(settings={}), directory),
        "check_writable": lambda: check_writable(directory),
        "find_profile": lambda: find_profile(HW, directory),
        "load_profile": lambda: load_profile(directory / "vm.yaml"),
    }
    with pytest.raises(ProfileError) as err:
        calls[action]()
    assert_clear(err, blocker, "is a file, not a directory", "remove it")
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.parametrize("action", ["save_hardware", "check_writable"])
def test_unwritable_directory(action, tmp_path, monkeypatch):
    directory = tmp_path / "profiles"
    path = save_entry(HW, "kept", ProfileEntry(settings={"num_workers": 1}), directory)
    before = path.read_bytes()
    deny_writes(directory, monkeypatch.setattr)
    with pytest.raises(ProfileError) as err:
        save_hardware(HW, directory) if action == "save_hardware" else check_writable(directory)
    assert_clear(err, directory, "cannot write here (permission denied)", "make it writable")
    assert path.read_bytes() == before and leftovers(directory) == []


def test_unwritable_parent_of_a_missing_directory(tmp_path, monkeypatch):
    deny_writes(tmp_path, monkeypatch.setattr)
    with pytest.raises(ProfileError) as err:
        save_hardware(HW, tmp_path / "profiles")
    assert_clear(err, tmp_path / "profiles", "cannot create this directory", "parent writable")


@pytest.mark.parametrize("stage", ["write", "fsync"])
def test_disk_full_keeps_the_old_profile(stage, tmp_path, monkeypatch):
    path = save_entry(HW, "kept", ProfileEntry(settings={"num_workers": 1}), tmp_path)
    before = path.read_bytes()
    fill_disk(monkeypatch.setattr, stage)
    with pytest.raises(ProfileError) as err:
        save_entry(HW, "lost", ProfileEntry(settings={"num_workers": 2}), tmp_path)
    assert_clear(err, path, "disk full", "the previous profile, if any, is kept")
    with pytest.raises(ProfileError, match="disk full"):
        check_writable(tmp_path)
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert set(load_profile(path).loaders) == {"kept"}


def test_unreadable_profile(tmp_path, monkeypatch):
    path = save_hardware(HW, tmp_path)
    deny_reads(path, monkeypatch.setattr)
    for read in (lambda: load_profile(path), lambda: find_profile(HW, tmp_path)):
        with pytest.raises(ProfileError) as err:
            read()
        assert_clear(err, path, "cannot read (permission denied)", "make it readable")


def test_unreadable_directory(tmp_path, monkeypatch):
    save_hardware(HW, tmp_path / "profiles")
    deny_reads(tmp_path / "profiles", monkeypatch.setattr)
    with pytest.raises(ProfileError) as err:
        find_profile(HW, tmp_path / "profiles")
    assert_clear(err, tmp_path / "profiles", "cannot read this directory")


# --- lookup: this host's file, else a file whose fingerprint matches (newest wins) ---------

OTHER = fake_hardware(hostname="vm", cpus=64)  # same hostname, other hardware
assert OTHER.fingerprint != HW.fingerprint


def write_profile(directory: Path, hw, name: str | None = None, updated: str | None = "now",
                  workers: int = 1) -> Path:
    """A real profile for hw saved as ``<name or hostname>.yaml``; ``updated`` as given."""
    with tempfile.TemporaryDirectory() as scratch:
        saved = save_entry(hw, "k", ProfileEntry(settings={"num_workers": workers}), scratch)
        data = yaml.safe_load(saved.read_text())
    if updated != "now":
        data["updated"] = updated
    target = directory / f"{name or hw.host.hostname}.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def assert_lookup(lookup: ProfileLookup, path: Path | None, applies: bool, *words: str) -> None:
    assert lookup.path == path and (lookup.profile is not None) == applies
    assert "\n" not in lookup.why and all(w in lookup.why for w in words), lookup.why
    if applies:
        assert lookup.profile == load_profile(path)


def test_lookup_this_hosts_own_file(tmp_path):
    path = write_profile(tmp_path, HW)
    write_profile(tmp_path, HW, name="pod-newer", updated="2099-01-01T00:00:00+00:00")
    assert_lookup(find_profile(HW, tmp_path), path, True, str(path), "this host's profile",
                  "hostname vm", HW.fingerprint)


def test_lookup_by_fingerprint_when_the_hostname_is_new(tmp_path):
    old_pod = write_profile(tmp_path, fake_hardware(hostname="pod-abc"))
    write_profile(tmp_path, OTHER, name="gpu-node")  # other hardware: never chosen
    pod = fake_hardware(hostname="pod-xyz")
    assert_lookup(find_profile(pod, tmp_path), old_pod, True, "no profile named for host "
                  "pod-xyz", f"{old_pod} matches this hardware's fingerprint {pod.fingerprint}")


def test_lookup_newest_of_several_matches_wins(tmp_path):
    write_profile(tmp_path, HW, name="pod-b", updated="2025-01-01T00:00:00+00:00", workers=1)
    newest = write_profile(tmp_path, HW, name="pod-a", updated="2026-03-01T00:00:00+00:00",
                           workers=2)
    write_profile(tmp_path, HW, name="pod-c", updated=None, workers=3)  # unknown: oldest
    lookup = find_profile(fake_hardware(hostname="pod-new"), tmp_path)
    assert_lookup(lookup, newest, True, "(newest of 3)")
    assert lookup.profile.loaders["k"].settings == {"num_workers": 2}


def test_lookup_own_file_from_other_hardware_is_not_applied_calmly(tmp_path):
    own = write_profile(tmp_path, OTHER)
    write_profile(tmp_path, OTHER, name="pod-abc")
    assert_lookup(find_profile(HW, tmp_path), own, False, f"{own} was tuned on other hardware",
                  f"fingerprint {OTHER.fingerprint}, this machine {HW.fingerprint}",
                  "not applied", "autotune tune")
    pod = write_profile(tmp_path, HW, name="pod-abc")  # this hardware under another name
    assert_lookup(find_profile(HW, tmp_path), pod, True, f"{own} is from other hardware",
                  f"{pod} matches")


def test_lookup_nothing_matches(tmp_path):
    write_profile(tmp_path, OTHER, name="gpu-node")
    assert_lookup(find_profile(HW, tmp_path), None, False,
                  f"no profile in {tmp_path}/ matches this machine (fingerprint {HW.fingerprint})")


def test_committed_profile_is_not_applied_on_other_hardware():
    """The quick start on a fresh machine: the developers' vm.yaml does not apply, calmly."""
    directory = Path(__file__).parents[1] / "profiles"
    committed = load_profile(directory / "vm.yaml")
    hw = fake_hardware(hostname="vm", cpus=3)
    assert committed.fingerprint != hw.fingerprint
    assert_lookup(find_profile(hw, directory), directory / "vm.yaml", False, "other hardware")


def test_lookup_skips_other_hosts_unusable_files(tmp_path, monkeypatch, caplog):
    match = write_profile(tmp_path, HW, name="pod-abc")
    (tmp_path / "broken.yaml").write_text("schema_version: 1\nhostname: [unclosed\n")
    unreadable = write_profile(tmp_path, HW, name="pod-zzz", updated="2099-01-01T00:00:00+00:00")
    deny_reads(unreadable, monkeypatch.setattr)
    (tmp_path / "notes.txt").write_text("not a profile")
    with caplog.at_level("DEBUG", logger="autotune.profiles"):
        lookup = find_profile(fake_hardware(hostname="pod-new"), tmp_path)
    assert_lookup(lookup, match, True, f"{match} matches")
    assert "broken.yaml" in caplog.text and "pod-zzz.yaml" in caplog.text


@pytest.mark.parametrize("text", ["schema_version: 1\nhostname: [unclosed\n",
                                  "schema_version: 9\nhostname: vm\nfingerprint: f\n"])
def test_lookup_this_hosts_malformed_file_raises(text, tmp_path):
    write_profile(tmp_path, HW, name="pod-abc")  # a match elsewhere does not hide the problem
    (tmp_path / "vm.yaml").write_text(text)
    with pytest.raises(ProfileError, match=r"vm\.yaml"):
        find_profile(HW, tmp_path)


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfeh\x00o\x00s\x00t\x00", "not UTF-8 text"),  # a UTF-16 file
    (b"[" * 20_000, "nested too deeply"),
])
def test_a_profile_that_is_not_yaml_text_is_one_error(content, words, tmp_path):
    path = tmp_path / "host.yaml"
    path.write_bytes(content)
    with pytest.raises(ProfileError, match=words):
        load_profile(path)
