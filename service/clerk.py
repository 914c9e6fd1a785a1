"""Clerk: event payload -> user fields (pure), and the Backend API client (role write-through).

Clerk times are Unix milliseconds. Clerk's own ``external_id`` field is not
our ``externalId`` (which is Clerk's ``id``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from service.errors import ClerkUnavailable, InvalidEvent
from service.logs import fields
from service.roles import DEFAULT_ROLE, Role

log = logging.getLogger(__name__)

USER_EVENTS = frozenset({"user.created", "user.updated"})


@dataclass(frozen=True, slots=True)
class ClerkEvent:
    type: str
    data: dict[str, Any]
    timestamp: datetime | None

    @property
    def subject_id(self) -> str | None:
        """The Clerk user id this event is about, when it is about one."""
        key = "user_id" if self.type.startswith("session.") else "id"
        value = self.data.get(key)
        return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class UserProfile:
    """The fields of a Clerk user object that authsvc mirrors."""

    external_id: str
    name: str
    email: str | None
    role: Role
    is_active: bool
    clerk_updated_at: datetime


def from_millis(value: object, what: str) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidEvent(f"{what} must be a Unix time in milliseconds")
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidEvent(f"{what} is out of range") from exc


def parse_event(body: bytes) -> ClerkEvent:
    """Parse a verified webhook body into a :class:`ClerkEvent` (raises :class:`InvalidEvent`)."""
    try:
        payload = json.loads(body)
    except RecursionError as exc:  # valid JSON nested deeper than the parser goes
        raise InvalidEvent("body is nested too deeply") from exc
    except ValueError as exc:  # not UTF-8, not JSON, or an integer past Python's 4300-digit limit
        raise InvalidEvent("body is not JSON") from exc
    if not isinstance(payload, dict):
        raise InvalidEvent("body must be a JSON object")
    event_type = payload.get("type")
    if not isinstance(event_type, str) or not event_type:
        raise InvalidEvent("type must be a non-empty string")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise InvalidEvent("data must be an object")
    raw_ts = payload.get("timestamp")
    timestamp = None if raw_ts is None else from_millis(raw_ts, "timestamp")
    return ClerkEvent(type=event_type, data=data, timestamp=timestamp)


def require_id(data: dict[str, Any], key: str = "id") -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(f"data.{key} must be a non-empty string")
    if len(value) > 256:
        raise InvalidEvent(f"data.{key} is too long")
    return value


def _optional_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise InvalidEvent(f"data.{key} must be a string or null")


def _optional_bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidEvent(f"data.{key} must be a boolean")


def primary_email(data: dict[str, Any]) -> str | None:
    """The address whose id is ``primary_email_address_id``, else the first, else None."""
    addresses = data.get("email_addresses") or []
    if not isinstance(addresses, list) or not all(isinstance(a, dict) for a in addresses):
        raise InvalidEvent("data.email_addresses must be a list of objects")
    emails: list[tuple[object, str]] = [
        (a.get("id"), a["email_address"]) for a in addresses if isinstance(a.get("email_address"), str)
    ]
    primary_id = _optional_str(data, "primary_email_address_id")
    for email_id, email in emails:
        if primary_id is not None and email_id == primary_id:
            return email
    return emails[0][1] if emails else None


def display_name(data: dict[str, Any]) -> str:
    """``first last`` trimmed, else ``username``, else ``"User"``."""
    first = _optional_str(data, "first_name") or ""
    last = _optional_str(data, "last_name") or ""
    full = f"{first.strip()} {last.strip()}".strip()
    return full or (_optional_str(data, "username") or "").strip() or "User"


def role_of(data: dict[str, Any]) -> Role:
    """``public_metadata.role``; missing or unknown gives staff (never higher)."""
    metadata = data.get("public_metadata")
    if metadata is None:
        return DEFAULT_ROLE
    if not isinstance(metadata, dict):
        raise InvalidEvent("data.public_metadata must be an object")
    raw = metadata.get("role")
    if raw is None:
        return DEFAULT_ROLE
    role = Role.parse(raw)
    if role is None:
        log.warning(
            "unknown role in public_metadata; using staff",
            extra=fields(externalId=data.get("id"), role=str(raw)[:64]),
        )
        return DEFAULT_ROLE
    return role


def profile_from_event(event: ClerkEvent) -> UserProfile:
    """Map a ``user.created``/``user.updated`` event onto the fields we store."""
    data = event.data
    external_id = require_id(data)
    raw_updated = data.get("updated_at")
    if raw_updated is not None:
        updated_at = from_millis(raw_updated, "data.updated_at")
    elif event.timestamp is not None:
        updated_at = event.timestamp
    else:
        raise InvalidEvent("data.updated_at is required")
    banned = _optional_bool(data, "banned")
    locked = _optional_bool(data, "locked")
    return UserProfile(
        external_id=external_id,
        name=display_name(data),
        email=primary_email(data),
        role=role_of(data),
        is_active=not (banned or locked),
        clerk_updated_at=updated_at,
    )


def login_from_event(event: ClerkEvent) -> tuple[str, datetime]:
    """``(user_id, when)`` of a ``session.created``: ``data.created_at``, else the envelope time."""
    user_id = require_id(event.data, "user_id")
    raw = event.data.get("created_at")
    if raw is not None:
        return user_id, from_millis(raw, "data.created_at")
    if event.timestamp is not None:
        return user_id, event.timestamp
    raise InvalidEvent("data.created_at or timestamp is required")


class ClerkBackend:
    """The slice of Clerk's Backend API that authsvc writes: ``public_metadata.role``."""

    def __init__(self, api_url: str, secret_key: str, *, timeout_s: float = 5.0) -> None:
        self._api_url = api_url.rstrip("/")
        self._secret_key = secret_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def set_role(self, user_id: str, role: Role) -> None:
        """Merge ``{"role": ...}`` into the user's public metadata; raise :class:`ClerkUnavailable`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"{self._api_url}/v1/users/{quote(user_id, safe='')}/metadata"
        body = {"public_metadata": {"role": role.wire}}
        headers = {"Authorization": f"Bearer {self._secret_key}"}
        try:
            async with self._session.patch(url, json=body, headers=headers) as response:
                if response.status >= 300:
                    log.warning(
                        "clerk metadata update failed",
                        extra=fields(externalId=user_id, status=response.status),
                    )
                    raise ClerkUnavailable(f"Clerk refused the role update (HTTP {response.status})")
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("clerk unreachable", extra=fields(externalId=user_id, error=type(exc).__name__))
            raise ClerkUnavailable("Clerk is unreachable; the role was not changed") from exc
