"""Fresh, fast user reads for VerifyToken: a bounded cache that a change stream keeps honest.

VerifyToken reads the caller's user on every call. Sessions are presented
many times a minute, so that read dominates its cost. This cache serves
repeated reads from memory while a MongoDB change stream on ``users`` is
open, and drops an entry as soon as the stream reports a write to it (within
milliseconds, from any process: the sidecar, SetRole, an operator).

While the stream is not open (starting, database down, a standalone server
without change streams), nothing is cached and every read goes to MongoDB,
so a database outage is still ``UNAVAILABLE`` and never a stale answer.
A read that overlaps an invalidation is not cached: it may have read the
state from before the write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cachetools import LRUCache
from pymongo.errors import OperationFailure, PyMongoError

from service.logs import fields
from service.metrics import USER_CACHE
from service.users import UserRecord, UserStore

log = logging.getLogger(__name__)

_HIT, _MISS = USER_CACHE.labels("hit"), USER_CACHE.labels("miss")

# Only the key of the changed user travels: fullDocument.externalId.
_PIPELINE: list[dict[str, Any]] = [{"$project": {"operationType": 1, "documentKey": 1, "fullDocument.externalId": 1}}]
_CHANGE_STREAMS_UNSUPPORTED = (40573, 40324)  # standalone server; unknown $changeStream stage


class UserCache:
    """Reads as :meth:`UserStore.get`, served from memory while that is safe."""

    def __init__(
        self,
        store: UserStore,
        *,
        max_entries: int = 10_000,
        max_age_s: float = 60.0,
        retry_s: float = 1.0,
    ) -> None:
        self._store = store
        self._max_entries = max_entries
        self._max_age = max_age_s
        self._retry = retry_s
        self._entries: LRUCache[str, tuple[float, UserRecord | None]] = LRUCache(max_entries)
        self._generation = 0  # bumped on every invalidation
        self._live = False
        self._task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        """True while the change stream is open and the cache is in use."""
        return self._live

    async def start(self) -> None:
        """Start following the change stream (in the background; reads work meanwhile)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="user-cache")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: shutdown must not hang on a driver call being cancelled.
            await asyncio.wait({task}, timeout=5.0)
            if not task.done():
                log.warning("user cache stream did not stop within 5 s")
        self._disable()

    async def get(self, external_id: str, *, include_tombstones: bool = False) -> UserRecord | None:
        """As :meth:`UserStore.get`, from memory while the change stream is open."""
        record = await self._get(external_id)
        return None if record is not None and record.erased and not include_tombstones else record

    async def _get(self, external_id: str) -> UserRecord | None:
        if self._live:
            entry = self._entries.get(external_id)
            if entry is not None and time.monotonic() - entry[0] < self._max_age:
                _HIT.inc()
                return entry[1]
        _MISS.inc()
        generation = self._generation
        record = await self._store.get(external_id, include_tombstones=True)
        if self._live and generation == self._generation:
            self._entries[external_id] = (time.monotonic(), record)
        return record

    def _invalidate(self, external_id: str | None) -> None:
        self._generation += 1
        if external_id is None:
            self._entries.clear()
        else:
            self._entries.pop(external_id, None)

    def _disable(self) -> None:
        self._live = False
        self._invalidate(None)

    async def _follow(self) -> None:
        while True:
            try:
                async with await self._store.users.watch(_PIPELINE, full_document="updateLookup") as stream:
                    # Writes before the stream opened were not seen: start empty.
                    self._invalidate(None)
                    self._live = True
                    log.info("user cache following the users change stream")
                    async for change in stream:
                        document = change.get("fullDocument") or {}
                        key = document.get("externalId")
                        self._invalidate(key if isinstance(key, str) else None)
            except OperationFailure as exc:
                self._disable()
                if exc.code in _CHANGE_STREAMS_UNSUPPORTED:
                    log.warning("change streams unsupported: user cache off, every read goes to MongoDB")
                    return
                log.warning("user cache stream failed", extra=fields(error=type(exc).__name__, code=exc.code))
            except PyMongoError as exc:
                self._disable()
                log.warning("user cache stream lost; reading MongoDB directly", extra=fields(error=type(exc).__name__))
            self._disable()
            await asyncio.sleep(self._retry)
