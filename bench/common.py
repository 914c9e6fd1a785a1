"""What both benchmarks share: the private database, child processes, timing windows, CPU and figures.

Every load generator is a separate process (multiprocessing, spawn) so that the
process under test never shares an interpreter with its load. A load generator
prepares everything (signs bodies, mints tokens, connects), reports ready,
then waits for one start time on ``time.monotonic()`` (system wide on Linux),
so that several generators and the CPU samples of the parent share one window.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from authsvc.dev.issuer import DevIssuer, jwks_routes
from bench import profiles
from service.embedded import EmbeddedMongo, free_port

CTX = multiprocessing.get_context("spawn")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 120.0
MACHINE = "_machine"


@dataclass(frozen=True)
class Window:
    """A timed window on ``time.monotonic()``: warm up until ``start``, count until ``end``."""

    go: float
    start: float
    end: float

    @classmethod
    def after(cls, delay_s: float, warmup_s: float, duration_s: float) -> Window:
        go = time.monotonic() + delay_s
        return cls(go=go, start=go + warmup_s, end=go + warmup_s + duration_s)

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Recorder:
    """Latencies of the calls that finish inside the window, and what they answered."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.latencies: list[float] = []
        self.outcomes: dict[str, int] = {}
        self.errors = 0
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def add(self, began: float, finished: float, outcome: str, ok: bool = True) -> None:
        if self.window.start <= finished <= self.window.end:
            if ok:
                self.latencies.append(finished - began)
            else:
                self.errors += 1
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def sample_cpu(self) -> None:
        """Record this process's CPU time at the window's start and end (run as a task)."""
        await asyncio.sleep(max(0.0, self.window.start - time.monotonic()))
        self.cpu_start = time.process_time()
        await asyncio.sleep(max(0.0, self.window.end - time.monotonic()))
        self.cpu_end = time.process_time()

    def result(self, **extra: Any) -> dict[str, Any]:
        cpu = None
        if self.cpu_start is not None and self.cpu_end is not None:
            cpu = self.cpu_end - self.cpu_start
        return {"latencies": self.latencies, "outcomes": self.outcomes, "errors": self.errors,
                "cpu_s": cpu, **extra}  # fmt: skip


@dataclass
class Figure:
    """One measured row: throughput, latency, and where the CPU went during the window."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    count: int
    errors: int
    seconds: float
    outcomes: dict[str, int] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core
    note: str = ""


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def figure(name: str, window: Window, results: list[dict[str, Any]], cpu: dict[str, float]) -> Figure:
    """Merge the results of the load processes of one phase into a :class:`Figure`."""
    latencies = sorted(lat for r in results for lat in r["latencies"])
    outcomes: dict[str, int] = {}
    for r in results:
        for key, count in r["outcomes"].items():
            outcomes[key] = outcomes.get(key, 0) + count
    errors = sum(r["errors"] for r in results)
    loadgen = [r["cpu_s"] for r in results if r.get("cpu_s") is not None]
    cpu = dict(cpu)
    machine = cpu.pop(MACHINE, None)
    if loadgen:
        cpu["loadgen"] = sum(loadgen) / window.seconds
    if machine is not None:
        # Whatever else ran on the machine meanwhile (other people's tests, say): a noise gauge.
        cpu["other"] = max(0.0, machine - sum(cpu.values()))
    notes = [r["note"] for r in results if r.get("note")]
    return Figure(
        name=name,
        rps=len(latencies) / window.seconds,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        count=len(latencies),
        errors=errors,
        seconds=window.seconds,
        outcomes=outcomes,
        cpu=cpu,
        note="; ".join(dict.fromkeys(notes)),
    )


# --- CPU accounting of the processes under test -------------------------------------------------
def group_cpu_seconds(leader: int) -> float:
    """User + system CPU seconds of every live process in process group ``leader`` or descended from ``leader``.

    (Worker processes put themselves in groups of their own: they count as their parent's.)
    """
    stats: dict[int, tuple[int, int, float]] = {}  # pid -> (ppid, pgrp, cpu ticks)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Fields after the command name, which may contain spaces: ") state ppid pgrp ..."
        rest = stat[stat.rindex(b")") + 2 :].split()
        stats[int(entry.name)] = (int(rest[1]), int(rest[2]), int(rest[11]) + int(rest[12]))  # utime, stime

    def counted(pid: int) -> bool:
        for _ in range(64):
            if pid not in stats:
                return False
            ppid, pgrp, _ticks = stats[pid]
            if pid == leader or pgrp == leader:
                return True
            pid = ppid
        return False

    return sum(ticks for pid, (_, _, ticks) in stats.items() if counted(pid)) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from ``/proc/stat``."""
    with open("/proc/stat") as handle:
        ticks = [int(value) for value in handle.readline().split()[1:9]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks) - idle - iowait) / CLOCK_TICKS


def _sample(groups: dict[str, int]) -> dict[str, float]:
    sample = {name: group_cpu_seconds(pgid) for name, pgid in groups.items()}
    sample[MACHINE] = machine_busy_seconds()
    return sample


