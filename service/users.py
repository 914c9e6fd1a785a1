"""UserStore: every read and write of ``users``, ``webhook_events`` and ``role_changes``.

Each delivery rule of the design is one atomic, conditional database
operation, so several sidecar replicas can write at once without
read-then-write races. Writes use the durable write concern (journaled, or
majority on a replica set): a 2xx is only answered after it returns.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from service.errors import DatabaseUnavailable
from service.logs import fields
from service.roles import DEFAULT_ROLE, Role
from service.settings import DeleteMode

log = logging.getLogger(__name__)

Document = dict[str, Any]
LEDGER_TTL = timedelta(days=7)
LEDGER_WRITE_CONCERN = WriteConcern(w=1, j=False)  # see UserStore.__init__


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    IGNORED = "ignored"
    # What :meth:`UserStore.upsert_from_clerk` did in detail (the webhook answers them all ``applied``).
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"

    @property
    def applied(self) -> bool:
        return self in (Outcome.APPLIED, Outcome.CREATED, Outcome.UPDATED, Outcome.UNCHANGED)


@dataclass(frozen=True, slots=True)
class UserProfile:
    """The fields of a Clerk user that authsvc mirrors (see :mod:`service.clerkuser`)."""

    external_id: str
    name: str
    email: str | None
    role: Role
    is_active: bool
    clerk_updated_at: datetime


@dataclass(frozen=True, slots=True)
class UserRecord:
    external_id: str
    name: str
    email: str | None
    role: Role
    is_active: bool
    created_at: datetime | None
    updated_at: datetime | None
    last_login_at: datetime | None
    deleted_at: datetime | None
    erased: bool = False  # a tombstone: deleted before it was created, or hard-deleted

    @classmethod
    def from_document(cls, doc: Document) -> UserRecord:
        return cls(
            external_id=doc["externalId"],
            name=doc.get("name") or "",
            email=doc.get("email"),
            role=Role.parse(doc.get("role")) or DEFAULT_ROLE,
            is_active=bool(doc.get("isActive")),
            created_at=doc.get("createdAt"),
            updated_at=doc.get("updatedAt"),
            last_login_at=doc.get("lastLoginAt"),
            deleted_at=doc.get("deletedAt"),
            erased="name" not in doc,
        )


def _now() -> datetime:
    # BSON dates hold milliseconds; truncate so what we return equals what is stored.
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@contextlib.asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Database failures become :class:`DatabaseUnavailable` (503 / UNAVAILABLE)."""
    try:
        yield
    except DuplicateKeyError:
        raise
    except PyMongoError as exc:
        log.warning("database error", extra=fields(error=type(exc).__name__, detail=str(exc)[:300]))
        raise DatabaseUnavailable("database unavailable") from exc


MIRRORED = ("name", "email", "role", "isActive", "clerkUpdatedAt", "deletedAt")
_READ: Any = object()  # upsert_from_clerk(stored=...) not given: read it


def compare(profile: UserProfile, stored: Document | None) -> Outcome:
    """What writing ``profile`` over ``stored`` (its :data:`MIRRORED` fields) would do, without writing.

    ``created`` (no document), ``stale`` (a tombstone or deleted user, or
    ``clerkUpdatedAt`` newer than the profile's), ``unchanged`` (every mirrored
    field equal, ``clerkUpdatedAt`` too), else ``updated``.
    """
    if stored is None:
        return Outcome.CREATED
    if "deletedAt" in stored:
        return Outcome.STALE
    held = stored.get("clerkUpdatedAt")
    if held is not None and held > profile.clerk_updated_at:
        return Outcome.STALE
    same = (
        held == profile.clerk_updated_at
        and stored.get("name") == profile.name
        and stored.get("email") == profile.email
        and stored.get("role") == profile.role.wire
        and stored.get("isActive") == profile.is_active
    )
    return Outcome.UNCHANGED if same else Outcome.UPDATED


def _live(external_id: str) -> Document:
    """Filter: this user, not deleted (a delete is terminal)."""
    return {"externalId": external_id, "deletedAt": {"$exists": False}}


