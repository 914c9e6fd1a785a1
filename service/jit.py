"""Just-in-time sync: a :class:`UserReader` that fetches a verified but unsynced user from Clerk.

Composed around the user cache in :mod:`service.app`, so every path that
reads users through the composed reader after verifying a token (VerifyToken,
Envoy's Check) gets it while :func:`service.access.authorize` stays as it is.
A user missing from MongoDB is fetched with ``GET /v1/users/{id}``:

- once: concurrent calls for one user share one fetch (single flight);
- at most ``rate_per_s`` fetches a second per process (aiolimiter), so a
  flood of valid tokens cannot exhaust Clerk's shared rate limit;
- within ``bound_s`` (1 s), waiting for the limiter included; past it, or
  when Clerk fails, the call is answered as if the user were not synced;
- a 404 is remembered for ``not_found_ttl_s`` (60 s, cachetools TTLCache).

A fetched user is written through the one conditional write
(:meth:`UserStore.upsert_from_clerk`, a role change audited ``via: "jit"``)
and then read back from MongoDB, never from the cache, which may still hold the miss.
"""

from __future__ import annotations

import asyncio
import logging

from aiolimiter import AsyncLimiter
from cachetools import TTLCache

from service.access import UserReader
from service.clerkapi import ClerkBackend
from service.clerkuser import profile_of
from service.errors import AuthError, ClerkUserNotFound, InvalidEvent
from service.logs import fields
from service.users import UserRecord, UserStore

log = logging.getLogger(__name__)


class JitUsers:
    """Reads as ``inner``; a user it does not have is fetched from Clerk once, then written and returned."""

    def __init__(
        self,
        inner: UserReader,
        store: UserStore,
        clerk: ClerkBackend,
        *,
        bound_s: float = 1.0,
        rate_per_s: float = 20.0,
        not_found_ttl_s: float = 60.0,
        max_not_found: int = 10_000,
    ) -> None:
        self._inner = inner
        self._store = store
        self._clerk = clerk
        self._bound = bound_s
        # One fetch per 1/rate s, no burst: never more than rate_per_s in any second (+1 at its edge).
        self._limiter = AsyncLimiter(1, 1.0 / rate_per_s)
        self._not_found: TTLCache[str, bool] = TTLCache(maxsize=max_not_found, ttl=not_found_ttl_s)
        self._inflight: dict[str, asyncio.Task[UserRecord | None]] = {}

    async def get(self, external_id: str, *, include_tombstones: bool = False) -> UserRecord | None:
        """As ``inner.get``; a user MongoDB does not hold at all (no tombstone either) is fetched first."""
        record = await self._inner.get(external_id, include_tombstones=True)
        if record is None and external_id not in self._not_found:
            task = self._inflight.get(external_id)
            if task is None:
                task = asyncio.create_task(self._fetch(external_id), name=f"jit-sync {external_id[:64]}")
                self._inflight[external_id] = task
                task.add_done_callback(lambda _: self._inflight.pop(external_id, None))
            # Shielded: a caller that goes away does not cancel the fetch the others wait for.
            record = await asyncio.shield(task)
        if record is not None and record.erased and not include_tombstones:
            return None
        return record

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    async def _fetch(self, external_id: str) -> UserRecord | None:
        try:
            async with asyncio.timeout(self._bound):
                await self._limiter.acquire()
                data = await self._clerk.get_user(external_id)
        except ClerkUserNotFound:
            self._not_found[external_id] = True
            log.info("jit sync: not in Clerk", extra=fields(externalId=external_id))
            return None
        except TimeoutError:
            log.warning("jit sync: Clerk did not answer in time", extra=fields(externalId=external_id))
            return None
        except AuthError as exc:
            log.warning("jit sync: Clerk failed", extra=fields(externalId=external_id, reason=exc.reason))
            return None
        try:
            profile = profile_of(data)
        except InvalidEvent as exc:
            log.warning("jit sync: invalid Clerk user", extra=fields(externalId=external_id, error=str(exc)))
            return None
        if profile.external_id != external_id:
            log.warning("jit sync: Clerk answered another user", extra=fields(externalId=external_id))
            return None
        outcome = await self._store.upsert_from_clerk(profile, via="jit")
        log.info("jit sync", extra=fields(externalId=external_id, outcome=outcome.value))
        return await self._store.get(external_id, include_tombstones=True)
