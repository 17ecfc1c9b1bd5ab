"""Per-host YAML profiles: ``profiles/<hostname>.yaml``, schema version 2 (1 where no
entry is a group, which older autotune reads).

A profile holds this host's hardware facts and fingerprint, and ``loaders``: for each key
(a dataset name) the tuned settings and how they were measured. A group of loaders tuned as
one (``MultiAutotuner``) is one entry whose ``members`` hold each loader's settings by name
(schema 2; a profile without group entries is written as schema 1, which older autotune
reads). Read with safe YAML
loading only (no tag ever constructs an object); written atomically (temporary file in the
same directory, then rename) under a lock on the directory, merging with what is on disk.

Lookup (``find_profile``): this host's file if its fingerprint matches, else the newest file
whose fingerprint matches, since containers and cluster jobs get a new hostname every run.
Every filesystem failure (directory is a file, not writable, disk full, unreadable file)
becomes one ``ProfileError`` line naming the path and the fix, never a raw ``OSError``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch.utils.data import Subset

from ..config import SETTINGS, LoaderConfig
from ..errors import InvalidConfigError, ProfileError
from ..records import HardwareInfo
from ._io import ELSEWHERE, PROFILE_DIR_ENV, fs_error, locked, make_dir, write_all, write_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2 added group entries (``members``)
DEFAULT_PROFILE_DIR = "profiles"
_KEY = re.compile(r"\w[\w.:+-]{0,127}")
_TOP_LEVEL = {"schema_version", "hostname", "fingerprint", "updated", "hardware", "loaders"}


@dataclass(frozen=True, kw_only=True)
class ProfileEntry:
    """Tuned settings for one key, and how they were measured (free-form plain data).

    A group's entry has ``members`` (loader name -> settings) and no ``settings``;
    ``member(name)`` is one loader's part of it.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    measured: Mapping[str, Any] = field(default_factory=dict)
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    loader: str | None = None  # the loader of a group this entry is a part of (not stored)

    def member(self, name: str) -> ProfileEntry:
        return ProfileEntry(settings=self.members[name], measured=self.measured, loader=name)

    def reason(self, key: str | None) -> str:
        """Why a setting came from this entry, for ``LoaderConfig.explain()``."""
        rate = self.measured.get("samples_per_s")
        loop = " of the loop" if self.loader is not None else ""
        measured = (f", {rate:,.0f} samples/s{loop} measured"
                    if isinstance(rate, (int, float)) else "")
        part = f", loader {self.loader!r} of the group" if self.loader is not None else ""
        return f"tuned on this host (profile key {key!r}{part}{measured})"

    def to_dict(self) -> dict[str, Any]:
        stored = ({"members": _plain(self.members)} if self.members
                  else {"settings": _plain(self.settings)})
        return {**stored, "measured": _plain(self.measured)}


@dataclass(frozen=True, kw_only=True)
class Profile:
    hostname: str
    fingerprint: str
    hardware: Mapping[str, Any]
    loaders: Mapping[str, ProfileEntry] = field(default_factory=dict)
    updated: str | None = None
    schema_version: int = SCHEMA_VERSION

    def applies_to(self, hw: HardwareInfo) -> bool:
        return self.fingerprint == hw.fingerprint

    def to_dict(self) -> dict[str, Any]:
        groups = any(entry.members for entry in self.loaders.values())
        return {
            "schema_version": SCHEMA_VERSION if groups else 1,  # what a reader needs
            "hostname": self.hostname,
            "fingerprint": self.fingerprint,
            "updated": self.updated,
            "hardware": _plain(self.hardware),
            "loaders": {key: entry.to_dict() for key, entry in sorted(self.loaders.items())},
        }

    @classmethod
    def from_dict(cls, data: Any, *, path: object = "<profile>") -> Profile:
        """Validate plain data; every problem raises ``ProfileError`` naming the field."""
        if not isinstance(data, Mapping):
            raise ProfileError(path, None,
                               f"expected a mapping at the top, got {type(data).__name__}")
        version = data.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ProfileError(path, "schema_version", f"must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise ProfileError(path, "schema_version",
                               f"{version} is newer than this autotune reads ({SCHEMA_VERSION}); "
                               "upgrade autotune or re-run `autotune probe --save`")
        if version < 1:
            raise ProfileError(path, "schema_version", f"{version} is not a schema version")
        unknown = set(data) - _TOP_LEVEL
        if unknown:
            raise ProfileError(path, sorted(unknown)[0],
                               f"unknown field; schema {SCHEMA_VERSION} has {sorted(_TOP_LEVEL)}")
        for name in ("hostname", "fingerprint"):
            if not isinstance(data.get(name), str):
                raise ProfileError(path, name, f"must be a string, got {data.get(name)!r}")
        hardware = data.get("hardware") or {}
        if not isinstance(hardware, Mapping):
            raise ProfileError(path, "hardware", "must be a mapping")
        loaders = data.get("loaders") or {}
        if not isinstance(loaders, Mapping):
            raise ProfileError(path, "loaders", "must be a mapping of key -> entry")
        return cls(
            schema_version=version, hostname=data["hostname"], fingerprint=data["fingerprint"],
            updated=None if data.get("updated") is None else str(data["updated"]),
            hardware=dict(hardware),
            loaders={str(key): _entry(path, key, raw) for key, raw in loaders.items()},
        )


