"""Whether MongoDB answers this process right now: one ping loop, shared by the user cache, health and ``/readyz``.

Both processes run one :class:`DatabaseMonitor` once the database has first
answered (:mod:`service.startup` waits for that). It pings every
``interval_s`` with a ``timeout_s`` budget (``pymongo.timeout``), so:

- a refused connection is noticed at the next ping, within ``quick_s``:
  the driver's own monitor has already dropped the server, and with no
  primary known the ping waits only that long for one (a server dropped
  after one broken connection is found again in milliseconds);
- a silent partition (connections accepted, nothing answers) is noticed
  when a ping times out: within ``interval_s + timeout_s`` (2 s);
- while down it pings every ``retry_s``, and a server that answers again is
  noticed within about half a second (the driver re-checks a server at most
  every 0.5 s while an operation waits for it).

"Up" means a primary answers: during an election the database is down for
authsvc, and cached answers carry the calls (see :mod:`service.usercache`).
``authsvc_database_up`` follows the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import pymongo
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from service.logs import fields
from service.metrics import database_up

log = logging.getLogger(__name__)


class DatabaseMonitor:
    """The reachability of one database, as seen by this process."""

    def __init__(
        self,
        db: AsyncDatabase[dict[str, Any]],
        *,
        interval_s: float = 0.5,
        timeout_s: float = 1.5,
        quick_s: float = 0.5,
        retry_s: float = 0.25,
    ) -> None:
        self._db = db
        self._interval = interval_s
        self._timeout = timeout_s
        self._quick = quick_s
        self._retry = retry_s
        self._up = asyncio.Event()
        self.started = False  # the database answered once and the loop runs
        self.last_ok: float | None = None  # monotonic time of the last reply
        self.up_since = 0.0  # monotonic time the current (or last) reachable spell began
        self._down_since: float | None = None
        self._listeners: list[Callable[[], None]] = []
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._gauge = database_up()
        self._gauge.set(0)

    @property
    def up(self) -> bool:
        """True while the database answers (as of the last ping or reply)."""
        return self._up.is_set()

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after every check (gauges that follow the state)."""
        self._listeners.append(listener)

    def start(self) -> None:
        """The database has answered: consider it up and watch it from now on."""
        if self._task is None:
            self.started = True
            self.confirm()
            self._task = asyncio.create_task(self._run(), name="database-monitor")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        # A ping in flight ends within its timeout; cancelling the driver mid-connect can leak its socket.
        await asyncio.wait({task}, timeout=self._timeout + 1.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_up(self) -> None:
        """Return once the database answers."""
        await self._up.wait()

    def confirm(self) -> None:
        """The database just answered this process."""
        now = time.monotonic()
        self.last_ok = now
        if not self._up.is_set():
            self.up_since = now
            self._up.set()
            self._gauge.set(1)
            if self._down_since is not None:
                log.info("database reachable again", extra=fields(down_s=round(now - self._down_since, 2)))
                self._down_since = None

    def _lost(self, reason: str) -> None:
        if not self._up.is_set():
            return
        self._up.clear()
        self._gauge.set(0)
        self._down_since = time.monotonic()
        log.warning("database unreachable", extra=fields(error=reason))

    async def check(self) -> bool:
        """Ping once (within the timeout); record and return whether the database answered."""
        known = self._db.client.topology_description.has_writable_server()
        try:
            with pymongo.timeout(self._timeout if known else self._quick):
                await self._db.command("ping")
        except PyMongoError as exc:
            self._lost(f"{type(exc).__name__}: {str(exc)[:200]}")
            return False
        self.confirm()
        return True

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval if self.up else self._retry)
            if self._stopping.is_set():
                return
            await self.check()
            for listener in self._listeners:
                listener()
