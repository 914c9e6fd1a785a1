"""``AUTHSVC_WORKERS=auto``: the CPUs this process may use, from real cgroup files laid out in a temporary directory.

Each test writes what the kernel would show (``/proc/self/mountinfo``,
``/proc/self/cgroup`` and the cgroup files under the mount points they name)
and reads it through the same function the setting uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cpus import available_cpus, cgroup_cpu_limit


def cgroup_v2(tmp_path: Path, cpu_max: dict[str, str], own: str = "/") -> Path:
    """A cgroup v2 host: the unified hierarchy mounted at tmp/cgroup, this process in ``own``."""
    mount = tmp_path / "cgroup"
    for group, value in cpu_max.items():
        directory = mount / group.strip("/")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw\n"
        f"30 22 0:26 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    (proc / "cgroup").write_text(f"0::{own}\n")
    return proc


def cgroup_v1(tmp_path: Path, quota: str, period: str, *, root: str = "/", own: str = "/") -> Path:
    """A cgroup v1 host: the ``cpu,cpuacct`` controller mounted at tmp/cpu with cgroup ``root`` as its root."""
    mount = tmp_path / "cpu"
    directory = mount / own.removeprefix(root).strip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (directory / "cpu.cfs_period_us").write_text(period + "\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        f"31 23 0:28 / {tmp_path}/tmpfs rw,relatime - tmpfs tmpfs rw,mode=755\n"
        f"35 31 0:32 {root} {tmp_path}/memory rw,relatime - cgroup cgroup rw,memory\n"
        f"36 31 0:33 {root} {mount} rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,cpu,cpuacct\n"
    )
    (proc / "cgroup").write_text(f"5:memory:{own}\n4:cpu,cpuacct:{own}\n0::/\n")
    return proc


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("200000 100000", 2),
        ("150000 100000", 2),  # 1.5 CPUs: rounded up
        ("50000 100000", 1),  # half a CPU: still one worker
        ("400000 50000", 8),
        ("max 100000", None),  # no quota
    ],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, cpu_max: str, expected: int | None) -> None:
    proc = cgroup_v2(tmp_path, {"/": cpu_max})
    assert cgroup_cpu_limit(proc / "mountinfo", proc / "cgroup") == expected


def test_cgroup_v2_takes_the_tightest_quota_on_the_way_to_the_root(tmp_path: Path) -> None:
    proc = cgroup_v2(
        tmp_path,
        {"/": "max 100000", "/kubepods.slice": "300000 100000", "/kubepods.slice/pod1/app": "max 100000"},
        own="/kubepods.slice/pod1/app",
    )
    assert cgroup_cpu_limit(proc / "mountinfo", proc / "cgroup") == 3


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [("200000", "100000", 2), ("250000", "100000", 3), ("-1", "100000", None), ("10000", "100000", 1)],
)
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, period: str, expected: int | None) -> None:
    proc = cgroup_v1(tmp_path, quota, period)
    assert cgroup_cpu_limit(proc / "mountinfo", proc / "cgroup") == expected


def test_cgroup_v1_inside_a_container_whose_cgroup_is_the_mount_root(tmp_path: Path) -> None:
    # Docker on cgroup v1: /proc/self/cgroup names the host path, the mount's root is that same path.
    proc = cgroup_v1(tmp_path, "300000", "100000", root="/docker/abc", own="/docker/abc")
    assert cgroup_cpu_limit(proc / "mountinfo", proc / "cgroup") == 3


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path / "missing") is None
    proc = cgroup_v2(tmp_path, {"/": "garbage"})
    assert cgroup_cpu_limit(proc / "mountinfo", proc / "cgroup") is None


def test_available_cpus_is_the_smaller_of_affinity_and_quota_and_at_least_one(tmp_path: Path) -> None:
    proc = cgroup_v2(tmp_path, {"/": "200000 100000"})
    assert available_cpus(proc / "mountinfo", proc / "cgroup", affinity=32) == 2
    assert available_cpus(proc / "mountinfo", proc / "cgroup", affinity=1) == 1
    assert available_cpus(tmp_path / "none", tmp_path / "none", affinity=4) == 4
    assert available_cpus(tmp_path / "none", tmp_path / "none", affinity=0) == 1


def test_this_machine(tmp_path: Path) -> None:
    # Whatever this host's cgroups say, the answer is a usable worker count within the affinity.
    import os

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