def _entry(path: object, key: Any, raw: Any) -> ProfileEntry:
    where = f"loaders.{key}"
    try:
        check_key(key)
    except InvalidConfigError as exc:
        raise ProfileError(path, where, str(exc)) from None
    if not isinstance(raw, Mapping) or ("settings" in raw) == ("members" in raw):
        raise ProfileError(path, f"{where}.settings", "each entry needs a 'settings' mapping "
                           "(or, for a group of loaders, a 'members' mapping), not both")
    unknown = set(raw) - {"settings", "members", "measured"}
    if unknown:
        raise ProfileError(path, f"{where}.{sorted(unknown)[0]}", "unknown field")
    measured = raw.get("measured") or {}
    if not isinstance(measured, Mapping):
        raise ProfileError(path, f"{where}.measured", "must be a mapping")
    if "settings" in raw:
        return ProfileEntry(settings=_settings(path, f"{where}.settings", raw["settings"]),
                            measured=dict(measured))
    members = raw["members"]
    if not isinstance(members, Mapping) or not members:
        raise ProfileError(path, f"{where}.members",
                           "must be a mapping of loader name -> settings")
    return ProfileEntry(members={str(name): _settings(path, f"{where}.members.{name}", value)
                                 for name, value in members.items()},
                        measured=dict(measured))


def _settings(path: object, where: str, raw: Any) -> dict[str, Any]:
    """One loader's tuned settings, each checked as ``LoaderConfig`` checks it."""
    if not isinstance(raw, Mapping):
        raise ProfileError(path, where, "must be a mapping of setting -> value")
    unknown = set(raw) - set(SETTINGS)
    if unknown:
        raise ProfileError(path, f"{where}.{sorted(unknown)[0]}",
                           f"unknown setting; settings are {', '.join(SETTINGS)}")
    try:
        LoaderConfig(**raw)
    except InvalidConfigError as exc:
        raise ProfileError(path, where, str(exc)) from None
    return dict(raw)


def check_key(key: Any) -> str:
    """A profile key is a short name: letters, digits and ``_ . : + -``, no path parts."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidConfigError(
            f"profile key {key!r} must be 1-128 letters, digits or _.:+- "
            "(starting with a letter, digit or _), e.g. 'my-dataset'")
    return key


def dataset_key(dataset: Any) -> str:
    """Default profile key: the class name of the dataset under any ``Subset`` wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return type(dataset).__name__


def group_key(datasets: Mapping[str, Any]) -> str:
    """Default profile key of a group of loaders: their datasets' keys joined by ``+``."""
    return "+".join(dataset_key(dataset) for dataset in datasets.values())[:128]


def profile_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """``directory`` if given, else ``$AUTOTUNE_PROFILE_DIR``, else ``./profiles``."""
    folder = directory or os.environ.get(PROFILE_DIR_ENV) or DEFAULT_PROFILE_DIR
    if "\x00" in os.fspath(folder):
        raise ProfileError(repr(os.fspath(folder)), None,
                           f"a path cannot contain a NUL byte: {ELSEWHERE}")
    return Path(folder)


def profile_path(hostname: str, directory: str | os.PathLike[str] | None = None) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", hostname).strip(".") or "host"
    return profile_dir(directory) / f"{safe}.yaml"


