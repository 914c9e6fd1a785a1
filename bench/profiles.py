"""Optional py-spy sampling of the processes under test during a window (``--profile DIR``).

py-spy is not a dependency of authsvc: ``pip install py-spy`` (or set ``PY_SPY``
to its path) to use it. Profiles are py-spy's "raw" collapsed stacks, one file
per phase and process; :func:`summary` prints where the time went.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

OURS = re.compile(r"\((service|webhook)/")


def py_spy() -> str | None:
    found = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if found is None:
        candidate = Path(sys.executable).with_name("py-spy")
        found = str(candidate) if candidate.exists() else None
    return found


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


async def record(directory: Path, phase: str, window: Any, groups: dict[str, int]) -> list[Path]:
    """Sample each process of ``groups`` (by its leader pid) from the window's start to its end."""
    binary = py_spy()
    if binary is None:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    spies, paths = [], []
    for name, pid in groups.items():
        path = directory / f"{slug(phase)}--{name}.txt"
        argv = [binary, "record", "--pid", str(pid), "--duration", str(math.floor(window.seconds)), "--rate", "100",
                "--format", "raw", "--output", str(path), "--nonblocking", "--subprocesses"]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        spies.append(proc)
        paths.append(path)
    for proc in spies:
        await proc.wait()
    return [path for path in paths if path.exists()]


def summary(path: Path, top: int = 8) -> list[str]:
    """The heaviest frames of one raw profile: self time, and inclusive time of authsvc's own code."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = stack.split(";")
        own[frames[-1]] += samples
        for frame in set(frames):
            if OURS.search(frame):
                inclusive[frame] += samples
    if not total:
        return [f"{path.name}: no samples"]
    lines = [f"{path.name}: {total} samples"]
    lines += [f"    self {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += [f"    incl {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top)]
    return lines
