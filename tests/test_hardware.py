"""Tests of autotune.system._parse (inline file text) and autotune.system.hardware
(canned file trees).

The trees under tests/data/sys/<scenario>/ hold /proc and cgroup files as Linux writes them:

  bare_metal          8 logical CPUs (4 cores x 2), cgroup v2, cpu.max "max", memory.max "max"
  cgroup_v2_quota     64-CPU host, docker with a cgroup namespace (path "/"): 2 CPUs, 4 GiB
  cgroup_v2_nested    host cgroup namespace, path /kubepods/pod1/ctr: the 2 CPU / 4 GiB limit
                      is on the parent pod1, ctr itself says "max"
  cgroup_v1_quota     docker on cgroup v1: cfs 150000/100000 (1.5 CPUs), 2 GiB, small host
  cgroup_v1_no_limit  aarch64 host on cgroup v1: quota -1, limit 9223372036854771712
  empty               nothing readable at all
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import autotune
from autotune.system import _parse as sp
from autotune.system import hardware
from autotune.records import HardwareInfo
from autotune.system.hardware import SystemFiles, read_hardware
from fakes import H100, FakeNvml, NVMLError_NotSupported, fake_gpu, fake_hardware

GIB = 1 << 30
MIB = 1 << 20
DATA = Path(__file__).parent / "data" / "sys"
pytestmark = pytest.mark.timeout(30)  # a runaway walk up the cgroup tree fails, not hangs

SCENARIOS = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def read(scenario: str, **kwargs) -> HardwareInfo:
    """read_hardware over a canned tree; no env, no GPUs, unless the test says otherwise."""
    kwargs.setdefault("env", {})
    kwargs.setdefault("nvml", FakeNvml())
    return read_hardware(root=str(DATA / scenario), **kwargs)


def assert_round_trips(hw: HardwareInfo) -> None:
    """to_dict() is JSON data and from_dict() rebuilds an equal record from it."""
    data = hw.to_dict()
    text = json.dumps(data)  # raises TypeError on anything that is not plain data
    assert json.loads(text) == data  # already JSON types: lists, not tuples
    rebuilt = HardwareInfo.from_dict(json.loads(text))
    assert rebuilt == hw
    assert rebuilt.to_dict() == data
    assert data["cpu_budget"] == hw.cpu_budget and data["fingerprint"] == hw.fingerprint


# --- _sysparse: cgroup CPU limits -------------------------------------------------------

@pytest.mark.parametrize("text, cpus", [
    ("200000 100000\n", 2.0),
    ("150000 100000\n", 1.5),
    ("50000 100000", 0.5),
    ("400000 200000\n", 2.0),
    ("300000\n", 3.0),  # period left out: the kernel default of 100000
    ("max 100000\n", None),
    ("max\n", None),
    ("", None),
    (None, None),
])
def test_parse_cpu_max(text, cpus):
    assert sp.parse_cpu_max(text) == cpus


@pytest.mark.parametrize("quota, period, cpus", [
    ("150000\n", "100000\n", 1.5),
    ("200000\n", "100000\n", 2.0),
    ("-1\n", "100000\n", None),
    ("0\n", "100000\n", None),
    ("100000\n", "0\n", None),
    (None, "100000\n", None),
    ("150000\n", None, None),
])
def test_parse_cfs_quota(quota, period, cpus):
    assert sp.parse_cfs_quota(quota, period) == cpus


# --- _sysparse: memory ------------------------------------------------------------------

@pytest.mark.parametrize("text, limit", [
    ("4294967296\n", 4 * GIB),
    ("2147483648", 2 * GIB),
    ("max\n", None),  # v2 no limit
    ("9223372036854771712\n", None),  # v1 no limit: page-aligned LONG_MAX
    ("9223372036854775807\n", None),
    ("", None),
    (None, None),
])
def test_parse_memory_limit(text, limit):
    assert sp.parse_memory_limit(text) == limit


@pytest.mark.parametrize("text, value", [
    ("3221225472\n", 3221225472), ("0\n", 0), ("", None), (None, None), ("max\n", None),
])
def test_parse_int(text, value):
    assert sp.parse_int(text) == value


def test_parse_keyed_ints_reads_memory_stat():
    text = ("anon 1879048192\nfile 1275068416\ninactive_file 1073741824\n"
            "total_inactive_file 536870912\nsome_key not_a_number\nlonely\nneg -5\n")
    assert sp.parse_keyed_ints(text) == {
        "anon": 1879048192, "file": 1275068416, "inactive_file": 1073741824,
        "total_inactive_file": 536870912, "neg": -5,
    }
    assert sp.parse_keyed_ints(None) == {}


def test_parse_meminfo_scales_kb_to_bytes():
    text = ("MemTotal:       16384000 kB\nMemFree:         8388608 kB\n"
            "MemAvailable:   12582912 kB\nHugePages_Total:       0\n"
            "HugePages_Free:        7\nHugepagesize:       2048 kB\n")
    info = sp.parse_meminfo(text)
    assert info["MemTotal"] == 16384000 * 1024
    assert info["MemAvailable"] == 12582912 * 1024
    assert info["HugePages_Free"] == 7  # no unit: a count, not scaled
    assert info["Hugepagesize"] == 2 * MIB
    assert sp.parse_meminfo(None) == {} and sp.parse_meminfo("") == {}


# --- _sysparse: /proc/cpuinfo -----------------------------------------------------------

def _x86_block(processor: int, physical: int, core: int) -> str:
    return (f"processor\t: {processor}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
            f"model\t\t: 85\nmodel name\t: Intel(R) Xeon(R) Gold 6226R CPU @ 2.90GHz\n"
            f"physical id\t: {physical}\nsiblings\t: 4\ncore id\t\t: {core}\n"
            f"cpu cores\t: 2\nflags\t\t: fpu vme de pse\npower management:\n\n")


def test_parse_cpuinfo_x86_counts_logical_physical_and_model():
    # 2 sockets x 2 cores x 2 threads; core id 0 on socket 0 and socket 1 are different cores
    blocks = [_x86_block(p, physical=(p // 2) % 2, core=p % 2) for p in range(8)]
    assert sp.parse_cpuinfo("".join(blocks)) == (
        8, 4, "Intel(R) Xeon(R) Gold 6226R CPU @ 2.90GHz")


def test_parse_cpuinfo_last_block_without_trailing_blank_line():
    text = _x86_block(0, 0, 0) + _x86_block(1, 0, 1).rstrip("\n")
    assert sp.parse_cpuinfo(text)[:2] == (2, 2)


def test_parse_cpuinfo_arm_has_no_topology_or_model():
    block = ("processor\t: {}\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes\n"
             "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0c\n\n")
    assert sp.parse_cpuinfo("".join(block.format(p) for p in range(4))) == (4, None, None)


def test_parse_cpuinfo_missing():
    assert sp.parse_cpuinfo(None) == (None, None, None)
    assert sp.parse_cpuinfo("") == (None, None, None)


# --- _sysparse: /proc/self/cgroup, mountinfo, cgroup_dirs -------------------------------

def test_parse_proc_cgroup_v1_and_v2_lines():
    text = ("12:pids:/docker/abc\n3:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n"
            "1:name=systemd:/docker/abc\n0::/system.slice/containerd.service\n")
    assert sp.parse_proc_cgroup(text) == {
        "pids": "/docker/abc", "cpu": "/docker/abc", "cpuacct": "/docker/abc",
        "memory": "/docker/abc", "name=systemd": "/docker/abc",
        "": "/system.slice/containerd.service",
    }


def test_parse_proc_cgroup_v2_only_and_junk():
    assert sp.parse_proc_cgroup("0::/\n") == {"": "/"}
    assert sp.parse_proc_cgroup("0::/user.slice/a:b.scope\n")[""] == "/user.slice/a:b.scope"
    assert sp.parse_proc_cgroup("garbage\n\n") == {} and sp.parse_proc_cgroup(None) == {}


MOUNTINFO = """\
28 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
30 24 0:25 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,inode64
32 22 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
712 710 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid,relatime master:15 - cgroup cgroup rw,memory
713 710 0:33 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,relatime master:16 - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
a broken line
"""


def test_parse_cgroup_mounts():
    mounts = sp.parse_cgroup_mounts(MOUNTINFO)
    assert [(m.mount_point, m.root, m.version) for m in mounts] == [
        ("/sys/fs/cgroup", "/", 2),
        ("/sys/fs/cgroup/memory", "/docker/abc", 1),
        ("/sys/fs/cgroup/cpu,cpuacct", "/docker/abc", 1),
        ("/sys/fs/cgroup/systemd", "/", 1),
    ]
    assert mounts[0].controllers == frozenset()
    assert {"cpu", "cpuacct"} <= mounts[2].controllers and "memory" not in mounts[2].controllers
    assert "name=systemd" in mounts[3].controllers
    assert sp.parse_cgroup_mounts(None) == []


def _v2(root: str = "/", point: str = "/sys/fs/cgroup") -> sp.CgroupMount:
    return sp.CgroupMount(point, root, 2, frozenset())


def test_cgroup_dirs_v2_walks_up_to_the_mount_point():
    assert sp.cgroup_dirs("cpu", {"": "/kubepods/pod1/ctr"}, [_v2()]) == [
        "/sys/fs/cgroup/kubepods/pod1/ctr", "/sys/fs/cgroup/kubepods/pod1",
        "/sys/fs/cgroup/kubepods", "/sys/fs/cgroup",
    ]
    assert sp.cgroup_dirs("memory", {"": "/"}, [_v2()]) == ["/sys/fs/cgroup"]


def test_cgroup_dirs_v1_uses_the_hierarchy_with_that_controller():
    mounts = sp.parse_cgroup_mounts(MOUNTINFO)
    proc = sp.parse_proc_cgroup("3:cpu,cpuacct:/docker/abc/inner\n2:memory:/docker/abc\n0::/x\n")
    assert sp.cgroup_dirs("cpu", proc, mounts) == [
        "/sys/fs/cgroup/cpu,cpuacct/inner", "/sys/fs/cgroup/cpu,cpuacct"]
    assert sp.cgroup_dirs("memory", proc, mounts) == ["/sys/fs/cgroup/memory"]
    # a controller with no v1 hierarchy falls back to the v2 mount
    assert sp.cgroup_dirs("io", proc, mounts) == ["/sys/fs/cgroup/x", "/sys/fs/cgroup"]


def test_cgroup_dirs_namespaced_container_outside_the_mount_root():
    # The mount exposes /kubepods/pod1/ctr, but /proc/self/cgroup (read in the container's
    # cgroup namespace) says "/": our cgroup is what is mounted, so the mount point itself.
    assert sp.cgroup_dirs("cpu", {"": "/"}, [_v2(root="/kubepods/pod1/ctr")]) == [
        "/sys/fs/cgroup"]
    assert sp.cgroup_dirs("cpu", {"": "/kubepods/other"}, [_v2(root="/kubepods/pod1")]) == [
        "/sys/fs/cgroup"]
    # a prefix of the name is not a parent directory
    assert sp.cgroup_dirs("cpu", {"": "/kubepods10/x"}, [_v2(root="/kubepods1")]) == [
        "/sys/fs/cgroup"]


def test_cgroup_dirs_without_mounts_or_entries():
    assert sp.cgroup_dirs("cpu", {"": "/a"}, []) == []
    assert sp.cgroup_dirs("cpu", {}, [_v2()]) == []


# --- read_hardware: CPUs ----------------------------------------------------------------

def test_bare_metal_uses_every_cpu():
    cpu = read("bare_metal").cpu
    assert (cpu.logical, cpu.physical, cpu.quota, cpu.usable, cpu.affinity) == (
        8, 4, None, 8, None)
    assert cpu.model == "Intel(R) Core(TM) i7-7700K CPU @ 4.20GHz"


def test_affinity_without_quota_gives_its_size():
    cpu = read("bare_metal", affinity={0, 1, 2}).cpu
    assert cpu.usable == 3 and cpu.affinity == (0, 1, 2) and cpu.quota is None


def test_container_limited_to_2_cpus_on_a_64_cpu_host():
    cpu = read("cgroup_v2_quota", affinity=set(range(64))).cpu
    assert (cpu.logical, cpu.physical, cpu.quota, cpu.usable) == (64, 32, 2.0, 2)
    assert read("cgroup_v2_quota").cpu.usable == 2  # no affinity given: logical, capped


def test_quota_on_a_parent_cgroup_binds_the_child():
    cpu = read("cgroup_v2_nested", affinity=set(range(16))).cpu
    assert (cpu.logical, cpu.quota, cpu.usable) == (16, 2.0, 2)


def test_cgroup_v1_fractional_quota_rounds_down():
    cpu = read("cgroup_v1_quota", affinity=set(range(16))).cpu
    assert (cpu.logical, cpu.physical, cpu.quota, cpu.usable) == (16, 8, 1.5, 1)


def test_cgroup_v1_without_quota():
    cpu = read("cgroup_v1_no_limit").cpu
    assert (cpu.logical, cpu.physical, cpu.model, cpu.quota, cpu.usable) == (
        4, None, None, None, 4)


def _v2_cpu_tree(root: Path, cpu_max: dict[str, str], path: str = "/") -> str:
    """A cgroup v2 tree: the process in ``path``, ``cpu_max`` maps cgroup dirs to cpu.max."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(f"0::{path}\n")
    (root / "proc/self/mountinfo").write_text(
        "32 22 0:27 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n")
    for cgroup, text in cpu_max.items():
        directory = root / "sys/fs/cgroup" / cgroup.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(text)
    return str(root)


