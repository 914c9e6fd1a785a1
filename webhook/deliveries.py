"""One Clerk delivery: validate the event, then apply it through the store exactly once.

The ledger entry is written after the effect. A crash between the two leaves
a retry that finds the effect already there (the store's conditional writes
make it harmless) and records the ledger entry; a delivery that loses the
race to record its ledger entry reports ``duplicate``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.revocations import revoke
from service.users import Outcome, UserStore
from webhook.events import (
    SESSION_END_EVENTS,
    USER_EVENTS,
    ClerkEvent,
    deleted_id,
    login_from_event,
    profile_from_event,
    revocation_from_event,
)

Effect = Callable[[UserStore], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A validated event, ready to apply: what it is about and the one store call that applies it."""

    svix_id: str
    type: str
    external_id: str | None
    effect: Effect | None  # None: a type we ignore


def plan(svix_id: str, event: ClerkEvent) -> Delivery:
    """Validate ``event`` (raises :class:`service.errors.InvalidEvent`) and pick its store call."""
    effect: Effect | None = None
    external_id: str | None = event.subject_id
    if event.type in USER_EVENTS:
        profile = profile_from_event(event)
        external_id = profile.external_id

        async def effect(store: UserStore) -> Outcome:
            outcome = await store.upsert_from_clerk(profile, svix_id)
            return Outcome.APPLIED if outcome.applied else outcome

    elif event.type == "user.deleted":
        gone = external_id = deleted_id(event)

        async def effect(store: UserStore) -> Outcome:
            return await store.delete(gone)

    elif event.type == "session.created":
        user_id, at = login_from_event(event)
        external_id = user_id

        async def effect(store: UserStore) -> Outcome:
            return await store.record_login(user_id, at)

    elif event.type in SESSION_END_EVENTS:
        revocation = revocation_from_event(event)
        external_id = revocation.user_id

        async def effect(store: UserStore) -> Outcome:
            return await revoke(store.revoked_sessions, revocation, svix_id)

    return Delivery(svix_id=svix_id, type=event.type, external_id=external_id, effect=effect)


async def apply(store: UserStore, delivery: Delivery) -> Outcome:
    """Apply ``delivery`` once: ``duplicate`` if its svix-id is already in the ledger.

    No ledger read comes first: every effect is a conditional write that a
    redelivery cannot repeat (user writes are guarded by ``lastSvixId``, a
    delete is terminal, a login only moves forward, a session is revoked once), and the ledger insert
    after it decides. Of two concurrent deliveries of one svix-id, the one
    whose ledger insert lands first answers the effect's outcome; the other ``duplicate``.
    """
    outcome = Outcome.IGNORED if delivery.effect is None else await delivery.effect(store)
    if not await store.record_delivery(delivery.svix_id, delivery.type, delivery.external_id, outcome):
        return Outcome.DUPLICATE
    return outcome
