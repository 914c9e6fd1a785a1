"""Revoked sessions: the one write the sidecar makes, and the in-process set every token check consults.

The sidecar records a ``session.ended``/``.removed``/``.revoked`` delivery in
``revoked_sessions`` (:func:`revoke`). Each gRPC process holds the session ids
of that collection in memory (:class:`RevokedSessions`), so the per-call cost
of the rule is a dictionary lookup:

- loaded at startup, before the first call is served; until the first load
  succeeds, :attr:`RevokedSessions.loaded` is false and a token with a ``sid``
  cannot be judged (the caller answers ``UNAVAILABLE``);
- kept current by a change stream on the collection (milliseconds behind the
  sidecar's write). The stream is opened *before* each (re)load, so nothing
  written in between is missed;
- bounded by expiry: an entry leaves the set at its ``expireAt`` (a lookup
  past it misses, and a sweep drops it), as the TTL index drops the document;
- revocations are only ever added. While the stream is down (a database
  outage, a partition of this process) the set keeps everything it holds and
  tries again every ``retry_s``; when the stream is back the whole collection
  is read again, which is how a revocation made during the outage arrives.
  Reloading rather than resuming needs no resume token that may have aged out
  of the oplog, and costs one read of a collection that only holds a week.
- on a server without change streams (a standalone ``mongod``: development
  only) the collection is read again every ``poll_s`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from service import metrics
from service.logs import fields

# The store's own clock (milliseconds, as BSON keeps them) and database-error mapping, shared, not copied.
from service.users import Document, Outcome, _now, translate_errors

log = logging.getLogger(__name__)

KEEP_AT_LEAST = timedelta(days=7)
_CHANGE_STREAMS_UNSUPPORTED = (40573, 40324)  # standalone server; unknown $changeStream stage
_PIPELINE: list[dict[str, Any]] = [
    {"$match": {"operationType": {"$in": ["insert", "replace", "update"]}}},
    {"$project": {"fullDocument._id": 1, "fullDocument.expireAt": 1}},
]


@dataclass(frozen=True, slots=True)
class Revocation:
    """A Clerk session that may no longer be used: its ``sid``, user, final status and natural expiry."""

    session_id: str
    user_id: str
    status: str
    expire_at: datetime | None  # data.expire_at: when the session would have expired anyway


async def revoke(collection: AsyncCollection[Document], revocation: Revocation, svix_id: str) -> Outcome:
    """Record ``revocation`` (durably, with the collection's write concern); nothing ever removes it early.

    ``expireAt`` is the later of the session's own expiry and a week from
    now. The first event for a session is ``applied``; a later one ``stale``.
    The delivery's ``svixId`` is kept, so its own retry (after a crash before
    its ledger entry) is ``applied`` again, harmlessly.
    """
    at = _now()
    expire_at = max(at + KEEP_AT_LEAST, revocation.expire_at or at)
    document = {
        "_id": revocation.session_id,
        "userId": revocation.user_id,
        "status": revocation.status,
        "at": at,
        "expireAt": expire_at,
        "svixId": svix_id,
    }
    async with translate_errors():
        try:
            await collection.insert_one(document)
        except DuplicateKeyError:
            held = await collection.find_one({"_id": revocation.session_id}, {"svixId": 1})
            return Outcome.APPLIED if held is not None and held.get("svixId") == svix_id else Outcome.STALE
    log.info("session revoked", extra=fields(sid=revocation.session_id, userId=revocation.user_id))
    return Outcome.APPLIED


def _epoch(value: object) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


class RevokedSessions:
    """The session ids of ``revoked_sessions`` not yet expired, in memory: ``sid in revoked``."""

    def __init__(
        self,
        collection: AsyncCollection[Document],
        *,
        retry_s: float = 0.5,
        poll_s: float = 0.5,
        sweep_s: float = 60.0,
    ) -> None:
        self._collection = collection
        self._retry = retry_s
        self._poll = poll_s
        self._sweep_every = sweep_s
        self._until: dict[str, float] = {}  # sid -> expireAt (Unix seconds)
        self._loaded = False
        self._live = False
        self._tasks: list[asyncio.Task[None]] = []

    def __contains__(self, session_id: str) -> bool:
        until = self._until.get(session_id)
        return until is not None and until > time.time()

    def __len__(self) -> int:
        return len(self._until)

    @property
    def loaded(self) -> bool:
        """True once the collection was read: from then on the set can answer (it never forgets)."""
        return self._loaded

    @property
    def live(self) -> bool:
        """True while the change stream is open."""
        return self._live

    async def start(self, wait_s: float = 10.0) -> None:
        """Follow the collection in the background; wait (at most ``wait_s``) for the first load to be tried."""
        if self._tasks:
            return
        first = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._follow(first), name="revoked-sessions"),
            asyncio.create_task(self._sweep_loop(), name="revoked-sessions-sweep"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(first.wait(), wait_s)

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: shutdown must not hang on a driver call being cancelled.
            await asyncio.wait(tasks, timeout=5.0)
        self._live = False

    # --- following the collection ------------------------------------------------------------
    async def _follow(self, first: asyncio.Event) -> None:
        while True:
            try:
                async with await self._collection.watch(_PIPELINE, full_document="updateLookup") as stream:
                    await self._reload()  # after the stream opened: nothing written in between is lost
                    first.set()
                    self._live = True
                    log.info("following revoked_sessions", extra=fields(held=len(self._until)))
                    async for change in stream:
                        self._add(change.get("fullDocument"))
            except OperationFailure as exc:
                if exc.code in _CHANGE_STREAMS_UNSUPPORTED:
                    self._live = False
                    log.warning("change streams unsupported: revoked sessions are read every poll interval")
                    await self._poll_forever(first)
                    return
                self._lost(exc)
            except PyMongoError as exc:
                self._lost(exc)
            except Exception:
                # Revocations must keep arriving whatever happens: say it loudly and follow again.
                log.exception("revoked_sessions follower failed; following again")
            first.set()
            self._live = False  # also when the stream ended (invalidated: the collection was dropped)
            await asyncio.sleep(self._retry)

    async def _poll_forever(self, first: asyncio.Event) -> None:
        while True:
            try:
                await self._reload()
            except PyMongoError as exc:
                log.warning("revoked sessions read failed", extra=fields(error=type(exc).__name__))
            first.set()
            await asyncio.sleep(self._poll)

    def _lost(self, exc: PyMongoError) -> None:
        if self._live:
            log.warning(
                "revoked_sessions stream lost; keeping the revoked sessions held",
                extra=fields(error=type(exc).__name__, held=len(self._until)),
            )
        self._live = False

    async def _reload(self) -> None:
        now = datetime.now(UTC)
        cursor = self._collection.find({"expireAt": {"$gt": now}}, {"expireAt": 1})
        found = {doc["_id"]: until async for doc in cursor if (until := _epoch(doc.get("expireAt"))) is not None}
        self._until.update(found)  # a union: revocations are only added
        self._loaded = True
        self._count()

    def _add(self, document: Document | None) -> None:
        # None: an update's document already gone (the TTL monitor); nothing to add.
        if document is None:
            return
        until = _epoch(document.get("expireAt"))
        if isinstance(document.get("_id"), str) and until is not None:
            self._until[document["_id"]] = max(until, self._until.get(document["_id"], until))
            self._count()

    # --- expiry -----------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_every)
            self.sweep()

    def sweep(self) -> None:
        """Drop the entries past their expiry (lookups already miss them)."""
        now = time.time()
        if any(until <= now for until in self._until.values()):
            self._until = {sid: until for sid, until in self._until.items() if until > now}
            self._count()

    def _count(self) -> None:
        metrics.revoked_sessions().set(len(self._until))