def test_quota_smaller_than_one_cpu_still_gives_one(tmp_path):
    root = _v2_cpu_tree(tmp_path, {"/": "50000 100000\n"})
    cpu = read_hardware(root, env={}, affinity={0, 1, 2, 3}).cpu
    assert (cpu.quota, cpu.usable) == (0.5, 1)


def test_the_tightest_quota_on_the_path_wins(tmp_path):
    # a child may ask for more than its parent allows; the parent's 3 CPUs still bind it
    root = _v2_cpu_tree(tmp_path, {"/a": "300000 100000\n", "/a/b": "800000 100000\n",
                                   "/a/b/c": "max 100000\n"}, path="/a/b/c")
    cpu = read_hardware(root, env={}, affinity=set(range(16))).cpu
    assert (cpu.quota, cpu.usable) == (3.0, 3)


def test_missing_files_do_not_raise_and_are_none():
    hw = read("empty", affinity={0, 1, 2, 3, 4})
    assert (hw.cpu.logical, hw.cpu.physical, hw.cpu.model, hw.cpu.quota) == (
        None, None, None, None)
    assert hw.cpu.usable == 5  # falls back to the affinity set
    memory = hw.memory
    assert (memory.total_bytes, memory.host_available_bytes, memory.limit_bytes,
            memory.available_bytes, memory.shm_total_bytes, memory.shm_free_bytes) == (
        None,) * 6
    assert hw.gpus == () and hw.accelerator is None
    assert read("empty").cpu.usable == 1  # nothing known at all: 1, never 0


