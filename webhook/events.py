"""A verified webhook body -> a Clerk event envelope (pure; raises :class:`InvalidEvent`).

Only the sidecar reads webhook envelopes; the user object inside one is mapped
by :mod:`service.clerkuser`, which sync and just-in-time fetches share.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service import clerkjson
from service.clerkuser import clerk_id, from_millis, profile_of, text
from service.errors import InvalidEvent
from service.revocations import Revocation
from service.users import UserProfile

USER_EVENTS = frozenset({"user.created", "user.updated"})
SESSION_END_EVENTS = frozenset({"session.ended", "session.removed", "session.revoked"})


@dataclass(frozen=True, slots=True)
class ClerkEvent:
    type: str
    data: dict[str, Any]
    timestamp: datetime | None

    @property
    def subject_id(self) -> str | None:
        """The id this event is about, for the ledger of a type authsvc ignores: None unless a valid Clerk id.

        An ignored event is answered ``ignored`` whatever it holds; an id that
        the database could not store (a lone surrogate, oversized) is dropped
        here, where it enters, never carried to the ledger insert.
        """
        key = "user_id" if self.type.startswith("session.") else "id"
        try:
            return clerk_id(self.data.get(key), f"data.{key}")
        except InvalidEvent:
            return None


def parse_event(body: bytes) -> ClerkEvent:
    """Parse a verified webhook body into a :class:`ClerkEvent` (raises :class:`InvalidEvent`)."""
    try:
        payload = clerkjson.loads(body)
    except ValueError as exc:  # not UTF-8, not JSON
        raise InvalidEvent("body is not JSON") from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("body must be a JSON object")
    event_type = text(payload.get("type"), "type", max_len=128)
    if not event_type:
        raise InvalidEvent("type must be a non-empty string")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise InvalidEvent("data must be an object")
    raw_ts = payload.get("timestamp")
    timestamp = None if raw_ts is None else from_millis(raw_ts, "timestamp")
    return ClerkEvent(type=event_type, data=data, timestamp=timestamp)


def profile_from_event(event: ClerkEvent) -> UserProfile:
    """The user of a ``user.created``/``user.updated`` event; the envelope time stands in for ``updated_at``."""
    return profile_of(event.data, fallback_updated_at=event.timestamp)


def deleted_id(event: ClerkEvent) -> str:
    """The user id of a ``user.deleted`` event."""
    return clerk_id(event.data.get("id"), "data.id")


def login_from_event(event: ClerkEvent) -> tuple[str, datetime]:
    """``(user_id, when)`` of a ``session.created``: ``data.created_at``, else the envelope time."""
    user_id = clerk_id(event.data.get("user_id"), "data.user_id")
    raw = event.data.get("created_at")
    if raw is not None:
        return user_id, from_millis(raw, "data.created_at")
    if event.timestamp is not None:
        return user_id, event.timestamp
    raise InvalidEvent("data.created_at or timestamp is required")


def revocation_from_event(event: ClerkEvent) -> Revocation:
    """The session a ``session.ended``/``.removed``/``.revoked`` event ends (``data`` is the session object).

    ``data.id`` (the tokens' ``sid``) and ``data.user_id`` are required;
    ``data.status`` defaults to the event's own word, ``data.expire_at`` (ms) is optional.
    """
    data = event.data
    raw_status = data.get("status")
    raw_expiry = data.get("expire_at")
    return Revocation(
        session_id=clerk_id(data.get("id"), "data.id"),
        user_id=clerk_id(data.get("user_id"), "data.user_id"),
        status=event.type.partition(".")[2] if raw_status is None else text(raw_status, "data.status", max_len=64),
        expire_at=None if raw_expiry is None else from_millis(raw_expiry, "data.expire_at"),
    )
