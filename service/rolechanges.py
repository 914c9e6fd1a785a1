"""SetRole's change, once the caller is known: one change per user at a time, across replicas.

The rules (issue 13; ``docs/design.md``, SetRole):

- A change holds the lease ``role:<externalId>`` (:mod:`service.leases`) from
  reading the target to its last write, so no other change of that user,
  in any replica, interleaves with it. A change that demotes a superadmin
  also holds the lease ``superadmins`` and checks, under it, that another
  active superadmin remains: in MongoDB and, with Clerk, in Clerk itself
  (``GET /v1/users/{id}``). Demotions therefore run one at a time, and each
  is refused (:class:`LastSuperadmin`) before anything is written when it
  would leave none. Nothing is ever reverted.
- With Clerk, the role is written there first; Clerk's answer (the user,
  with its ``updated_at``) is then applied through the one conditional write
  (:meth:`UserStore.upsert_from_clerk`, ``via: "grpc"``), so MongoDB holds
  what Clerk holds and an older webhook loses to it. When Clerk's answer is
  lost (timeout, 5xx, 429 after the retries) the user is read back: if Clerk
  holds the new role the change stands and is applied, else the call fails
  and its leases are kept until they expire, in case the write still lands.
- Without Clerk, the MongoDB write is a compare-and-set on the role read.
- The change runs in its own task: a caller that goes away (deadline,
  cancellation) does not cut it between Clerk and MongoDB.

Timing: each lease lives ``lease_ttl_s`` (30 s); a change waits at most
``wait_s`` (15 s) for each, and once it holds them does its writes within
``budget_s`` (20 s), so a lease never lapses under a live holder (the
classic lease assumption: no replica stalls for the 10 s margin).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from pymongo.errors import PyMongoError

from service.clerkapi import ClerkBackend
from service.clerkuser import profile_of
from service.errors import (
    AuthError,
    ClerkKeyRefused,
    ClerkRejected,
    ClerkUnavailable,
    ClerkUserNotFound,
    DatabaseUnavailable,
    InvalidEvent,
    LastSuperadmin,
    TargetInactive,
    Unavailable,
    UserNotFound,
)
from service.leases import Lease
from service.logs import fields
from service.roles import Role
from service.users import UserProfile, UserRecord, UserStore, translate_errors

log = logging.getLogger(__name__)

LEASE_TTL_S = 30.0
WAIT_S = 15.0
BUDGET_S = 20.0
SUPERADMINS = "superadmins"  # the lease of demotions; user leases are "role:<externalId>"
CANDIDATES = 5  # superadmins of MongoDB asked about in Clerk before a demotion is refused
CAS_ATTEMPTS = 3  # MongoDB only: a Clerk event between the read and the write makes the change decide again


class RoleChanges:
    """Applies role changes under the rules above; :meth:`apply` is SetRole after its caller check."""

    def __init__(
        self,
        store: UserStore,
        clerk: ClerkBackend | None,
        *,
        lease_ttl_s: float = LEASE_TTL_S,
        wait_s: float = WAIT_S,
        budget_s: float = BUDGET_S,
    ) -> None:
        self._store = store
        self._clerk = clerk
        self._ttl = lease_ttl_s
        self._wait = wait_s
        self._budget = budget_s
        self._running: set[asyncio.Task[UserRecord]] = set()

    async def apply(self, by: str, external_id: str, role: Role) -> UserRecord:
        """Give ``external_id`` the role ``role`` on behalf of ``by``; return the user as MongoDB now holds it.

        An unknown or deleted target is :class:`UserNotFound`, an inactive one
        :class:`TargetInactive`, a demotion that would leave no active
        superadmin :class:`LastSuperadmin`; Clerk's refusals and outages are
        its :mod:`service.errors`. Any error means the change did not happen
        (or, for an outage, that it is not known to have happened).
        """
        task = asyncio.create_task(self._apply(by, external_id, role), name="set-role")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        task.add_done_callback(_settle)
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Let running changes finish (at most ``budget_s``), then cancel what remains."""
        if self._running:
            await asyncio.wait(self._running, timeout=self._budget)
        for task in self._running:
            task.cancel()

    # --- one change -----------------------------------------------------------------
    async def _apply(self, by: str, external_id: str, role: Role) -> UserRecord:
        holder = uuid.uuid4().hex
        held: list[Lease] = []
        settled = True  # False while a write of ours may land without our knowing its outcome
        try:
            await self._take(held, Lease(self._store.leases, holder, name=f"role:{external_id}"))
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._budget) as budget:  # from taking the leases to the last write
                for _ in range(CAS_ATTEMPTS):
                    target = await self._store.get(external_id)
                    if target is None:
                        raise UserNotFound("user not found")
                    if not target.is_active:
                        raise TargetInactive("user is inactive; its role cannot be changed")
                    demotion = target.role is Role.SUPERADMIN and role is not Role.SUPERADMIN
                    if demotion and len(held) == 1:
                        budget.reschedule(None)  # the wait has its own bound
                        await self._take(held, Lease(self._store.leases, holder, name=SUPERADMINS))
                        await self._renew(held[0])
                        budget.reschedule(loop.time() + self._budget)  # both leases fresh from here
                    if demotion:
                        await self._another_superadmin(external_id)
                    settled = False
                    record = await self._write(by, target, role)
                    settled = True
                    if record is not None:
                        return record
            raise DatabaseUnavailable("the user kept changing during the role change; try again")
        except (ClerkKeyRefused, ClerkRejected, ClerkUserNotFound):
            settled = True  # Clerk refused the write: nothing changed
            raise
        except TimeoutError as exc:
            raise self._unavailable("the role change did not complete in time") from exc
        finally:
            if settled:
                await _release(held)
            elif held:
                log.warning(
                    "role change outcome unknown; its leases are kept until they expire",
                    extra=fields(externalId=external_id, leases=[lease.name for lease in held]),
                )

    async def _write(self, by: str, target: UserRecord, role: Role) -> UserRecord | None:
        """Write the change; None when MongoDB's compare-and-set missed (the user changed since it was read)."""
        if self._clerk is None:
            return await self._store.set_role(target.external_id, role, expected=target.role, by=by, via="grpc")
        held = await self._write_clerk(target.external_id, role)
        await self._store.upsert_from_clerk(held, via="grpc", by=by)
        record = await self._store.get(target.external_id)
        if record is None or record.deleted_at is not None:
            raise UserNotFound("user not found")  # deleted in the meantime
        return record

    async def _write_clerk(self, external_id: str, role: Role) -> UserProfile:
        """The user as Clerk holds it after the write; when the answer is lost, as read back, if the role is ours."""
        assert self._clerk is not None
        try:
            return profile_of(await self._clerk.set_role(external_id, role))
        except ClerkKeyRefused:
            raise
        except (ClerkUnavailable, InvalidEvent) as exc:
            lost = exc if isinstance(exc, ClerkUnavailable) else ClerkUnavailable("Clerk's answer was not a user")
        # The write may or may not have been made: ask Clerk what it holds.
        try:
            now = profile_of(await self._clerk.get_user(external_id))
        except AuthError as exc:
            raise lost from exc
        if now.role is not role:
            raise lost
        return now

    async def _another_superadmin(self, external_id: str) -> None:
        """Raise :class:`LastSuperadmin` unless another active superadmin exists (in Clerk too, with Clerk)."""
        for candidate in await self._store.active_superadmins(limit=CANDIDATES, excluding=external_id):
            if self._clerk is None or await self._superadmin_in_clerk(candidate):
                return
        raise LastSuperadmin("the last active superadmin cannot be demoted")

    async def _superadmin_in_clerk(self, external_id: str) -> bool:
        assert self._clerk is not None
        try:
            held = profile_of(await self._clerk.get_user(external_id))
        except (ClerkUserNotFound, InvalidEvent):
            return False
        if held.role is Role.SUPERADMIN and held.is_active:
            return True
        log.warning("a superadmin in MongoDB is not one in Clerk; not counted", extra=fields(externalId=external_id))
        return False

    # --- leases -----------------------------------------------------------------------
    async def _take(self, held: list[Lease], lease: Lease) -> None:
        async with translate_errors():
            taken = await lease.wait(self._ttl, within_s=self._wait)
        if not taken:
            raise self._unavailable("another role change is still in progress; try again")
        held.append(lease)

    async def _renew(self, lease: Lease) -> None:
        async with translate_errors():
            ours = await lease.extend(self._ttl)
        if not ours:
            raise self._unavailable("another role change is still in progress; try again")

    def _unavailable(self, message: str) -> Unavailable:
        # Only a change waiting on Clerk holds a lease for long; without Clerk, only the database can be slow.
        return ClerkUnavailable(message) if self._clerk is not None else DatabaseUnavailable(message)


async def _release(held: list[Lease]) -> None:
    for lease in reversed(held):
        try:
            await lease.drop()
        except PyMongoError as exc:
            log.warning("lease not released; it expires", extra=fields(lease=lease.name, error=type(exc).__name__))


def _settle(task: asyncio.Task[UserRecord]) -> None:
    """Retrieve the outcome of a change whose caller went away, so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()