# --- read_hardware: memory --------------------------------------------------------------

def test_bare_metal_memory_has_no_limit():
    memory = read("bare_metal").memory
    assert memory.total_bytes == 16384000 * 1024
    assert memory.host_available_bytes == memory.available_bytes == 12582912 * 1024
    assert memory.limit_bytes is None


def test_v2_container_memory_is_limit_minus_non_reclaimable_usage():
    memory = read("cgroup_v2_quota").memory
    assert memory.limit_bytes == 4 * GIB
    assert memory.host_available_bytes == 209715200 * 1024  # 200 GiB on the host
    # 4 GiB - (3 GiB memory.current - 1 GiB inactive_file) = 2 GiB, less than the host's
    assert memory.available_bytes == 2 * GIB


def test_v2_memory_limit_on_the_parent_uses_the_parents_usage():
    memory = read("cgroup_v2_nested").memory
    assert memory.limit_bytes == 4 * GIB
    # pod1: 4 GiB - (1 GiB - 256 MiB inactive_file)
    assert memory.available_bytes == 4 * GIB - (1 * GIB - 256 * MIB)


def test_v1_memory_available_is_the_smaller_of_host_and_cgroup():
    memory = read("cgroup_v1_quota").memory
    assert memory.limit_bytes == 2 * GIB
    # cgroup: 2 GiB - (1.5 GiB usage - 512 MiB total_inactive_file) = 1 GiB;
    # the host has only 900 MiB available, so the host wins
    assert memory.host_available_bytes == 900 * MIB
    assert memory.available_bytes == 900 * MIB


