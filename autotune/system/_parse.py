"""Pure parsers over the text of /proc, /sys and cgroup files.

No function here touches the system: each takes file text and returns plain values,
``None`` where the text says "unknown" or "no limit". ``hardware.py`` does the reading.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

# cgroup v1 writes "no limit" as a page-aligned LONG_MAX (9223372036854771712); anything
# this large is no limit on any real machine.
NO_LIMIT_THRESHOLD = 1 << 60


@dataclass(frozen=True)
class CgroupMount:
    """One cgroup filesystem mount from /proc/self/mountinfo."""

    mount_point: str
    root: str  # the cgroup path the mount exposes at mount_point
    version: int  # 1 or 2
    controllers: frozenset[str]  # v1 controllers of this hierarchy; empty for v2


def parse_cpu_max(text: str | None) -> float | None:
    """cgroup v2 ``cpu.max`` ("200000 100000", or "max 100000") -> CPUs allowed."""
    if not text:
        return None
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return _quota_cpus(int(parts[0]), period)


def parse_cfs_quota(quota_text: str | None, period_text: str | None) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` -> CPUs allowed (-1 is none)."""
    if not quota_text or not period_text:
        return None
    return _quota_cpus(int(quota_text.strip()), int(period_text.strip()))


def _quota_cpus(quota: int, period: int) -> float | None:
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_memory_limit(text: str | None) -> int | None:
    """v2 ``memory.max`` or v1 ``memory.limit_in_bytes`` -> bytes, ``None`` for no limit."""
    if not text:
        return None
    value = text.strip()
    if value == "max":
        return None
    limit = int(value)
    return None if limit >= NO_LIMIT_THRESHOLD else limit


def parse_int(text: str | None) -> int | None:
    """A file holding one integer (memory.current, usage_in_bytes)."""
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def parse_keyed_ints(text: str | None) -> dict[str, int]:
    """'key value' lines (memory.stat); values that are not integers are skipped."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_meminfo(text: str | None) -> dict[str, int]:
    """/proc/meminfo -> {field: bytes}."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[name.strip()] = int(parts[0]) * scale
    return out


def parse_cpuinfo(text: str | None) -> tuple[int | None, int | None, str | None]:
    """/proc/cpuinfo -> (logical CPUs, physical cores, model name); ``None`` where absent."""
    logical = 0
    cores: set[tuple[str, str]] = set()
    model = None
    physical_id = core_id = None
    for line in [*(text or "").splitlines(), ""]:  # "" ends the last block
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            logical += 1
        elif key in ("model name", "Model", "cpu model") and model is None:
            model = value or None
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif not key:
            if physical_id is not None and core_id is not None:
                cores.add((physical_id, core_id))
            physical_id = core_id = None
    return (logical or None), (len(cores) or None), model


def parse_proc_cgroup(text: str | None) -> dict[str, str]:
    """/proc/self/cgroup -> {controller: path}; the v2 unified entry is under key ""."""
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            out[""] = path
        for name in controllers.split(","):
            if name:
                out[name] = path
    return out


def parse_cgroup_mounts(text: str | None) -> list[CgroupMount]:
    """The cgroup and cgroup2 mounts listed in /proc/self/mountinfo."""
    mounts = []
    for line in (text or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            mounts.append(CgroupMount(fields[4], fields[3], 2, frozenset()))
        elif fstype == "cgroup":
            mounts.append(CgroupMount(fields[4], fields[3], 1, frozenset(options)))
    return mounts


def cgroup_dirs(controller: str, proc_cgroup: dict[str, str],
                mounts: list[CgroupMount]) -> list[str]:
    """Directories holding this process's limits for a controller, innermost first.

    Tries v1 (a hierarchy mounted with that controller) first, then v2. The list walks up
    to the mount point, because a limit set on a parent cgroup binds the children too.
    """
    for mount in mounts:
        if mount.version == 1 and controller in mount.controllers and controller in proc_cgroup:
            return _dirs_under(mount, proc_cgroup[controller])
    for mount in mounts:
        if mount.version == 2 and "" in proc_cgroup:
            return _dirs_under(mount, proc_cgroup[""])
    return []


def _dirs_under(mount: CgroupMount, path: str) -> list[str]:
    relative = posixpath.relpath(path, mount.root) if path.startswith(mount.root) else "."
    if relative.startswith(".."):
        relative = "."  # our cgroup lies outside this mount's view (a namespaced container)
    dirs = []
    current = posixpath.normpath(posixpath.join(mount.mount_point, relative))
    while True:
        dirs.append(current)
        if current == posixpath.normpath(mount.mount_point):
            return dirs
        current = posixpath.dirname(current)
