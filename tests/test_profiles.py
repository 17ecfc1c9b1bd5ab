from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import yaml

from autotune import ProfileError, probe_hardware
from autotune.profiles import (Profile, ProfileEntry, load_profile, profile_path, save_entry,
                               save_hardware)

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
    "newer": ("schema_version: 2\nhostname: h\nfingerprint: f\n", "schema_version", "newer"),
    "version_type": ("schema_version: one\n", "schema_version", "integer"),
    "unknown_top": ("schema_version: 1\nhostname: h\nfingerprint: f\nextra: 1\n", "extra",
                    "unknown"),
    "fingerprint": ("schema_version: 1\nhostname: h\nfingerprint: 3\n", "fingerprint", "string"),
    "wrong_type": ("schema_version: 1\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                   "    settings: {num_workers: many}\n", "loaders.k.settings", "num_workers"),
    "unknown_setting": ("schema_version: 1\nhostname: h\nfingerprint: f\nloaders:\n  k:\n"
                        "    settings: {num_wrokers: 2}\n", "loaders.k.settings.num_wrokers",
                        "unknown setting"),
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