def test_v1_no_limit_is_none():
    memory = read("cgroup_v1_no_limit").memory
    assert memory.limit_bytes is None
    assert memory.available_bytes == memory.host_available_bytes == 6 * GIB


def _v1_memory_tree(root: Path, *, limit: int, usage: int, stat: str, path: str = "/") -> str:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(f"2:memory:{path}\n")
    (root / "proc/self/mountinfo").write_text(
        "712 710 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n")
    (root / "proc/meminfo").write_text("MemTotal:       65011712 kB\n"
                                       "MemAvailable:   50331648 kB\n")
    limited = root / "sys/fs/cgroup/memory"
    (limited / path.strip("/")).mkdir(parents=True, exist_ok=True)
    (limited / "memory.limit_in_bytes").write_text(f"{limit}\n")
    (limited / "memory.usage_in_bytes").write_text(f"{usage}\n")
    (limited / "memory.stat").write_text(stat)
    return str(root)


def test_cgroup_usage_above_limit_gives_zero_available(tmp_path):
    root = _v1_memory_tree(tmp_path, limit=1 * GIB, usage=2 * GIB,
                           stat="inactive_file 0\ntotal_inactive_file 0\n")
    assert read_hardware(root, env={}).memory.available_bytes == 0


def test_cgroup_inactive_file_above_usage_counts_as_no_usage(tmp_path):
    root = _v1_memory_tree(tmp_path, limit=1 * GIB, usage=100 * MIB,
                           stat="inactive_file 200000000\ntotal_inactive_file 200000000\n")
    assert read_hardware(root, env={}).memory.available_bytes == 1 * GIB