def load_profile(path: str | os.PathLike[str]) -> Profile | None:
    """The profile at path; ``None`` if there is no file; ``ProfileError`` if unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise fs_error(exc, Path(path), "read") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(path, None, f"not UTF-8 text ({exc.reason} at byte {exc.start}): "
                                       "a profile is YAML; delete it or re-run `autotune tune`"
                           ) from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ProfileError(path, None, "not a profile: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ProfileError(path, None, f"not valid YAML{at}: {problem}") from None
    return Profile.from_dict(data, path=path)


@dataclass(frozen=True, kw_only=True)
class ProfileLookup:
    """Which profile applies to this machine, and why (``autotune show`` prints ``why``)."""

    profile: Profile | None  # the profile that applies to this machine, or None
    path: Path | None  # the file it came from (or the host's own file that did not apply)
    why: str  # one calm line: which file applied and why, or why none did


def find_profile(hw: HardwareInfo,
                 directory: str | os.PathLike[str] | None = None) -> ProfileLookup:
    """The profile for this machine: by hostname first, then by hardware fingerprint.

    Containers and cluster jobs get a new hostname every run, so a file tuned in an earlier
    pod is found again by its fingerprint (the newest by ``updated`` if several match).
    Other hosts' unusable files are skipped; this host's own unusable file, or a directory
    that cannot be listed, raises ``ProfileError``. A missing directory is no profile.

    Args:
        hw: this machine (``probe_hardware()``).
        directory: the profile directory (default: ``$AUTOTUNE_PROFILE_DIR`` or ./profiles).
    """
    folder = profile_dir(directory)
    own_path = profile_path(hw.host.hostname, directory)
    host, fp = hw.host.hostname, hw.fingerprint
    files = _yaml_files(folder)
    if files is None:
        return ProfileLookup(profile=None, path=None, why=f"no profile: {folder}/ does not "
                                                         "exist yet (the first save creates it)")
    own = load_profile(own_path) if own_path in files else None
    if own is not None and own.applies_to(hw):
        return ProfileLookup(profile=own, path=own_path,
                             why=f"{own_path}: this host's profile (hostname {host}, "
                                 f"fingerprint {fp})")
    others = ((_other_host(path), path) for path in files if path != own_path)
    matches = [(p, path) for p, path in others if p is not None and p.applies_to(hw)]
    if matches:
        profile, path = max(matches, key=lambda m: (_when(m[0].updated), m[1].name))
        newest = f" (newest of {len(matches)})" if len(matches) > 1 else ""
        own_note = (f"{own_path} is from other hardware (fingerprint {own.fingerprint})"
                    if own is not None else f"no profile named for host {host}")
        return ProfileLookup(profile=profile, path=path,
                             why=f"{own_note}; {path} matches this hardware's fingerprint "
                                 f"{fp}{newest}")
    if own is not None:
        return ProfileLookup(profile=None, path=own_path,
                             why=f"{own_path} was tuned on other hardware (fingerprint "
                                 f"{own.fingerprint}, this machine {fp}): not applied; "
                                 "run `autotune tune` here")
    return ProfileLookup(profile=None, path=None,
                         why=f"no profile in {folder}/ matches this machine "
                             f"(fingerprint {fp})")


def _yaml_files(folder: Path) -> list[Path] | None:
    """The ``*.yaml`` files in folder, ``None`` if it does not exist."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise fs_error(exc, folder, "list") from None
    return [folder / n for n in names if n.endswith(".yaml") and not n.startswith(".")]


def _other_host(path: Path) -> Profile | None:
    """Another host's profile, or ``None`` if it cannot be used (not this host's problem)."""
    try:
        return load_profile(path)
    except ProfileError as exc:
        log.debug("skipping %s while looking for a matching profile: %s", path, exc)
        return None


def _when(updated: str | None) -> _dt.datetime:
    """``updated`` as an aware time for 'newest wins'; missing or unreadable is oldest."""
    try:
        when = _dt.datetime.fromisoformat(str(updated))
    except ValueError:
        return _dt.datetime.min.replace(tzinfo=_dt.UTC)
    return when if when.tzinfo else when.replace(tzinfo=_dt.UTC)


def check_writable(directory: str | os.PathLike[str] | None = None) -> Path:
    """Raise the ``ProfileError`` a save would, before a long ``autotune tune`` starts.

    Creates the directory (parents too) if missing, as a save would, and writes and removes
    a small temporary file in it. Returns the directory.
    """
    folder = make_dir(profile_dir(directory))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".autotune-check.", suffix=".tmp")
        try:
            write_all(fd, b"autotune write check\n")
            os.fsync(fd)  # where allocation is delayed, a full disk shows only here
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        raise fs_error(exc, folder, "write") from None
    return folder


def new_profile(hw: HardwareInfo) -> Profile:
    return Profile(hostname=hw.host.hostname, fingerprint=hw.fingerprint, hardware=hw.to_dict())


def update_profile(path: str | os.PathLike[str],
                   change: Callable[[Profile | None], Profile]) -> Profile:
    """Read, change and write back under a lock, so concurrent writers lose no entry."""
    path = Path(path)
    make_dir(path.parent)
    with locked(path):
        profile = change(load_profile(path))
        profile = dataclasses.replace(profile, updated=_now())
        write_atomic(path, yaml.safe_dump(profile.to_dict(), sort_keys=False))
    return profile


def save_hardware(hw: HardwareInfo, directory: str | os.PathLike[str] | None = None) -> Path:
    """Write or refresh this host's facts, keeping its tuned entries if the hardware is the same."""
    path = profile_path(hw.host.hostname, directory)

    def change(old: Profile | None) -> Profile:
        keep = old.loaders if old is not None and old.applies_to(hw) else {}
        return dataclasses.replace(new_profile(hw), loaders=keep)

    update_profile(path, change)
    return path


def save_entry(hw: HardwareInfo, key: str, entry: ProfileEntry,
               directory: str | os.PathLike[str] | None = None) -> Path:
    """Merge one tuned entry into this host's profile; other keys are kept."""
    check_key(key)
    path = profile_path(hw.host.hostname, directory)

    def change(old: Profile | None) -> Profile:
        if old is None or not old.applies_to(hw):
            old = new_profile(hw)  # a profile from other hardware is replaced, not mixed
        return dataclasses.replace(old, loaders={**old.loaders, key: entry})

    update_profile(path, change)
    return path


def _plain(value: Any) -> Any:
    """Plain YAML-safe data: tuples become lists, mapping proxies become dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
