"""Typed results: the caller's identity (VerifyToken) and a user (GetUser, SetRole)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from authsvc_client.roles import Role
from authsvc_client.v1 import authsvc_pb2


def _time(message: authsvc_pb2.User, name: str) -> datetime | None:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return stamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class User:
    """A user as authsvc mirrors it from Clerk."""

    external_id: str
    name: str
    email: str | None
    role: Role
    is_active: bool
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_login_at: datetime | None = None

    @classmethod
    def from_proto(cls, message: authsvc_pb2.User) -> User:
        return cls(
            external_id=message.external_id,
            name=message.name,
            email=message.email or None,
            # A stored user always has a role; an unknown number can only mean a newer server.
            role=Role.from_proto(message.role) or Role.STAFF,
            is_active=message.is_active,
            created_at=_time(message, "created_at"),
            updated_at=_time(message, "updated_at"),
            last_login_at=_time(message, "last_login_at"),
        )


@dataclass(frozen=True)
class Identity:
    """Who holds a verified session token: ``subject`` is the Clerk user id; ``user`` is None until synced.

    ``actor`` is the Clerk user id of whoever impersonates ``subject`` (the
    token's ``act.sub``), None for a session that is not impersonated.
    """

    subject: str
    session_id: str
    authorized_party: str
    expires_at: datetime
    user: User | None
    claims: dict[str, Any] = field(default_factory=dict)
    actor: str | None = None

    @property
    def role(self) -> Role | None:
        """The user's role, or None for a user not synced yet."""
        return self.user.role if self.user is not None else None

    @classmethod
    def from_proto(cls, message: authsvc_pb2.VerifyTokenResponse) -> Identity:
        return cls(
            subject=message.subject,
            session_id=message.session_id,
            authorized_party=message.authorized_party,
            expires_at=message.expires_at.ToDatetime(tzinfo=UTC),
            user=User.from_proto(message.user) if message.HasField("user") else None,
            claims=json_format.MessageToDict(message.claims),
            actor=message.actor or None,
        )