def test_v1_limit_on_parent_counts_the_childrens_inactive_file(tmp_path):
    # /kubepods/pod1 holds the limit; the process lives in /kubepods/pod1/ctr, so pod1's own
    # inactive_file is 0 while total_inactive_file (pod1 + children) is 1 GiB.
    root = _v1_memory_tree(tmp_path / "t", limit=4 * GIB, usage=3 * GIB,
                           stat="inactive_file 0\ntotal_inactive_file 1073741824\n",
                           path="/kubepods/pod1/ctr")
    limited = tmp_path / "t/sys/fs/cgroup/memory"
    for name in ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"):
        (limited / name).rename(limited / "kubepods/pod1" / name)
    (limited / "kubepods/pod1/ctr/memory.limit_in_bytes").write_text("9223372036854771712\n")
    memory = read_hardware(root, env={}).memory
    assert memory.limit_bytes == 4 * GIB
    assert memory.available_bytes == 4 * GIB - (3 * GIB - 1 * GIB)


def test_the_tightest_memory_limit_on_the_path_wins(tmp_path):
    root = _v1_memory_tree(tmp_path / "t", limit=4 * GIB, usage=1 * GIB,
                           stat="inactive_file 0\ntotal_inactive_file 0\n",
                           path="/kubepods/pod1/ctr")
    limited = tmp_path / "t/sys/fs/cgroup/memory"
    for name in ("memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"):
        (limited / name).rename(limited / "kubepods/pod1" / name)
    (limited / "kubepods/pod1/ctr/memory.limit_in_bytes").write_text(f"{8 * GIB}\n")
    (limited / "kubepods/pod1/ctr/memory.usage_in_bytes").write_text(f"{1 * GIB}\n")
    memory = read_hardware(root, env={}).memory
    assert memory.limit_bytes == 4 * GIB
    assert memory.available_bytes == 3 * GIB


def test_small_dev_shm_is_reported(monkeypatch):
    # /dev/shm is measured with statvfs, which no canned file can answer: patch it to a
    # docker-default 64 MB tmpfs (cgroup_v2_quota's mountinfo shows size=65536k).
    seen = []

    def statvfs(self, path):
        seen.append(path)
        return (64 * MIB, 64 * MIB) if path == "/dev/shm" else None

    monkeypatch.setattr(SystemFiles, "statvfs", statvfs)
    hw = read("cgroup_v2_quota")
    assert seen == ["/dev/shm"]
    assert (hw.memory.shm_total_bytes, hw.memory.shm_free_bytes) == (64 * MIB, 64 * MIB)
    assert hw.to_dict()["memory"]["shm_free_bytes"] == 67108864
    assert_round_trips(hw)


