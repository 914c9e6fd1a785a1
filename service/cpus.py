"""How many CPUs this process may use: its affinity, capped by its cgroup's CPU quota (``AUTHSVC_WORKERS=auto``).

``os.cpu_count()`` counts the host's CPUs: a pod limited to 2 CPUs on a
32-core node would start 32 workers, each throttled. The quota is read the way
the kernel exposes it, from the cgroup this process belongs to
(``/proc/self/cgroup``) under the mount point that ``/proc/self/mountinfo``
names for it:

- cgroup v2: ``cpu.max`` (``max 100000`` or ``QUOTA PERIOD``);
- cgroup v1: ``cpu.cfs_quota_us`` (``-1``: none) and ``cpu.cfs_period_us``.

Every cgroup from this process's up to the mount point counts (a parent's
quota caps its children), the tightest wins, and a fraction of a CPU is
rounded up. Anything missing or unreadable means no quota.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MOUNTINFO = Path("/proc/self/mountinfo")
CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path mounted there
    point: Path
    version: int  # 1 or 2


def _cpu_mount(mountinfo: Path) -> _Mount | None:
    """The cgroup v2 mount, else the v1 mount that carries the ``cpu`` controller."""
    found: _Mount | None = None
    for line in mountinfo.read_text().splitlines():
        head, sep, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if not sep or len(fields) < 5 or not extra:
            continue
        root, point = fields[3], Path(fields[4])
        if extra[0] == "cgroup2":
            return _Mount(root, point, 2)
        if extra[0] == "cgroup" and len(extra) >= 3 and "cpu" in extra[2].split(",") and found is None:
            found = _Mount(root, point, 1)
    return found


def _own_cgroup(cgroup: Path, version: int) -> str | None:
    """This process's cgroup path in the hierarchy of that version."""
    for line in cgroup.read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if version == 2 and parts[0] == "0" and parts[1] == "":
            return parts[2]
        if version == 1 and "cpu" in parts[1].split(","):
            return parts[2]
    return None


def _quota_v2(directory: Path) -> float | None:
    quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
    if quota == "max":
        return None
    return int(quota) / int(period)


def _quota_v1(directory: Path) -> float | None:
    quota = int((directory / "cpu.cfs_quota_us").read_text())
    period = int((directory / "cpu.cfs_period_us").read_text())
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(mountinfo: Path = MOUNTINFO, cgroup: Path = CGROUP) -> int | None:
    """The CPU quota of this process's cgroup, rounded up; None when there is none (or it cannot be read)."""
    try:
        mount = _cpu_mount(mountinfo)
        own = _own_cgroup(cgroup, mount.version) if mount is not None else None
    except (OSError, ValueError):
        return None
    if mount is None or own is None:
        return None
    relative = PurePosixPath(own).relative_to(mount.root) if own.startswith(mount.root) else PurePosixPath(".")
    directory = mount.point / relative
    read = _quota_v2 if mount.version == 2 else _quota_v1
    limits: list[float] = []
    while True:
        try:
            quota = read(directory)
        except (OSError, ValueError):
            quota = None
        if quota is not None and quota > 0:
            limits.append(quota)
        if directory == mount.point or mount.point not in directory.parents:
            break
        directory = directory.parent
    return math.ceil(min(limits)) if limits else None


def available_cpus(mountinfo: Path = MOUNTINFO, cgroup: Path = CGROUP, *, affinity: int | None = None) -> int:
    """The CPUs this process may use: its affinity, capped by its cgroup quota; at least 1."""
    count = len(os.sched_getaffinity(0)) if affinity is None else affinity
    limit = cgroup_cpu_limit(mountinfo, cgroup)
    if limit is not None:
        count = min(count, limit)
    return max(1, count)