async def sample_groups(window: Window, groups: dict[str, int]) -> dict[str, float]:
    """Share of one core used by each named process group (and the whole machine) during ``window``."""
    await asyncio.sleep(max(0.0, window.start - time.monotonic()))
    before = _sample(groups)
    await asyncio.sleep(max(0.0, window.end - time.monotonic()))
    after = _sample(groups)
    return {name: (after[name] - before[name]) / window.seconds for name in before}


# --- processes ----------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def private_mongo(directory: Path) -> AsyncIterator[EmbeddedMongo]:
    """A private embedded database for one benchmark, stopped at the end."""
    mongo = EmbeddedMongo(directory / "mongo")
    await mongo.start()
    try:
        yield mongo
    finally:
        mongo.stop()


async def serve_jwks(issuer: DevIssuer) -> tuple[web.AppRunner, str]:
    """The dev issuer's JWKS on a loopback port: the runner to clean up, and the issuer URL that names it."""
    port = free_port()
    app = web.Application()
    app.add_routes(jwks_routes(issuer))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


def _worker_main(target: Callable[..., Any], config: dict[str, Any], ready: Any, go: Any, out: Any) -> None:
    try:
        out.put(("ok", target(config, ready, go)))
    except BaseException as exc:  # reported to the parent, which fails the benchmark
        import traceback

        out.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        ready.put("failed")


class LoadProcesses:
    """N load-generator processes running ``target(config, ready, go) -> dict``."""

    def __init__(self, target: Callable[..., Any], configs: list[dict[str, Any]]) -> None:
        self.target = target
        self.configs = configs
        self.procs: list[Any] = []
        self.ready = CTX.Queue()
        self.go = [CTX.Queue() for _ in configs]
        self.out = CTX.Queue()

    def start(self) -> None:
        for config, go in zip(self.configs, self.go, strict=True):
            proc = CTX.Process(target=_worker_main, args=(self.target, config, self.ready, go, self.out))
            proc.start()
            self.procs.append(proc)

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in self.procs:
            state = await loop.run_in_executor(None, self.ready.get, True, READY_TIMEOUT_S)
            if state != "ready":
                await self.results()  # raises with the worker's error

    def release(self, window: Window) -> None:
        for go in self.go:
            go.put(window)

    async def results(self) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        results = []
        for _ in self.procs:
            status, value = await loop.run_in_executor(None, self.out.get, True, READY_TIMEOUT_S)
            if status != "ok":
                raise RuntimeError(f"load generator failed: {value}")
            results.append(value)
        return results

    def stop(self) -> None:
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


async def run_phase(
    name: str,
    target: Callable[..., Any],
    configs: list[dict[str, Any]],
    groups: dict[str, int],
    *,
    warmup_s: float,
    duration_s: float,
    profile: Path | None = None,
) -> Figure:
    """Start the load processes, wait until all are prepared, run one window, merge the figures.

    With ``profile``, py-spy samples every process in ``groups`` during the window.
    """
    load = LoadProcesses(target, configs)
    load.start()
    try:
        await load.wait_ready()
        window = Window.after(0.3, warmup_s, duration_s)
        load.release(window)
        spies = None
        if profile is not None:
            spies = asyncio.create_task(profiles.record(profile, name, window, groups))
        cpu = await sample_groups(window, groups)
        results = await load.results()
        if spies is not None:
            await spies
    finally:
        load.stop()
    return figure(name, window, results, cpu)


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


def wait_go(go: Any) -> Window:
    window: Window = go.get(True, READY_TIMEOUT_S)
    return window


# --- interleaving ---------------------------------------------------------------------------------
def abba(pairs: int) -> list[int]:
    """Which of two phases (0 = A, 1 = B) runs next, ``pairs`` pairs in the order A B B A A B B A ...

    A drift of the machine or of the database over the run (other load, a
    database that slows as writes accumulate) then weighs on both phases alike.
    """
    return [side for i in range(pairs) for side in ((0, 1) if i % 2 == 0 else (1, 0))]


@dataclass
class Spread:
    """Values of one quantity over interleaved runs, in the order they ran."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    def text(self, fmt: str = ",.0f") -> str:
        """``median (min-max, n)``."""
        if not self.values:
            return "n/a"
        low, high = min(self.values), max(self.values)
        return f"{self.median:{fmt}} ({low:{fmt}}-{high:{fmt}}, n={len(self.values)})"


def median_figure(name: str, runs: list[Figure]) -> Figure:
    """The run of median throughput, with the spread of all runs in its note."""
    ordered = sorted(runs, key=lambda f: f.rps)
    chosen = ordered[len(ordered) // 2]
    chosen.note = "runs in order: " + ", ".join(f"{f.rps:,.0f}" for f in runs) + " rps"
    return chosen


def pair_ratios(tops: list[float], bottoms: list[float]) -> Spread:
    """The ratio of each interleaved pair (the i-th run of A over the i-th run of B)."""
    return Spread([t / b for t, b in zip(tops, bottoms, strict=True) if b])


def ratio_line(label: str, ratios: Spread, target: float | None = None, width: int = 28) -> str:
    """One ratio: the median of its pairs, their spread, and the target if it has one."""
    verdict = ""
    if target is not None:
        verdict = f"  (target >= {target:g}: {'met' if ratios.median >= target else 'MISSED'})"
    return f"  {label:<{width}} {ratios.text('.2f')}{verdict}"
