"""The sidecar's own limits on connections: deadlines, a cap that makes room, descriptors, quiet logs.

The sidecar faces the internet, and aiohttp alone closes nothing that is slow
(no header or body deadline) and has no connection cap, so a few hundred
half-sent requests once exhausted the descriptors and locked deliveries out.
Here, per connection (:class:`Connections`):

- a request's headers must be complete within ``header_timeout_s`` of the
  connection's open, or of the request's first byte on a kept-alive connection;
- a kept-alive connection with no request is closed after ``idle_timeout_s``;
- the body must be complete within ``body_timeout_s`` of its headers (the
  handler reads it on that deadline: :func:`webhook.body.read_body`);
- past ``max_connections``, the connection that has waited longest without
  sending a complete request's headers is closed to make room; a new
  connection is closed at once only when every other one has a request in
  progress, so idle or slow clients never lock deliveries out.

Every connection is an aiohttp ``RequestHandler`` (:class:`_Handler`) that
reports what it parsed and answered; a refused request's connection is
closed, never drained (no lingering), and aiohttp does not decompress
(:mod:`webhook.body` does, bounded). Malformed HTTP is one info line, never
aiohttp's error-level traceback quoting the attacker's bytes. At startup
:func:`descriptor_budget` raises the soft ``RLIMIT_NOFILE`` and fits the cap
to it; :func:`quiet_accept_errors` keeps running out of descriptors from
flooding the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import time
from asyncio.constants import ACCEPT_RETRY_DELAY
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service import listen
from service.logs import fields

log = logging.getLogger(__name__)

# Descriptors kept for everything but the sidecar's connections (the database pool, listeners, logs,
# the embedded database's pipes, gRPC's connections in ``authsvc dev``).
RESERVED_DESCRIPTORS = 256


@dataclass(frozen=True)
class Limits:
    """The contract's limits ("The sidecar's own limits"); tests pass smaller ones."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 75.0
    max_connections: int = 1000


class Occasional:
    """A warning at most once per ``interval_s``, counting what it stands for: a flood of causes, not of lines."""

    def __init__(self, message: str, interval_s: float = 60.0) -> None:
        self.message, self.interval_s = message, interval_s
        self._next = 0.0
        self._count = 0

    def warn(self, **values: Any) -> None:
        self._count += 1
        now = time.monotonic()
        if now >= self._next:
            log.warning(self.message, extra=fields(occurrences=self._count, **values))
            self._count, self._next = 0, now + self.interval_s


class Connections:
    """Every open connection of one sidecar: their deadlines, and the cap."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        self._open: set[_Handler] = set()
        # Connections without a complete request's headers, the longest-waiting first (dicts keep order).
        self._waiting: dict[_Handler, None] = {}
        self._full = Occasional("connection cap reached: closing the connections that waited longest")

    def opened(self, conn: _Handler) -> None:
        self._open.add(conn)
        self._wait(conn, self.limits.header_timeout_s)  # its first request's headers: from the connect
        if len(self._open) > self.limits.max_connections:
            # The longest-waiting connection makes room: the new one itself only when all others are busy.
            victim = next(iter(self._waiting))
            self._full.warn(max_connections=self.limits.max_connections)
            self._close(victim)

    def received(self, conn: _Handler, requests: int) -> None:
        """Bytes arrived on ``conn``, completing the headers of ``requests`` requests."""
        if requests:
            conn.pending += requests
            self._waiting.pop(conn, None)
            self._cancel(conn)  # the body's deadline is the handler's; nothing else runs out while busy
        elif not conn.pending and not conn.started:
            conn.started = True  # the first byte of a request on a kept-alive connection
            self._deadline(conn, self.limits.header_timeout_s)

    def answered(self, conn: _Handler) -> None:
        """A response was written on ``conn``."""
        conn.pending = max(0, conn.pending - 1)
        if not conn.pending and conn in self._open:
            conn.started = False
            self._wait(conn, self.limits.idle_timeout_s)

    def closed(self, conn: _Handler) -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)
        self._cancel(conn)

    def _wait(self, conn: _Handler, timeout_s: float) -> None:
        self._waiting.pop(conn, None)
        self._waiting[conn] = None  # the newest waiter: last in line to make room
        self._deadline(conn, timeout_s)

    def _deadline(self, conn: _Handler, timeout_s: float) -> None:
        self._cancel(conn)
        conn.timer = self._loop.call_later(timeout_s, self._close, conn)

    def _cancel(self, conn: _Handler) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _close(self, conn: _Handler) -> None:
        # Forgotten at once (not at connection_lost), so it neither counts nor makes room twice.
        self.closed(conn)
        conn.force_close()


class _Handler(web.RequestHandler):
    """aiohttp's connection, reporting to :class:`Connections` what it parsed and answered."""

    __slots__ = ("connections", "pending", "started", "timer")

    def __init__(self, manager: web.Server, connections: Connections, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.connections = connections
        self.pending = 0  # requests whose headers arrived and that are not answered yet
        self.started = True  # bytes of the next request arrived (a new connection's deadline runs from the connect)
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connections.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.connections.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count  # aiohttp counts each request whose headers it parsed (or refused)
        super().data_received(data)
        requests = self._request_count - parsed  # also when aiohttp re-parses what it held back (data b"")
        if not data and not requests:
            return
        current = self._current_request
        if requests and current is not None and not current.content.is_eof():
            # A "request" parsed before the body in progress ended can only be aiohttp's parse error
            # (a bad chunk size mid-body): its C parser drops the body without telling it, and the
            # handler would wait on it until the body deadline. Fail the body: the handler answers 400.
            current.content.set_exception(web.RequestPayloadError("malformed HTTP body framing"))
        self.connections.received(self, requests)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self.connections.answered(self)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # The client's malformed HTTP: one info line, without its bytes (aiohttp's message quotes them).
        log.info("malformed HTTP request", extra=fields(peer=request.remote, status=status, error=type(exc).__name__))
        response = web.Response(status=status, text=f"{status} {_phrase(status)}")
        response.force_close()
        return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _Site(web.BaseSite):
    """A TCP site whose connections are :class:`_Handler` (``web.TCPSite`` with another protocol factory)."""

    __slots__ = ("_factory", "_host", "_port", "_reuse_port")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, factory: Callable[[], _Handler], *, reuse_port: bool
    ) -> None:
        super().__init__(runner)
        self._host, self._port, self._factory, self._reuse_port = host, port, factory, reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        sock = listen.dual_stack_socket(self._host, self._port, reuse_port=self._reuse_port)
        if sock is not None:  # [::] takes IPv4 clients too, as gRPC's does
            self._server = await loop.create_server(self._factory, sock=sock, backlog=self._backlog)
            return
        self._server = await loop.create_server(
            self._factory, self._host or None, self._port, backlog=self._backlog, reuse_port=self._reuse_port or None
        )