# --- read_hardware: GPUs through NVML ---------------------------------------------------

def test_no_gpus():
    nvml = FakeNvml(gpus=[])
    assert read("empty", nvml=nvml).gpus == ()
    assert (nvml.init_calls, nvml.shutdown_calls) == (1, 1)


def test_one_h100():
    nvml = FakeNvml(gpus=[dict(name="NVIDIA H100 80GB HBM3", total=80 << 30, free=79 << 30,
                               cc=(9, 0), pcie_gen=5, pcie_width=16)])
    (gpu,) = read("empty", nvml=nvml).gpus
    assert gpu == hardware.GpuInfo(index=0, name="NVIDIA H100 80GB HBM3",
                                   memory_total_bytes=80 * GIB, memory_free_bytes=79 * GIB,
                                   compute_capability="9.0", pcie_generation=5, pcie_width=16)
    assert gpu == fake_gpu(0)
    assert nvml.shutdown_calls == 1


def test_eight_gpus_keep_their_order_and_facts():
    specs = [dict(name=f"NVIDIA A100-SXM4-40GB #{i}", total=40 * GIB, free=(39 - i) * GIB,
                  cc=(8, 0), pcie_gen=4, pcie_width=16 if i < 4 else 8) for i in range(8)]
    gpus = read("empty", nvml=FakeNvml(gpus=specs)).gpus
    assert [g.index for g in gpus] == list(range(8))
    assert [g.name for g in gpus] == [s["name"] for s in specs]
    assert [g.memory_free_bytes for g in gpus] == [(39 - i) * GIB for i in range(8)]
    assert {g.compute_capability for g in gpus} == {"8.0"}
    assert [g.pcie_width for g in gpus] == [16] * 4 + [8] * 4
    assert all(g.pcie_generation == 4 for g in gpus)


def test_bytes_name_from_old_pynvml_is_decoded():
    (gpu,) = read("empty", nvml=FakeNvml(gpus=[dict(name=b"Tesla V100-SXM2-16GB")])).gpus
    assert gpu.name == "Tesla V100-SXM2-16GB"


def test_nvml_init_failure_gives_no_gpus():
    nvml = FakeNvml(gpus=[H100], init_error=True)
    assert read("bare_metal", nvml=nvml).gpus == ()
    assert nvml.init_calls == 1


def test_a_query_that_raises_gives_none_for_that_field_only():
    nvml = FakeNvml(gpus=[H100, H100], failing={"nvmlDeviceGetCurrPcieLinkGeneration",
                                                "nvmlDeviceGetCudaComputeCapability"})
    with pytest.raises(NVMLError_NotSupported):  # the fake really raises
        nvml.nvmlDeviceGetCurrPcieLinkGeneration(0)
    gpus = read("empty", nvml=nvml).gpus
    assert len(gpus) == 2
    for gpu in gpus:
        assert gpu.pcie_generation is None and gpu.compute_capability is None
        assert (gpu.name, gpu.memory_total_bytes, gpu.pcie_width) == (H100["name"], 80 * GIB, 16)


def test_device_count_failure_gives_no_gpus_and_still_shuts_down():
    nvml = FakeNvml(gpus=[H100], failing={"nvmlDeviceGetCount"})
    assert read("empty", nvml=nvml).gpus == ()
    assert nvml.shutdown_calls == 1


def test_torch_accelerator_is_asked():
    assert read("empty", torch_accelerator=lambda: "cuda").accelerator == "cuda"
    assert read("empty").accelerator is None  # a canned root never asks the real torch


# --- torchrun and the CPU budget --------------------------------------------------------

TORCHRUN = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5", "LOCAL_RANK": "1"}


def test_torchrun_shares_usable_cpus_among_local_processes():
    hw = read("empty", env=TORCHRUN, affinity=set(range(64)))
    assert hw.distributed == hardware.DistributedInfo(world_size=8, local_world_size=4,
                                                      rank=5, local_rank=1)
    assert hw.cpu.usable == 64 and hw.cpu_budget == 16
    assert read("empty", env={}, affinity=set(range(64))).cpu_budget == 64


