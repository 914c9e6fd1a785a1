"""A Clerk user object -> the fields authsvc mirrors (pure, validated in one place).

The same object arrives as ``data`` of a ``user.created``/``user.updated``
webhook and from the Backend API (``GET /v1/users``, ``GET /v1/users/{id}``),
so the webhook, ``authsvc sync`` and just-in-time sync all map it here.
Every field that is read is validated: a wrong type, a lone surrogate or an
oversized id is :class:`InvalidEvent` (a 400 for the webhook), never a
half-applied write. Clerk times are Unix milliseconds; Clerk's own
``external_id`` field is not our ``externalId`` (which is Clerk's ``id``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from service.errors import InvalidEvent
from service.logs import fields
from service.roles import DEFAULT_ROLE, Role
from service.users import UserProfile

log = logging.getLogger(__name__)

MAX_ID = 256
MAX_TEXT = 4096


def text(value: object, what: str, *, max_len: int = MAX_TEXT) -> str:
    """``value`` as a string MongoDB can store: UTF-8 encodable (no lone surrogates), bounded."""
    if not isinstance(value, str):
        raise InvalidEvent(f"{what} must be a string")
    if len(value) > max_len:
        raise InvalidEvent(f"{what} is too long")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent(f"{what} is not valid Unicode") from exc
    return value


def clerk_id(value: object, what: str) -> str:
    """A Clerk object id: a non-empty, bounded string."""
    result = text(value, what, max_len=MAX_ID)
    if not result.strip():
        raise InvalidEvent(f"{what} must be a non-empty string")
    return result


def from_millis(value: object, what: str) -> datetime:
    """A Clerk time (Unix milliseconds) as a UTC datetime."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidEvent(f"{what} must be a Unix time in milliseconds")
    try:
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise InvalidEvent(f"{what} is out of range") from exc


def _optional_text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else text(value, f"data.{key}")


def _optional_bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise InvalidEvent(f"data.{key} must be a boolean")


def primary_email(data: dict[str, Any]) -> str | None:
    """The address whose id is ``primary_email_address_id``, else the first, else None."""
    addresses = data.get("email_addresses")
    if addresses is None:
        addresses = []
    if not isinstance(addresses, list):
        raise InvalidEvent("data.email_addresses must be a list of objects")
    emails: list[tuple[object, str]] = []
    for index, address in enumerate(addresses):
        if not isinstance(address, dict):
            raise InvalidEvent("data.email_addresses must be a list of objects")
        value = address.get("email_address")
        if value is None:
            continue
        email_id = address.get("id")
        if email_id is not None:
            text(email_id, f"data.email_addresses[{index}].id", max_len=MAX_ID)
        emails.append((email_id, text(value, f"data.email_addresses[{index}].email_address", max_len=MAX_ID)))
    primary_id = _optional_text(data, "primary_email_address_id")
    for email_id, email in emails:
        if primary_id is not None and email_id == primary_id:
            return email
    return emails[0][1] if emails else None


def display_name(data: dict[str, Any]) -> str:
    """``first last`` trimmed, else ``username``, else ``"User"``."""
    first = _optional_text(data, "first_name") or ""
    last = _optional_text(data, "last_name") or ""
    username = _optional_text(data, "username") or ""
    full = f"{first.strip()} {last.strip()}".strip()
    return full or username.strip() or "User"


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
        # Only a string is quoted (the first 64 characters): repr() of anything else may be huge or too deep.
        shown = ascii(raw[:64]) if isinstance(raw, str) else f"<{type(raw).__name__}>"
        log.warning("unknown role in public_metadata; using staff", extra=fields(externalId=data.get("id"), role=shown))
        return DEFAULT_ROLE
    return role


def profile_of(data: object, *, fallback_updated_at: datetime | None = None) -> UserProfile:
    """Map a Clerk user object onto the fields we store (raises :class:`InvalidEvent`).

    ``updated_at`` is required unless ``fallback_updated_at`` (a webhook's
    envelope ``timestamp``) stands in for it.
    """
    if not isinstance(data, dict):
        raise InvalidEvent("data must be an object")
    external_id = clerk_id(data.get("id"), "data.id")
    raw_updated = data.get("updated_at")
    if raw_updated is not None:
        updated_at = from_millis(raw_updated, "data.updated_at")
    elif fallback_updated_at is not None:
        updated_at = fallback_updated_at
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