class UserStore:
    """All persistence of authsvc, over one ``AsyncDatabase``."""

    def __init__(
        self,
        db: AsyncDatabase[Document],
        *,
        write_concern: WriteConcern,
        delete_mode: DeleteMode = "soft",
    ) -> None:
        self._db = db
        self._delete_mode = delete_mode
        self.users: AsyncCollection[Document] = db.get_collection("users", write_concern=write_concern)
        self.events: AsyncCollection[Document] = db.get_collection("webhook_events", write_concern=write_concern)
        # The ledger entry is written after the effect and need not be durable: every effect is
        # guarded against a repeat (lastSvixId, terminal deletes, forward-only logins), so an entry
        # lost in a crash only makes a redelivery re-check and answer as before. One fsync less.
        self._ledger = db.get_collection("webhook_events", write_concern=LEDGER_WRITE_CONCERN)
        self.role_changes: AsyncCollection[Document] = db.get_collection("role_changes", write_concern=write_concern)
        self.leases: AsyncCollection[Document] = db.get_collection("leases", write_concern=write_concern)

    async def ensure_indexes(self) -> None:
        async with translate_errors():
            await self.users.create_index([("externalId", ASCENDING)], unique=True, name="byExternalId")
            await self.users.create_index([("role", ASCENDING), ("isActive", ASCENDING)], name="byRoleActive")
            await self.events.create_index(
                [("receivedAt", ASCENDING)],
                expireAfterSeconds=int(LEDGER_TTL.total_seconds()),
                name="ledgerTtl",
            )
            await self.role_changes.create_index([("externalId", ASCENDING), ("at", ASCENDING)], name="byUser")

    async def ping(self) -> bool:
        try:
            await self._db.command("ping")
            return True
        except PyMongoError:
            return False

    # --- the dedupe ledger ---------------------------------------------------
    async def record_delivery(self, svix_id: str, event_type: str, external_id: str | None, outcome: Outcome) -> bool:
        """Write the ledger entry, after the effect. False when another delivery recorded it first."""
        entry = {
            "_id": svix_id,
            "type": event_type,
            "externalId": external_id,
            "outcome": outcome.value,
            "receivedAt": _now(),
        }
        async with translate_errors():
            try:
                await self._ledger.insert_one(entry)
            except DuplicateKeyError:
                return False
        return True

    # --- Clerk events --------------------------------------------------------
    async def upsert_from_clerk(
        self,
        profile: UserProfile,
        delivery_id: str | None = None,
        *,
        via: str = "webhook",
        by: str = "clerk",
        stored: Document | None = _READ,
    ) -> Outcome:
        """Apply a Clerk user object unless it is older than what is stored: the ONE conditional user write.

        The webhook (``delivery_id`` = the svix-id), ``authsvc sync`` and
        just-in-time sync all write through here; a role change is audited
        with ``via``. The rule is one conditional write that matches a live
        user whose ``clerkUpdatedAt`` is not newer and that this delivery
        (kept as ``lastSvixId``) has not written already, so a redelivery
        changes nothing. The common case, the role unchanged, is a plain
        ``update_one``; otherwise a conditional upsert that returns the
        previous role for the audit. A duplicate-key error from it means the
        user exists but did not match (newer, deleted, or already written by
        this delivery) or another writer inserted first: retry once as a plain
        conditional update; if that matches nothing, :meth:`_classify` tells
        ``stale`` from "this delivery already applied it".

        Without ``delivery_id`` (sync, JIT) the stored state is compared first
        (``stored``, the :data:`MIRRORED` fields from :meth:`mirrored`, or read
        here) and an ``unchanged`` or ``stale`` user costs no write. Returns
        ``created``, ``updated``, ``unchanged`` or ``stale``.
        """
        known_role: str | None = None
        if delivery_id is None:
            if stored is _READ:
                stored = (await self.mirrored([profile.external_id])).get(profile.external_id)
            planned = compare(profile, stored)
            if planned in (Outcome.UNCHANGED, Outcome.STALE):
                return planned
            known_role = None if stored is None else stored.get("role")
        now = _now()
        # "$not $gt"/"$ne" match a missing field too, without an $or: SecantusDB
        # plans an $or as a collection scan, and this stays an index lookup.
        query: Document = {
            **_live(profile.external_id),
            "clerkUpdatedAt": {"$not": {"$gt": profile.clerk_updated_at}},
        }
        if delivery_id is not None:
            query["lastSvixId"] = {"$ne": delivery_id}
        fields: Document = {
            "name": profile.name,
            "email": profile.email,
            "role": profile.role.wire,
            "isActive": profile.is_active,
            "clerkUpdatedAt": profile.clerk_updated_at,
            "lastSvixId": delivery_id,
            "updatedAt": now,
        }
        update = {"$set": fields, "$setOnInsert": {"createdAt": now}}
        projection = {"role": 1}
        if delivery_id is None and stored is None:
            # Known absent (the comparison saw no document, not even a tombstone): the upsert's insert
            # as a plain insert, the cheapest write. A writer that inserted since makes it collide;
            # the conditional update below then decides as always.
            async with translate_errors():
                try:
                    await self.users.insert_one({"externalId": profile.external_id, **fields, "createdAt": now})
                    return Outcome.CREATED
                except DuplicateKeyError:
                    pass
        async with translate_errors():
            # Skipped when the comparison above saw no document or another role: it could not match.
            if delivery_id is not None or known_role == profile.role.wire:
                same_role = await self.users.update_one({**query, "role": profile.role.wire}, {"$set": fields})
                if same_role.matched_count:
                    return Outcome.UPDATED
            try:
                before = await self.users.find_one_and_update(
                    query, update, projection=projection, upsert=True, return_document=ReturnDocument.BEFORE
                )
                inserted = before is None
            except DuplicateKeyError:
                before = await self.users.find_one_and_update(
                    query, update, projection=projection, return_document=ReturnDocument.BEFORE
                )
                if before is None:
                    return await self._classify(profile.external_id, delivery_id)
                inserted = False
        if not inserted and before is not None and before.get("role") != profile.role.wire:
            await self._audit(profile.external_id, before.get("role"), profile.role.wire, by=by, via=via)
        return Outcome.CREATED if inserted else Outcome.UPDATED

    async def _classify(self, external_id: str, delivery_id: str | None) -> Outcome:
        """Why an upsert matched nothing: this delivery already wrote it (a retry), or the event is stale."""
        if delivery_id is None:
            return Outcome.STALE
        async with translate_errors():
            mine = await self.users.find_one({**_live(external_id), "lastSvixId": delivery_id}, {"_id": 1})
        return Outcome.APPLIED if mine else Outcome.STALE

    async def delete(self, external_id: str) -> Outcome:
        """Apply ``user.deleted``: terminal. Before any create it leaves a tombstone."""
        now = _now()
        update: Document = {
            "$set": {"isActive": False, "deletedAt": now, "updatedAt": now},
            "$setOnInsert": {"createdAt": now},
        }
        if self._delete_mode == "hard":
            update["$unset"] = {"name": "", "email": ""}
        async with translate_errors():
            try:
                await self.users.update_one(_live(external_id), update, upsert=True)
            except DuplicateKeyError:
                return Outcome.STALE  # already deleted
        return Outcome.APPLIED

    async def record_login(self, external_id: str, at: datetime) -> Outcome:
        """``lastLoginAt`` becomes the newer of the stored value and ``at``; unknown users are ignored."""
        query = {
            **_live(external_id),
            "name": {"$exists": True},
            "lastLoginAt": {"$not": {"$gte": at}},  # missing, null or older
        }
        async with translate_errors():
            result = await self.users.update_one(query, {"$set": {"lastLoginAt": at, "updatedAt": _now()}})
            if result.matched_count:
                return Outcome.APPLIED
            exists = await self.users.find_one({**_live(external_id), "name": {"$exists": True}}, {"_id": 1})
        return Outcome.STALE if exists else Outcome.IGNORED

    # --- reads ---------------------------------------------------------------
    async def get(self, external_id: str, *, include_tombstones: bool = False) -> UserRecord | None:
        """The synced user, or None when unknown.

        A tombstone (deleted before it was created, or hard-deleted) counts as
        unknown unless ``include_tombstones``: access checks want to see it, inactive.
        """
        async with translate_errors():
            doc = await self.users.find_one({"externalId": external_id})
        if doc is None:
            return None
        record = UserRecord.from_document(doc)
        return None if record.erased and not include_tombstones else record

    async def mirrored(self, external_ids: list[str]) -> dict[str, Document]:
        """The :data:`MIRRORED` fields of these users (tombstones too), by external id: one read for a page."""
        projection = {"_id": 0, "externalId": 1, **dict.fromkeys(MIRRORED, 1)}
        async with translate_errors():
            cursor = self.users.find({"externalId": {"$in": external_ids}}, projection)
            return {doc["externalId"]: doc async for doc in cursor}

    async def live_ids(self) -> set[str]:
        """External ids of every user not deleted (what ``sync --prune`` may prune)."""
        async with translate_errors():
            cursor = self.users.find({"deletedAt": {"$exists": False}}, {"_id": 0, "externalId": 1})
            return {doc["externalId"] async for doc in cursor}

    # --- roles -----------------------------------------------------------------
    async def set_role(
        self, external_id: str, role: Role, *, expected: Role, by: str, via: str = "grpc"
    ) -> UserRecord | None:
        """Set the role of a live user if it is still ``expected`` (compare-and-set), and audit the change.

        None when no live user holds ``expected`` (changed or deleted since it
        was read). The last-superadmin rule is the caller's (:mod:`service.rolechanges`).
        """
        query: Document = {**_live(external_id), "name": {"$exists": True}, "role": expected.wire}
        now = _now()
        async with translate_errors():
            after = await self.users.find_one_and_update(
                query,
                {"$set": {"role": role.wire, "updatedAt": now}},
                return_document=ReturnDocument.AFTER,
            )
        if after is None:
            return None
        if expected is not role:
            await self._audit(external_id, expected.wire, role.wire, by=by, via=via)
        return UserRecord.from_document(after)

    async def active_superadmins(self, limit: int = 2, *, excluding: str | None = None) -> list[str]:
        """External ids of active superadmins (at most ``limit``), ``excluding`` one if given."""
        query: Document = {"role": Role.SUPERADMIN.wire, "isActive": True, "deletedAt": {"$exists": False}}
        if excluding is not None:
            query["externalId"] = {"$ne": excluding}
        async with translate_errors():
            cursor = self.users.find(query, {"externalId": 1}).limit(limit)
            return [doc["externalId"] async for doc in cursor]

    async def _audit(self, external_id: str, old: object, new: str, *, by: str, via: str) -> None:
        record = {"externalId": external_id, "from": old, "to": new, "by": by, "at": _now(), "via": via}
        async with translate_errors():
            await self.role_changes.insert_one(record)
        log.info("role changed", extra=fields(externalId=external_id, role_from=old, role_to=new, by=by, via=via))