def test_cpu_budget_is_never_below_one():
    hw = read("cgroup_v2_quota", env={"LOCAL_WORLD_SIZE": "8"})
    assert hw.cpu.usable == 2 and hw.cpu_budget == 1
    assert fake_hardware(cpus=1, local_world_size=8).cpu_budget == 1


def test_bad_torchrun_values_are_none():
    dist = read("empty", env={"LOCAL_WORLD_SIZE": "four", "RANK": "-1", "WORLD_SIZE": " 2 "}
                ).distributed
    assert (dist.local_world_size, dist.rank, dist.world_size) == (None, None, 2)


# --- records: round trip and fingerprint ------------------------------------------------

@pytest.mark.parametrize("scenario", SCENARIOS)
def test_round_trip_every_scenario(scenario):
    assert_round_trips(read(scenario))
    assert_round_trips(read(scenario, env=TORCHRUN, affinity={1, 3},
                            nvml=FakeNvml(gpus=[H100] * 2),
                            torch_accelerator=lambda: "cuda"))


def test_scenarios_are_all_present():
    assert SCENARIOS == ["bare_metal", "cgroup_v1_no_limit", "cgroup_v1_quota",
                         "cgroup_v2_nested", "cgroup_v2_quota", "empty"]


def test_round_trip_fake_records():
    assert_round_trips(fake_hardware())
    assert_round_trips(fake_hardware(cpus=64, shm_free_bytes=64 * MIB, accelerator="cuda",
                                     local_world_size=4, gpus=4, quota=64.0))


def test_fingerprint_is_stable_and_follows_gpus_and_cpus():
    one_gpu = FakeNvml(gpus=[H100])
    base = read("bare_metal", nvml=one_gpu).fingerprint
    assert base == read("bare_metal", nvml=one_gpu).fingerprint
    assert len(base) == 16
    assert read("bare_metal", nvml=FakeNvml(gpus=[H100] * 8)).fingerprint != base
    assert read("bare_metal", nvml=FakeNvml()).fingerprint != base
    assert read("bare_metal", nvml=FakeNvml(gpus=[dict(name="NVIDIA A100-SXM4-80GB")])
                ).fingerprint != base
    assert read("bare_metal", nvml=one_gpu, affinity={0, 1}).fingerprint != base


def test_fingerprint_ignores_hostname_and_free_memory():
    a = fake_hardware(hostname="node-a", available_bytes=10 * GIB)
    b = fake_hardware(hostname="node-b", available_bytes=3 * GIB)
    assert a.fingerprint == b.fingerprint
    assert fake_hardware(cpus=4).fingerprint != a.fingerprint


def test_fake_hardware_defaults_and_overrides():
    hw = fake_hardware()
    assert (hw.cpu.usable, hw.cpu_budget, hw.memory.total_bytes, hw.memory.available_bytes,
            hw.memory.shm_free_bytes, hw.gpus, hw.accelerator, hw.host.hostname) == (
        2, 2, 16 * GIB, 16 * GIB, 8 * GIB, (), None, "testhost")
    hw = fake_hardware(cpus=64, shm_free_bytes=64 * MIB, accelerator="cuda",
                       local_world_size=4, gpus=2)
    assert (hw.cpu_budget, hw.memory.shm_free_bytes, hw.accelerator) == (16, 64 * MIB, "cuda")
    assert [g.index for g in hw.gpus] == [0, 1]


# --- the real machine -------------------------------------------------------------------

def test_probe_the_real_machine():
    # Usable is the affinity set, cut to a whole cgroup CPU quota where this machine has one.
    hw = autotune.probe_hardware(refresh=True)
    quota = hw.cpu.quota
    assert hw.cpu.usable == max(1, min(len(os.sched_getaffinity(0)), int(quota or 10**9)))
    assert autotune.probe_hardware() is hw
    assert autotune.probe_hardware() is autotune.probe_hardware()
    assert autotune.probe_hardware(refresh=True) is not hw
    json.dumps(hw.to_dict())
