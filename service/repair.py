"""Periodic repair: the sidecar reconciles from Clerk every ``AUTHSVC_SYNC_INTERVAL_S``, one replica at a time.

A lease document in MongoDB (``leases``, ``_id: "sync"``) decides who runs.
Taking it is one conditional upsert: it matches only an expired lease, so
while another replica holds it the insert collides on ``_id`` and this one
skips its turn. The holder renews it after every page; a holder that dies
stops renewing and its lease lapses after ``ttl_s``, when another replica
takes over. After a run the holder keeps the lease until the next run is due,
so several replicas together run about once per interval, not once each.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from pymongo.errors import PyMongoError

from service.clerkapi import ClerkBackend
from service.errors import AuthError
from service.leases import Lease
from service.logs import fields
from service.metrics import sync_last_success
from service.sync import SyncIncomplete, reconcile
from service.users import UserStore

log = logging.getLogger(__name__)

LEASE_ID = "sync"


class LeaseLost(Exception):
    """Another replica holds the lease now: this run stops."""


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Repairer:
    """Runs :func:`service.sync.reconcile` (no pruning, ``via: "sync"``) every ``interval_s`` under the lease."""

    def __init__(
        self,
        store: UserStore,
        clerk: ClerkBackend,
        interval_s: float,
        *,
        ttl_s: float = 60.0,
        holder: str | None = None,
    ) -> None:
        self._store = store
        self._clerk = clerk
        self._interval = interval_s
        self._ttl = ttl_s
        self.lease = Lease(store.leases, holder or f"repair-{uuid.uuid4().hex[:12]}", name=LEASE_ID)
        self._task: asyncio.Task[None] | None = None
        self._running = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="periodic-repair")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        mid_run = self._running
        task.cancel()
        await asyncio.wait({task}, timeout=5.0)
        if mid_run:  # stopped mid-run: let another replica take over now, not at expiry
            try:
                await asyncio.wait_for(self.lease.release(), timeout=2.0)
            except (PyMongoError, TimeoutError):
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # a bug must not end the schedule
                log.exception("periodic sync crashed")
            await asyncio.sleep(self._interval)

    async def run_once(self) -> bool:
        """One turn: reconcile if we get the lease. True when a reconcile completed."""
        started = _now()
        try:
            if not await self.lease.acquire(self._ttl):
                return False
        except PyMongoError as exc:
            log.warning("periodic sync: lease unavailable", extra=fields(error=type(exc).__name__))
            return False
        self._running = True
        done = False
        try:
            summary = await reconcile(self._clerk, self._store, via="sync", on_page=self._renew)
            done = True
            sync_last_success().set_to_current_time()
            log.info("periodic sync", extra=fields(holder=self.lease.holder, summary=summary.line()))
        except LeaseLost:
            log.warning("periodic sync: lease lost mid-run; stopped", extra=fields(holder=self.lease.holder))
        except (AuthError, SyncIncomplete) as exc:
            log.warning("periodic sync failed", extra=fields(error=str(exc), reason=getattr(exc, "reason", None)))
        finally:
            self._running = False
        # Keep the lease until the next run is due, so the replicas share one schedule.
        remaining = self._interval - (_now() - started).total_seconds()
        try:
            await self.lease.extend(max(remaining, 0.0))
        except PyMongoError:
            pass
        return done

    async def _renew(self) -> None:
        try:
            ours = await self.lease.extend(self._ttl)
        except PyMongoError as exc:
            raise LeaseLost("lease unavailable") from exc
        if not ours:
            raise LeaseLost("another replica holds the lease")
