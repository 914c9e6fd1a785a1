"""``AUTHSVC_WORKERS=N``: N worker processes of one command sharing its address, and the parent that keeps them.

Each worker is a fresh interpreter (``multiprocessing`` *spawn*) that runs the
same composition root as a single process would (``run_grpc`` or
``run_webhook``) with ``SO_REUSEPORT``, so the kernel spreads connections
over them and each has its own event loop, caches and change stream. The
parent never creates a grpc object, an event loop it forks from, or a MongoDB
client: nothing that does not survive a fork can leak into a worker (grpc's
own multiprocessing example forks before any server exists for that reason).

The parent:

- checks that the address is free *before* starting workers, with a socket
  bound without ``SO_REUSEPORT``: a second ``authsvc grpc`` on the same
  address exits 2 with one line instead of silently sharing the port;
- creates a fresh ``PROMETHEUS_MULTIPROC_DIR`` for this run, so that
  ``/metrics`` sums every worker (the parent serves it for gRPC on
  ``AUTHSVC_METRICS_ADDR``, for the sidecar on ``AUTHSVC_WEBHOOK_METRICS_ADDR``
  when set; otherwise each sidecar worker serves the same sum), and marks
  dead workers there;
- restarts a worker that dies, after a backoff that doubles while workers keep
  dying, and gives up (exit 1, one error line) when they die in a loop;
- forwards SIGTERM/SIGINT to every worker, which drains its calls in flight,
  and exits 0 once all have exited 0. Workers die with the parent (Linux
  ``PR_SET_PDEATHSIG``), so even a killed parent leaves no orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Literal, Protocol

from service.logs import fields
from service.settings import Settings
from service.startup import StartupError, split_addr

log = logging.getLogger(__name__)

Kind = Literal["grpc", "webhook"]
EXIT_CONFIG = 2
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_CTX = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class Policy:
    """When to restart a dead worker, and when to stop trying."""

    backoff_s: float = 0.5  # the first restart waits this long; doubles while deaths keep coming
    max_backoff_s: float = 10.0
    window_s: float = 60.0  # deaths counted over this window...
    max_deaths: int = 5  # ...per worker slot: more and the parent gives up
    stop_timeout_s: float = 20.0  # after the drain (AUTHSVC_DRAIN_S), SIGKILL what is still running


# --- the address -------------------------------------------------------------------------------
def claim_address(addr: str) -> str:
    """``addr`` with a concrete port, after checking that nothing listens on it; raise :class:`StartupError`.

    The probe binds without ``SO_REUSEPORT``: Linux refuses that bind while any
    socket listens on the port, with or without ``SO_REUSEPORT`` (another
    authsvc's workers included).
    """
    host, port = split_addr(addr)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {addr}: {exc.strerror}") from exc
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartupError(f"cannot listen on {addr}: {exc.strerror or 'the address is in use'}") from exc
            port = port or probe.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- the worker side -----------------------------------------------------------------------------
class WorkerRun(Protocol):
    """A command's process, as a worker runs it: ``run_grpc`` or ``run_webhook``."""

    def __call__(self, settings: Settings, *, worker: bool, on_ready: Callable[[], None] | None) -> Awaitable[None]: ...


def _worker_main(run: WorkerRun, settings: Settings, ready: Connection) -> None:  # pragma: no cover - in the child
    from service import logs
    from service.embedded import _die_with_parent

    _die_with_parent()  # also a process group of its own: a terminal's Ctrl-C reaches the parent only
    logs.setup(settings.log_level)

    def on_ready() -> None:
        ready.send(("serving", ""))

    async def main() -> None:
        await run(settings, worker=True, on_ready=on_ready)

    try:
        asyncio.run(main())
    except StartupError as exc:
        ready.send(("startup error", str(exc)))  # the parent says it once, not once per worker
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        pass


# --- the parent --------------------------------------------------------------------------------
@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    ready: Connection | None = None
    served: bool = False  # the current process reported serving
    error: str | None = None  # ... or the startup error it stopped on
    deaths: list[float] = field(default_factory=list)


class Supervisor:
    """Starts ``count`` workers of ``kind`` and keeps them running until a signal."""

    def __init__(
        self,
        kind: Kind,
        run: WorkerRun,
        settings: Settings,
        count: int,
        metrics_dir: str,
        policy: Policy | None = None,
    ) -> None:
        self.kind = kind
        self.run_worker = run
        self.settings = settings
        self.count = count
        self.metrics_dir = metrics_dir
        self.policy = policy or Policy()
        self._slots = [_Slot(i) for i in range(count)]
        self._wake = asyncio.Event()
        self._stopping = False
        self._failure: str | None = None
        self._startup_error = False

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None and s.process.pid is not None]

    def _start(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = _CTX.Pipe(duplex=False)
        process = _CTX.Process(
            target=_worker_main,
            args=(self.run_worker, self.settings, child_end),
            name=f"authsvc-{self.kind}-{slot.index}",
        )
        process.start()
        child_end.close()
        slot.process, slot.ready, slot.served, slot.error = process, parent_end, False, None
        loop.add_reader(process.sentinel, self._wake.set)
        loop.add_reader(parent_end.fileno(), self._on_ready, slot)
        log.info("worker started", extra=fields(kind=self.kind, worker=slot.index, pid=process.pid))

    def _on_ready(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        conn = slot.ready
        if conn is None:
            return
        loop.remove_reader(conn.fileno())
        with contextlib.suppress(EOFError, OSError):
            state, detail = conn.recv()
            if state == "serving":
                slot.served = True
                pid = slot.process.pid if slot.process is not None else None
                log.info("worker serving", extra=fields(kind=self.kind, worker=slot.index, pid=pid))
            else:
                slot.error = detail
        conn.close()
        slot.ready = None

    def _reap(self, slot: _Slot) -> int | None:
        """If the slot's process has exited: forget it, mark it dead for the metrics, return its exit code."""
        process = slot.process
        if process is None or process.is_alive():
            return None
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        if slot.ready is not None:
            self._on_ready(slot)  # drains the pipe (a worker that exits right after reporting ready)
        process.join()
        code = process.exitcode if process.exitcode is not None else -1
        if process.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        process.close()
        slot.process = None
        return code

    def _backoff(self, slot: _Slot, now: float) -> float | None:
        """Seconds before restarting the slot; None: the workers die in a loop, give up."""
        slot.deaths = [t for t in slot.deaths if now - t < self.policy.window_s] + [now]
        if len(slot.deaths) > self.policy.max_deaths:
            return None
        delay: float = self.policy.backoff_s * 2.0 ** (len(slot.deaths) - 1)
        return min(self.policy.max_backoff_s, delay)

    def stop(self) -> None:
        """Begin the shutdown (a signal handler): every worker gets SIGTERM and drains."""
        if not self._stopping:
            log.info("stopping workers", extra=fields(kind=self.kind, pids=self.pids()))
        self._stopping = True
        for slot in self._slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGTERM)
        self._wake.set()

    async def run(self) -> int:
        """Supervise until a signal (exit 0 when every worker drained) or a crash loop (exit 1)."""
        for slot in self._slots:
            self._start(slot)
        restart_at: dict[int, float] = {}
        while not self._stopping:
            timeout = max(0.0, min(restart_at.values()) - time.monotonic()) if restart_at else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._stopping:
                break
            now = time.monotonic()
            for slot in self._slots:
                code = self._reap(slot)
                if code is not None:
                    if slot.error is not None and not slot.deaths:
                        # A first start that fails (the address, the database) does not heal by restarting.
                        self._failure, self._startup_error = slot.error, True
                        break
                    delay = self._backoff(slot, now)
                    if delay is None:
                        self._failure = (
                            f"{self.kind} workers keep dying ({self.policy.max_deaths + 1} deaths of worker "
                            f"{slot.index} within {self.policy.window_s:.0f} s, last exit code {code}); giving up"
                        )
                        break
                    log.error(
                        "worker died; restarting",
                        extra=fields(kind=self.kind, worker=slot.index, exit_code=code, restart_in_s=delay),
                    )
                    restart_at[slot.index] = now + delay
                elif slot.index in restart_at and restart_at[slot.index] <= now and slot.process is None:
                    del restart_at[slot.index]
                    self._start(slot)
            if self._failure is not None:
                if not self._startup_error:
                    log.error(self._failure)
                self.stop()
        return await self._drain()

    async def _drain(self) -> int:
        deadline = time.monotonic() + self.settings.drain_s + self.policy.stop_timeout_s
        codes: list[int] = []
        while any(slot.process is not None for slot in self._slots):
            for slot in self._slots:
                code = self._reap(slot)
                if code is not None:
                    codes.append(code)
            if not any(slot.process is not None for slot in self._slots):
                break
            if time.monotonic() > deadline:
                for slot in self._slots:
                    if slot.process is not None and slot.process.pid is not None:
                        log.error("worker did not stop in time: killed", extra=fields(pid=slot.process.pid))
                        slot.process.kill()
                deadline = float("inf")
                codes.append(-signal.SIGKILL)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
        if self._failure is not None:
            if self._startup_error:
                raise StartupError(self._failure)
            return 1
        if any(code != 0 for code in codes):
            log.error("workers stopped with errors", extra=fields(kind=self.kind, exit_codes=codes))
            return 1
        log.info("workers stopped", extra=fields(kind=self.kind))
        return 0


@contextlib.contextmanager
def metrics_dir() -> Iterator[str]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for this run (workers inherit it), removed at the end."""
    path = tempfile.mkdtemp(prefix="authsvc-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


async def supervise(kind: Kind, run: WorkerRun, settings: Settings) -> int:
    """The parent of ``AUTHSVC_WORKERS`` > 1 workers running ``run``; returns the exit code."""
    from service.exposition import metrics_server
    from service.startup import shared_database_uri

    addr_field = "grpc_addr" if kind == "grpc" else "webhook_addr"
    updates: dict[str, object] = {addr_field: claim_address(getattr(settings, addr_field))}
    async with contextlib.AsyncExitStack() as stack:
        uri = await stack.enter_async_context(shared_database_uri(settings))
        if uri is not None:
            updates["mongodb_uri"] = uri
        settings = settings.model_copy(update=updates)
        directory = stack.enter_context(metrics_dir())
        if kind == "grpc":
            await stack.enter_async_context(metrics_server(settings.metrics_addr))
        elif settings.webhook_metrics_addr:  # the sidecar's workers serve /metrics on its address otherwise
            metrics = metrics_server(settings.webhook_metrics_addr, "AUTHSVC_WEBHOOK_METRICS_ADDR")
            await stack.enter_async_context(metrics)
        supervisor = Supervisor(kind, run, settings, settings.workers, directory)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.stop)
        log.info(
            "workers starting",
            extra=fields(
                kind=kind, workers=settings.workers, addr=getattr(settings, addr_field), metrics_dir=directory
            ),
        )
        return await supervisor.run()
    raise AssertionError("unreachable")  # pragma: no cover


async def serve(kind: Kind, run: WorkerRun, settings: Settings) -> None:
    """``authsvc grpc`` / ``authsvc webhook``: ``run`` itself, or ``AUTHSVC_WORKERS`` workers of it under a parent.

    Either way the address is checked first (one line, exit 2 when in use). A
    parent that fails (workers dying in a loop) exits with its code.
    """
    if settings.workers <= 1:
        claim_address(settings.grpc_addr if kind == "grpc" else settings.webhook_addr)
        await run(settings, worker=False, on_ready=None)
        return
    code = await supervise(kind, run, settings)
    if code:
        raise SystemExit(code)