async def start_site(runner: web.AppRunner, host: str, port: int, limits: Limits, *, reuse_port: bool) -> Connections:
    """Listen on ``host:port`` for ``runner`` (already set up) with ``limits``; stopped by ``runner.cleanup()``."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    connections = Connections(limits)

    def connection() -> _Handler:
        # No lingering: a request whose body was not read ends its connection instead of draining it.
        # No decompression: webhook.body inflates what the handler reads, bounded.
        return _Handler(
            server,
            connections,
            loop=asyncio.get_running_loop(),
            access_log=None,
            lingering_time=0,
            auto_decompress=False,
        )

    await _Site(runner, host, port, connection, reuse_port=reuse_port).start()
    return connections


# --- descriptors ---------------------------------------------------------------------------------
def descriptor_budget(limits: Limits) -> Limits:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; lower ``max_connections`` (a warning) if still too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # an infinite hard limit cannot be the soft one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return limits
    room = max(1, soft - min(RESERVED_DESCRIPTORS, soft // 4))
    if room >= limits.max_connections:
        return limits
    log.warning(
        "too few file descriptors for the connection cap: lowering it",
        extra=fields(nofile_limit=soft, max_connections=room, wanted=limits.max_connections),
    )
    return replace(limits, max_connections=room)


@contextlib.contextmanager
def quiet_accept_errors() -> Iterator[None]:
    """While the block runs: asyncio's "out of system resource" on accept is an occasional warning line.

    asyncio logs each failed accept (EMFILE, ENFILE…) at error level with a
    traceback, and retries a second later: out of descriptors, a line a
    second. The retry is not cancelled when its server closes, so a sidecar
    stopping within that second would log the retry on its closed socket as an
    error: that is a debug line, and the handler stays until the retries have
    run. Everything else goes to the loop's previous handler.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    out = Occasional("out of file descriptors: new connections wait")
    last_failure = -math.inf

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last_failure
        message = str(context.get("message", ""))
        if message.startswith("socket.accept() out of system resource"):
            last_failure = loop.time()
            exc = context.get("exception")
            out.warn(error=exc.strerror if isinstance(exc, OSError) else None)
        elif message.startswith("Exception in callback") and "._start_serving(" in message:
            log.debug("a retried accept found its listener closed", extra=fields(error=str(context.get("exception"))))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    def restore() -> None:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        pending = last_failure + ACCEPT_RETRY_DELAY - loop.time()
        if pending > 0:
            loop.call_later(pending + 0.1, restore)
        else:
            restore()
