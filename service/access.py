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
from service.sessions import SessionRules
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
    sessions: SessionRules,
    token: str,
    min_role: Role | None,
) -> tuple[VerifiedToken, UserRecord | None]:
    """Verify ``token`` and apply the access rules; return the token and the synced user, if any.

    The session rules come first (:meth:`SessionRules.check`: a revoked or
    pending session is refused, whoever its user). An inactive synced user
    is denied (:class:`UserInactive`). With ``min_role``
    an unsynced user is denied (:class:`UserNotSynced`), and so is a lower role
    (:class:`RoleTooLow`). Without it, an unsynced user passes with no record.
    """
    verified = await verifier.verify(token)
    bind(subject=verified.subject, actor=verified.actor or None)  # logged even when the call is denied below
    sessions.check(verified)
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


async def authorize_role_admin(
    verifier: TokenVerifier, users: UserReader, sessions: SessionRules, token: str | None
) -> VerifiedToken:
    """SetRole's caller: the holder of ``token`` must be an active superadmin in a session fit for it.

    No token is :class:`TokenMissing`; then :func:`authorize` (revoked, pending,
    inactive); an impersonated session is :class:`ImpersonationNotAllowed`
    whoever it impersonates; a caller who is not a synced superadmin
    :class:`CallerNotSuperadmin`; only then, with step-up configured, a second
    factor that is not recent enough :class:`ReverificationRequired`.
    """
    if not token:
        raise TokenMissing("authorization metadata with a bearer token is required")
    caller, record = await authorize(verifier, users, sessions, token, None)
    sessions.check_role_admin(caller)
    if record is None or record.role is not Role.SUPERADMIN:
        raise CallerNotSuperadmin("only an active superadmin may change roles")
    sessions.check_factor_age(caller)
    return caller


class RoleAdmin:
    """SetRole in two steps: who the caller is (:meth:`caller`), then the change (:class:`RoleChanges`)."""

    def __init__(
        self, store: UserStore, verifier: TokenVerifier, clerk: ClerkBackend | None, sessions: SessionRules
    ) -> None:
        self._store = store
        self._verifier = verifier
        self._changes = RoleChanges(store, clerk)
        self._sessions = sessions

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

        :func:`authorize_role_admin`; the caller is authorized when the call arrives.
        """
        return await authorize_role_admin(self._verifier, self._store, self._sessions, token)

    async def close(self) -> None:
        """Let role changes under way finish (their callers may be gone)."""
        await self._changes.close()
