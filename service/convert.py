"""Proto <-> domain conversions of AuthService: messages, roles, claims, metadata. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from authsvc_client.bearer import MalformedAuthorization, parse_bearer
from authsvc_client.v1 import authsvc_pb2
from service.errors import TokenMalformed
from service.roles import Role
from service.tokens import VerifiedToken
from service.users import UserRecord

# JSON numbers are doubles: larger integers would silently lose digits.
_MAX_SAFE_INT = 2**53


def role_from_proto(value: int) -> Role | None:
    """The domain role of a proto enum value; None for ROLE_UNSPECIFIED and unknown numbers."""
    return Role.from_proto(value)


def _timestamp(target: Any, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)


def user_message(record: UserRecord) -> authsvc_pb2.User:
    """The ``User`` message of a stored user; absent times stay unset."""
    message = authsvc_pb2.User(
        external_id=record.external_id,
        name=record.name,
        email=record.email or "",
        role=authsvc_pb2.Role.Value(f"ROLE_{record.role.name}"),
        is_active=record.is_active,
    )
    _timestamp(message.created_at, record.created_at)
    _timestamp(message.updated_at, record.updated_at)
    _timestamp(message.last_login_at, record.last_login_at)
    return message


def json_safe(value: Any) -> Any:
    """``value`` as something ``google.protobuf.Struct`` holds exactly: odd numbers become strings."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return str(value)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of ``authorization: Bearer <token>`` (scheme case-insensitive); None when absent."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        try:
            return parse_bearer(value if isinstance(value, str) else "") or None
        except MalformedAuthorization:
            raise TokenMalformed("authorization metadata must be 'Bearer <token>'") from None
    return None


def verify_response(verified: VerifiedToken, user: UserRecord | None) -> authsvc_pb2.VerifyTokenResponse:
    """The ``VerifyTokenResponse`` of a verified token and its user (if synced)."""
    response = authsvc_pb2.VerifyTokenResponse(
        subject=verified.subject,
        session_id=verified.session_id,
        authorized_party=verified.authorized_party,
        actor=verified.actor,
    )
    response.expires_at.FromDatetime(verified.expires_at)
    if user is not None:
        response.user.CopyFrom(user_message(user))
    response.claims.update(json_safe(verified.claims))
    return response
