"""The rules of the RPCs, free of grpc: who may verify as what, and who may change roles.

The servicer translates requests into these calls and :class:`AuthError` out
of them into status codes; nothing here knows about either.
"""

from __future__ import annotations

from typing import Protocol

from service.clerkapi import ClerkBackend
from service.errors import (
    CallerNotSuperadmin,
    InvalidArgument,
    RoleTooLow,
    TokenMissing,
    UserInactive,
    UserNotSynced,
)
from service.logs import bind
from service.rolechanges import RoleChanges
from service.roles import Role
from service.tokens import TokenVerifier, VerifiedToken
from service.users import UserRecord, UserStore

MAX_EXTERNAL_ID = 256


def check_external_id(external_id: str) -> None:
    """Raise :class:`InvalidArgument` unless ``external_id`` looks like a user id (non-empty, bounded)."""
    if not external_id or len(external_id) > MAX_EXTERNAL_ID:
        raise InvalidArgument("external_id must be a non-empty user id")


class UserReader(Protocol):
    """What :func:`authorize` reads users through: the store, or its cache."""

    async def get(self, external_id: str, *, include_tombstones: bool = False) -> UserRecord | None: ...


async def authorize(
    verifier: TokenVerifier,
    users: UserReader,
    token: str,
    min_role: Role | None,
) -> tuple[VerifiedToken, UserRecord | None]:
    """Verify ``token`` and apply the access rules; return the token and the synced user, if any.

    An inactive synced user is denied (:class:`UserInactive`). With ``min_role``
    an unsynced user is denied (:class:`UserNotSynced`), and so is a lower role
    (:class:`RoleTooLow`). Without it, an unsynced user passes with no record.
    """
    verified = await verifier.verify(token)
    bind(subject=verified.subject)  # logged even when the call is denied below
    # Tombstones included: a deleted user stays denied, never "not synced".
    user = await users.get(verified.subject, include_tombstones=True)
    if user is not None and not user.is_active:
        raise UserInactive("user is inactive")
    if min_role is not None:
        if user is None:
            raise UserNotSynced("user is not synced yet")
        if not user.role.at_least(min_role):
            raise RoleTooLow(f"role {user.role.wire} is below the required {min_role.wire}")
    return verified, user


class RoleAdmin:
    """SetRole in two steps: who the caller is (:meth:`caller`), then the change (:class:`RoleChanges`)."""

    def __init__(self, store: UserStore, verifier: TokenVerifier, clerk: ClerkBackend | None) -> None:
        self._store = store
        self._verifier = verifier
        self._changes = RoleChanges(store, clerk)

    async def set_role(
        self,
        token: str | None,
        external_id: str,
        role: Role | None,
    ) -> UserRecord:
        """Give ``external_id`` the role ``role`` on behalf of the holder of ``token``; return the user.

        The caller is checked before the arguments, so an outsider learns
        nothing about which users exist (:meth:`caller`). Then: an empty id or
        no role is :class:`InvalidArgument`; the rest is the change's
        (:meth:`RoleChanges.apply`): an unknown target :class:`UserNotFound`,
        an inactive one :class:`TargetInactive`, demoting the last active
        superadmin :class:`LastSuperadmin`, a Clerk failure
        :class:`ClerkUnavailable` (or another Clerk error), each before
        anything is written or with nothing known to be written.
        """
        caller = await self.caller(token)
        check_external_id(external_id)
        if role is None:
            raise InvalidArgument("role must be ROLE_STAFF, ROLE_ADMIN or ROLE_SUPERADMIN")
        return await self._changes.apply(caller.subject, external_id, role)

    async def caller(self, token: str | None) -> VerifiedToken:
        """Who asks: the verified token of a synced, active superadmin.

        No token is :class:`TokenMissing`; a caller who is not a synced, active
        superadmin is :class:`CallerNotSuperadmin` (or :class:`UserInactive`).
        The caller is authorized when the call arrives.
        """
        if not token:
            raise TokenMissing("authorization metadata with a bearer token is required")
        caller, record = await authorize(self._verifier, self._store, token, None)
        if record is None or record.role is not Role.SUPERADMIN:
            raise CallerNotSuperadmin("only an active superadmin may change roles")
        return caller

    async def close(self) -> None:
        """Let role changes under way finish (their callers may be gone)."""
        await self._changes.close()
