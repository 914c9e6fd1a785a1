"""Child processes for tests and benchmarks: a server run as production runs it, on a free loopback port.

:func:`run` runs a command to its end (``authsvc --help``, ``authsvc dev-token``).

:class:`ServerProcess` is the one runner: its own process group (so the
benchmarks can account its CPU), stdout and stderr into one log file, ready
when a probe says so (:func:`http_ok`, :func:`grpc_serving`, :func:`printed`),
stopped by a signal with SIGKILL as the last resort. ``free_port`` and
``terminate`` are the embedded database's own (production starts it too);
tests and ``bench/`` take them from here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2

from service.embedded import free_port, terminate

__all__ = [
    "Probe",
    "ServerProcess",
    "child_env",
    "free_port",
    "grpc_serving",
    "health_check",
    "http_ok",
    "printed",
    "run",
    "terminate",
]

Probe = Callable[["ServerProcess"], Awaitable[bool]]


def child_env(**overrides: str) -> dict[str, str]:
    """Our environment without any authsvc, Clerk, MongoDB or OpenTelemetry setting, plus ``overrides``.

    The working directory goes on ``PYTHONPATH`` so that ``-m bench.…`` resolves from the repository.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "AUTHSVC_", "MONGODB_", "OTEL_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path.cwd()), env.get("PYTHONPATH")) if p)
    env.update(overrides)
    return env


async def run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout_s: float = 60.0
) -> tuple[int, str, str]:
    """Run a command to its end: ``(exit code, stdout, stderr)``; killed if it outlives ``timeout_s``.

    ``env`` defaults to ours; give :func:`child_env` for an ``authsvc`` command.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"{argv[0]} still ran after {timeout_s:.0f}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class ServerProcess:
    """``argv`` as its own process (own session and process group), its output in ``logfile``."""

    def __init__(
        self, name: str, argv: Sequence[str], *, env: dict[str, str], logfile: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.logfile = logfile
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self) -> None:
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    async def wait_ready(self, probe: Probe, timeout_s: float = 60.0) -> None:
        """Poll ``probe`` until it is true; raise with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if await probe(self):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f}s:\n{self.tail()}")

    async def start_ready(self, probe: Probe, timeout_s: float = 60.0) -> None:
        """:meth:`start`, then :meth:`wait_ready`; stopped again if it never gets ready."""
        self.start()
        try:
            await self.wait_ready(probe, timeout_s)
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")

    def output(self) -> str:
        """Everything it wrote so far (stdout and stderr, interleaved)."""
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Send ``sig`` (SIGTERM: graceful; SIGINT: Ctrl-C), SIGKILL after ``timeout_s``; return the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return self.returncode
        if proc.poll() is None and sig != signal.SIGTERM:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        terminate(proc, timeout_s)
        self.returncode = proc.returncode
        return self.returncode


def http_ok(url: str) -> Probe:
    """Ready when ``GET url`` answers 200."""

    async def probe(_: ServerProcess) -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    return probe


def health_check(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    """``grpc.health.v1.Health/Check`` on ``channel`` (the typeshed ``HealthStub`` declares no methods)."""
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def grpc_serving(target: str) -> Probe:
    """Ready when ``grpc.health.v1.Health/Check`` on ``target`` answers SERVING."""

    async def probe(_: ServerProcess) -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                reply = await health_check(channel)(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return probe


def printed(line_start: str) -> Probe:
    """Ready once a line of its output starts with ``line_start`` (a banner's last line, say)."""

    async def probe(process: ServerProcess) -> bool:
        return any(line.startswith(line_start) for line in process.output().splitlines())

    return probe
