"""Fresh, fast user reads for VerifyToken, Check and GetUser: a cache that a change stream keeps honest.

VerifyToken reads the caller's user on every call. Sessions are presented
many times a minute, so that read dominates its cost. This cache serves
repeated reads from memory while a MongoDB change stream on ``users`` is
followed, and drops an entry as soon as the stream reports a write to it
(within milliseconds, from any process: the sidecar, SetRole, an operator).

Every reply of the stream (a change, or an empty ``getMore`` every half
second when nothing changes) *confirms* the cache: every entry is true as of
that moment. Whether the database answers reads comes from the process's
:class:`service.dbmonitor.DatabaseMonitor` (its primary answers a ping). A
stream may go on confirming while no primary answers (an election: the old
primary, now a secondary, still replicates), so confirmations and
reachability are kept apart. A read is answered:

- **fresh**, from memory, while the stream is followed and has confirmed the
  cache since the database last became reachable; a miss reads MongoDB
  (within ``read_timeout_s``) and is cached;
- **stale**, from memory, while the database is unreachable: an entry stays
  *confirmed as of* the last confirmation and is served for ``stale_s``
  seconds after it; a user not in the cache, or any read past the bound, is
  :class:`DatabaseUnavailable` at once, with no database round trip;
- **through**, from MongoDB and not cached, while the database answers but
  the stream has not confirmed the cache since (reconnecting, resuming, or a
  standalone server without change streams); should that read fail, an
  entry within the bound answers instead.

The stream is resumed from its last resume token, so a write made while this
process could not see the database (another replica applied a ban) drops its
entry when the stream catches up; a stream that cannot be resumed is opened
afresh and the cache emptied first. ``stale_s=0`` never answers stale.
A read that overlaps an invalidation is not cached: it may have read the
state from before the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import pymongo
from cachetools import LRUCache
from pymongo.asynchronous.change_stream import AsyncChangeStream
from pymongo.errors import OperationFailure, PyMongoError

from service.dbmonitor import DatabaseMonitor
from service.errors import DatabaseUnavailable
from service.logs import fields
from service.metrics import USER_CACHE, user_cache_stale_seconds
from service.users import UserRecord, UserStore

log = logging.getLogger(__name__)

_HIT, _MISS = USER_CACHE.labels("hit"), USER_CACHE.labels("miss")

# Only the key of the changed user travels: fullDocument.externalId.
_PIPELINE: list[dict[str, Any]] = [{"$project": {"operationType": 1, "documentKey": 1, "fullDocument.externalId": 1}}]
_CHANGE_STREAMS_UNSUPPORTED = (40573, 40324)  # standalone server; unknown $changeStream stage
_CANNOT_RESUME = (260, 280, 286)  # InvalidResumeToken, ChangeStreamFatalError, ChangeStreamHistoryLost


class UserCache:
    """Reads as :meth:`UserStore.get`, served from memory while that is safe (see the module)."""

    def __init__(
        self,
        store: UserStore,
        monitor: DatabaseMonitor,
        *,
        stale_s: float = 60.0,
        max_entries: int = 10_000,
        max_age_s: float = 60.0,
        read_timeout_s: float = 2.0,
        retry_s: float = 0.25,
        max_await_ms: int = 500,
    ) -> None:
        self._store = store
        self._monitor = monitor
        self._stale = stale_s
        self._max_age = max_age_s
        self._read_timeout = read_timeout_s
        self._retry = retry_s
        self._max_await = max_await_ms
        self._entries: LRUCache[str, tuple[float, UserRecord | None]] = LRUCache(max_entries)
        self._generation = 0  # bumped on every invalidation
        self._following = False  # the stream is open and has not failed since
        self._confirmed: float | None = None  # every entry is true as of this monotonic time
        self._token: Mapping[str, Any] | None = None  # where a reopened stream resumes
        self._unsupported = False
        self._started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._gauge = user_cache_stale_seconds()
        monitor.add_listener(self._update_gauge)

    @property
    def live(self) -> bool:
        """True while answers come fresh from memory (the stream is followed and has confirmed the cache)."""
        return (
            self._following
            and self._monitor.up
            and self._confirmed is not None
            and self._confirmed >= self._monitor.up_since
        )

    def within_bound(self) -> bool:
        """True while cached entries may still answer for an unreachable database (``AUTHSVC_STALE_S``)."""
        return self._confirmed is not None and time.monotonic() - self._confirmed <= self._stale

    def holds(self, external_id: str) -> bool:
        """Whether an entry for ``external_id`` is held (a read that overlapped an invalidation is not kept)."""
        return external_id in self._entries

    @property
    def stale_seconds(self) -> float:
        """0 while :attr:`live` (or with no change streams: nothing is served from memory), else the entries' age."""
        if self.live or self._unsupported:
            return 0.0
        return time.monotonic() - (self._confirmed if self._confirmed is not None else self._started)

    async def start(self) -> None:
        """Start following the change stream (in the background, once the database answers)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="user-cache")

    async def close(self) -> None:
        self._closing = True  # PyMongo may turn a cancellation inside a driver call into an error of its own
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: shutdown must not hang on a driver call being cancelled.
            await asyncio.wait({task}, timeout=5.0)
            if not task.done():
                log.warning("user cache stream did not stop within 5 s")
        self._following = False
        self._invalidate(None)

    async def get(self, external_id: str, *, include_tombstones: bool = False) -> UserRecord | None:
        """As :meth:`UserStore.get`, from memory while that is safe; :class:`DatabaseUnavailable` otherwise."""
        record = await self._get(external_id)
        return None if record is not None and record.erased and not include_tombstones else record

    async def _get(self, external_id: str) -> UserRecord | None:
        entry = self._entries.get(external_id)
        if self.live:
            if entry is not None and time.monotonic() - entry[0] < self._max_age:
                _HIT.inc()
                return entry[1]
            _MISS.inc()
            generation = self._generation
            record = await self._read(external_id, entry)
            if self.live and generation == self._generation:
                self._entries[external_id] = (time.monotonic(), record)
            return record
        if not self._monitor.up:
            if entry is not None and self.within_bound():
                _HIT.inc()
                return entry[1]
            _MISS.inc()
            raise DatabaseUnavailable("database unavailable")
        _MISS.inc()
        return await self._read(external_id, entry)

    async def _read(self, external_id: str, entry: tuple[float, UserRecord | None] | None) -> UserRecord | None:
        try:
            with pymongo.timeout(self._read_timeout):
                return await self._store.get(external_id, include_tombstones=True)
        except DatabaseUnavailable:
            if entry is not None and self.within_bound():
                return entry[1]
            raise

    def _invalidate(self, external_id: str | None) -> None:
        self._generation += 1
        if external_id is None:
            self._entries.clear()
        else:
            self._entries.pop(external_id, None)

    def _update_gauge(self) -> None:
        self._gauge.set(self.stale_seconds)

    async def _follow(self) -> None:
        failing = False  # one warning per failure streak, not one per retry
        while not self._closing:
            await self._monitor.wait_up()  # no attempt, and no log line, while the database is known down
            try:
                stream = await self._open()
            except OperationFailure as exc:
                if exc.code in _CHANGE_STREAMS_UNSUPPORTED:
                    self._unsupported = True
                    log.warning("change streams unsupported: user cache off, every read goes to MongoDB")
                    return
                if self._token is not None and (
                    exc.code in _CANNOT_RESUME or exc.has_error_label("NonResumableChangeStreamError")
                ):
                    # The server cannot resume from the token (history lost, say): start over, empty.
                    log.warning("user cache stream cannot resume; starting afresh", extra=fields(code=exc.code))
                    self._token = None
                    continue
                failing = self._failed(failing, exc)
            except PyMongoError as exc:
                failing = self._failed(failing, exc)
            else:
                log.info("user cache following the users change stream", extra=fields(resumed=self._token is not None))
                failing = False
                try:
                    await self._drain(stream)
                except PyMongoError as exc:
                    failing = self._failed(failing, exc)
                finally:
                    # Bounded: closing a cursor on a database that no longer answers would wait for
                    # server selection, and hold up shutdown with it.
                    with contextlib.suppress(PyMongoError), pymongo.timeout(self._read_timeout):
                        await stream.close()
            self._following = False
            if self._closing:
                return
            await asyncio.sleep(self._retry)

    def _failed(self, failing: bool, exc: PyMongoError) -> bool:
        self._following = False
        if not failing:
            log.warning(
                "user cache stream lost; answering from confirmed entries",
                extra=fields(error=type(exc).__name__, stale_s=self._stale),
            )
        return True

    async def _open(self) -> AsyncChangeStream[dict[str, Any]]:
        resume = self._token
        with pymongo.timeout(self._read_timeout):
            stream = await self._store.users.watch(
                _PIPELINE, full_document="updateLookup", resume_after=resume, max_await_time_ms=self._max_await
            )
        if resume is None:
            # Writes before the stream opened were not seen: start empty.
            self._invalidate(None)
        return stream

    async def _drain(self, stream: AsyncChangeStream[dict[str, Any]]) -> None:
        self._following = True
        while True:
            asked = time.monotonic()
            with pymongo.timeout(self._read_timeout):
                change = await stream.try_next()
            self._token = stream.resume_token
            if change is not None:
                document = change.get("fullDocument") or {}
                key = document.get("externalId")
                self._invalidate(key if isinstance(key, str) else None)
            self._confirmed = asked
