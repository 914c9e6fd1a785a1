"""UserStore: every read and write of ``users``, ``webhook_events`` and ``role_changes``.

It also owns the database's other collections and their indexes (``leases``,
``revoked_sessions``), which :mod:`service.repair` and
:mod:`service.revocations` read and write.

Each delivery rule of the design is one atomic, conditional database
operation, so several sidecar replicas can write at once without
read-then-write races. Writes use the durable write concern (journaled, or
majority on a replica set): a 2xx is only answered after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, InsertOne, ReturnDocument, UpdateOne, WriteConcern
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError

from service.database import IndexConflict
from service.errors import DatabaseUnavailable
from service.ledger import DUPLICATE_KEY, LedgerWriter
from service.logs import fields
from service.roles import DEFAULT_ROLE, Role
from service.settings import DeleteMode

log = logging.getLogger(__name__)

Document = dict[str, Any]
LEDGER_TTL = timedelta(days=7)
LEDGER_WRITE_CONCERN = WriteConcern(w=1, j=False)  # see UserStore.__init__
MIRRORED_CHUNK = 50  # ids per query of UserStore.mirrored
ROLE_ONLY = {"role": 1}  # the projection of a write that returns the role it replaced, for the audit


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


@dataclass(frozen=True, slots=True)
class MirrorWrite:
    """The ONE conditional write of a Clerk user object, as filter and update, for every path that writes one.

    ``query`` matches a live user whose ``clerkUpdatedAt`` is not newer than
    the profile's and (for a webhook delivery) that this delivery has not
    written already; ``fields`` is what it sets. The per-user path
    (:meth:`UserStore.upsert_from_clerk`: webhook, JIT) and the bulk path
    (:meth:`UserStore.upsert_page_from_clerk`: sync) both build it here.
    """

    profile: UserProfile
    query: Document
    fields: Document
    now: datetime

    @classmethod
    def of(cls, profile: UserProfile, delivery_id: str | None = None) -> MirrorWrite:
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
        return cls(profile, query, fields, now)

    @property
    def update(self) -> Document:
        """The conditional upsert's update: the mirrored fields, ``createdAt`` on insert."""
        return {"$set": self.fields, "$setOnInsert": {"createdAt": self.now}}

    def insert(self) -> Document:
        """The document the upsert would insert: for a user known to be absent, a plain insert (the cheapest write)."""
        return {"externalId": self.profile.external_id, **self.fields, "createdAt": self.now}

    def same_role(self, role: object) -> Document:
        """``query`` narrowed to a user whose role is still ``role``: a match needs no read for the audit."""
        return {**self.query, "role": role}

    def op(self, stored: Document | None) -> InsertOne[Document] | UpdateOne:
        """The bulk form for a user whose state was read (``stored``, None when absent) and compared as written.

        Absent: the plain insert. Otherwise the conditional upsert narrowed to
        the role that was read, so a match knows the previous role for the
        audit. Either one collides on the unique ``externalId`` (code 11000)
        exactly when the stored user changed since the read (created, newer,
        deleted, another role): :meth:`UserStore._update_existing` then decides,
        per user, as the per-user path does after a duplicate-key error.
        """
        if stored is None:
            return InsertOne(self.insert())
        return UpdateOne(self.same_role(stored.get("role")), self.update, upsert=True)


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
        self._ledger_writer = LedgerWriter(db.get_collection("webhook_events", write_concern=LEDGER_WRITE_CONCERN))
        self.role_changes: AsyncCollection[Document] = db.get_collection("role_changes", write_concern=write_concern)
        self.leases: AsyncCollection[Document] = db.get_collection("leases", write_concern=write_concern)
        # Written by service.revocations (the sidecar), read into each gRPC process's set.
        self.revoked_sessions: AsyncCollection[Document] = db.get_collection(
            "revoked_sessions", write_concern=write_concern
        )

    async def ensure_indexes(self) -> None:
        """Create every index; raise :class:`IndexConflict` when one exists by name with other options."""
        indexes: list[tuple[AsyncCollection[Document], list[tuple[str, int]], dict[str, Any]]] = [
            (self.users, [("externalId", ASCENDING)], {"unique": True, "name": "byExternalId"}),
            (self.users, [("role", ASCENDING), ("isActive", ASCENDING)], {"name": "byRoleActive"}),
            (
                self.events,
                [("receivedAt", ASCENDING)],
                {"expireAfterSeconds": int(LEDGER_TTL.total_seconds()), "name": "ledgerTtl"},
            ),
            (self.role_changes, [("externalId", ASCENDING), ("at", ASCENDING)], {"name": "byUser"}),
            (self.revoked_sessions, [("expireAt", ASCENDING)], {"expireAfterSeconds": 0, "name": "revokedSessionsTtl"}),
        ]
        async with translate_errors():
            for collection, keys, options in indexes:
                try:
                    await collection.create_index(keys, **options)
                except OperationFailure as exc:
                    if exc.code not in IndexConflict.CODES:
                        raise
                    code_name = (exc.details or {}).get("codeName", f"code {exc.code}")
                    raise IndexConflict(collection.name, options["name"], code_name) from exc

    async def ping(self) -> bool:
        try:
            await self._db.command("ping")
            return True
        except PyMongoError:
            return False

    # --- the dedupe ledger ---------------------------------------------------
    async def record_delivery(self, svix_id: str, event_type: str, external_id: str | None, outcome: Outcome) -> bool:
        """Write the ledger entry, after the effect. False when another delivery recorded it first.

        Entries of concurrent deliveries are written together (:class:`LedgerWriter`).
        """
        entry = {
            "_id": svix_id,
            "type": event_type,
            "externalId": external_id,
            "outcome": outcome.value,
            "receivedAt": _now(),
        }
        async with translate_errors():
            return await self._ledger_writer.record(entry)

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
        known_role: object = None
        if delivery_id is None:
            if stored is _READ:
                stored = (await self.mirrored([profile.external_id])).get(profile.external_id)
            planned = compare(profile, stored)
            if planned in (Outcome.UNCHANGED, Outcome.STALE):
                return planned
            known_role = None if stored is None else stored.get("role")
        write = MirrorWrite.of(profile, delivery_id)
        if delivery_id is None and stored is None:
            # Known absent (the comparison saw no document, not even a tombstone): the upsert's insert
            # as a plain insert, the cheapest write. A writer that inserted since makes it collide;
            # the conditional update below then decides as always.
            async with translate_errors():
                try:
                    await self.users.insert_one(write.insert())
                    return Outcome.CREATED
                except DuplicateKeyError:
                    return await self._update_existing(write, delivery_id, via=via, by=by)
        async with translate_errors():
            # Skipped when the comparison above saw another role: it could not match.
            if delivery_id is not None or known_role == profile.role.wire:
                same_role = await self.users.update_one(write.same_role(profile.role.wire), {"$set": write.fields})
                if same_role.matched_count:
                    return Outcome.UPDATED
            try:
                before = await self.users.find_one_and_update(
                    write.query, write.update, ROLE_ONLY, upsert=True, return_document=ReturnDocument.BEFORE
                )
            except DuplicateKeyError:
                return await self._update_existing(write, delivery_id, via=via, by=by)
        if before is None:
            return Outcome.CREATED
        await self._audit_change(profile, before.get("role"), via=via, by=by)
        return Outcome.UPDATED

    async def upsert_page_from_clerk(
        self, profiles: Sequence[UserProfile], stored: Mapping[str, Document], *, via: str = "sync"
    ) -> list[Outcome]:
        """The conditional write of :meth:`upsert_from_clerk` for a page of users, as one unordered ``bulk_write``.

        ``stored`` is the page's :meth:`mirrored` read. Each profile is compared
        with it (:func:`compare`): ``unchanged`` and ``stale`` users cost no
        write; the others are one :meth:`MirrorWrite.op` each, all in one
        command batch. Per user, an insert or upsert that collides on
        ``externalId`` (the stored user changed since the read) is decided
        as the per-user path decides it (:meth:`_update_existing`). Role
        changes are audited from the role that was read (the write matched
        it), all in one insert. Returns each profile's outcome, in order.
        """
        outcomes = [compare(p, stored.get(p.external_id)) for p in profiles]
        positions = [i for i, planned in enumerate(outcomes) if planned in (Outcome.CREATED, Outcome.UPDATED)]
        if not positions:
            return outcomes
        writes = [MirrorWrite.of(profiles[i]) for i in positions]
        collided, inserted = await self._bulk([w.op(stored.get(w.profile.external_id)) for w in writes])
        changes: list[tuple[UserProfile, object]] = []
        for index, (position, write) in enumerate(zip(positions, writes, strict=True)):
            if index in collided:
                outcomes[position] = await self._update_existing(write, None, via=via)
            elif index in inserted:
                outcomes[position] = Outcome.CREATED
            elif (before := stored.get(write.profile.external_id)) is not None:
                changes.append((write.profile, before.get("role")))
        await self._audit_changes(changes, via=via)
        return outcomes

    async def _bulk(self, ops: list[InsertOne[Document] | UpdateOne]) -> tuple[set[int], set[int]]:
        """One unordered ``bulk_write`` of ``ops``: the indexes that collided on ``externalId`` (code 11000),
        and those of upserts that inserted.

        Any other write error, or a write concern error, is a database failure:
        the effects of the batch are not known to be durable.
        """
        async with translate_errors():
            try:
                result = await self.users.bulk_write(ops, ordered=False)
            except BulkWriteError as exc:
                details = exc.details
                errors = details.get("writeErrors", [])
                if details.get("writeConcernErrors") or any(e.get("code") != DUPLICATE_KEY for e in errors):
                    raise
                return {e["index"] for e in errors}, {u["index"] for u in details.get("upserted", [])}
        return set(), set(result.upserted_ids or {})

    async def _update_existing(
        self, write: MirrorWrite, delivery_id: str | None, *, via: str, by: str = "clerk"
    ) -> Outcome:
        """After a duplicate-key error: the user exists, so retry once as a plain conditional update.

        It matches nothing when the stored user is newer, deleted, or already
        written by this delivery (:meth:`_classify` tells which). A role
        change is audited from the role it replaced.
        """
        async with translate_errors():
            before = await self.users.find_one_and_update(
                write.query, write.update, ROLE_ONLY, return_document=ReturnDocument.BEFORE
            )
        if before is None:
            return await self._classify(write.profile.external_id, delivery_id)
        await self._audit_change(write.profile, before.get("role"), via=via, by=by)
        return Outcome.UPDATED

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
        """The :data:`MIRRORED` fields of these users (tombstones too), by external id: one read for a page.

        The read is ``externalId $in [...]`` on the unique index, split into
        concurrent queries of :data:`MIRRORED_CHUNK` ids: SecantusDB matches
        every document it returns against the whole ``$in`` list, so one
        query's cost grows with the square of its length (500 ids: about
        ten times the cost of ten queries of 50).
        """
        projection = {"_id": 0, "externalId": 1, **dict.fromkeys(MIRRORED, 1)}

        async def chunk(ids: list[str]) -> list[Document]:
            async with translate_errors():
                return await self.users.find({"externalId": {"$in": ids}}, projection).to_list()

        chunks = [external_ids[i : i + MIRRORED_CHUNK] for i in range(0, len(external_ids), MIRRORED_CHUNK)]
        found = await asyncio.gather(*(chunk(ids) for ids in chunks), return_exceptions=True)
        stored: dict[str, Document] = {}
        for docs in found:
            if isinstance(docs, BaseException):
                raise docs
            stored.update((doc["externalId"], doc) for doc in docs)
        return stored

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

    async def _audit_change(self, profile: UserProfile, before: object, *, via: str, by: str = "clerk") -> None:
        """Audit a Clerk-driven role change (nothing when the role was already the profile's)."""
        await self._audit_changes([(profile, before)], via=via, by=by)

    async def _audit_changes(
        self, changes: Sequence[tuple[UserProfile, object]], *, via: str, by: str = "clerk"
    ) -> None:
        """Audit the Clerk-driven role changes among ``changes`` (profile, role it replaced), in one insert."""
        changed = [(p.external_id, old, p.role.wire) for p, old in changes if old != p.role.wire]
        if not changed:
            return
        records = [_audit_record(external_id, old, new, by=by, via=via) for external_id, old, new in changed]
        async with translate_errors():
            await self.role_changes.insert_many(records)
        for external_id, old, new in changed:
            _log_role_change(external_id, old, new, by=by, via=via)

    async def _audit(self, external_id: str, old: object, new: str, *, by: str, via: str) -> None:
        async with translate_errors():
            await self.role_changes.insert_one(_audit_record(external_id, old, new, by=by, via=via))
        _log_role_change(external_id, old, new, by=by, via=via)


def _audit_record(external_id: str, old: object, new: str, *, by: str, via: str) -> Document:
    return {"externalId": external_id, "from": old, "to": new, "by": by, "at": _now(), "via": via}


def _log_role_change(external_id: str, old: object, new: str, *, by: str, via: str) -> None:
    log.info("role changed", extra=fields(externalId=external_id, role_from=old, role_to=new, by=by, via=via))
