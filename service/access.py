"""The rules of the RPCs, free of grpc: who may verify as what, and who may change roles.

The servicer translates requests into these calls and :class:`AuthError` out
of them into status codes; nothing here knows about either.
"""

from __future__ import annotations

import logging
from typing import Protocol

from service.clerkapi import ClerkBackend
from service.errors import (
    CallerNotSuperadmin,
    InvalidArgument,
    LastSuperadmin,
    RoleTooLow,
    TargetInactive,
    TokenMissing,
    UserInactive,
    UserNotFound,
    UserNotSynced,
)
from service.logs import bind, fields
from service.roles import Role
from service.sessions import SessionRules
from service.tokens import TokenVerifier, VerifiedToken
from service.users import UserRecord, UserStore

log = logging.getLogger(__name__)

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
    """SetRole: superadmins change roles in Clerk (when configured), then MongoDB, with an audit record."""

    def __init__(
        self, store: UserStore, verifier: TokenVerifier, clerk: ClerkBackend | None, sessions: SessionRules
    ) -> None:
        self._store = store
        self._verifier = verifier
        self._clerk = clerk
        self._sessions = sessions

    async def set_role(
        self,
        token: str | None,
        external_id: str,
        role: Role | None,
    ) -> UserRecord:
        """Give ``external_id`` the role ``role`` on behalf of the holder of ``token``; return the user.

        The caller is checked before the arguments, so an outsider learns
        nothing about which users exist (:func:`authorize_role_admin`). Then: an empty
        id or no role is :class:`InvalidArgument`, an unknown target
        :class:`UserNotFound`, an inactive one :class:`TargetInactive`, and
        demoting the last active superadmin :class:`LastSuperadmin`. A Clerk
        failure is :class:`ClerkUnavailable` and changes nothing.
        """
        caller = await authorize_role_admin(self._verifier, self._store, self._sessions, token)

        check_external_id(external_id)
        if role is None:
            raise InvalidArgument("role must be ROLE_STAFF, ROLE_ADMIN or ROLE_SUPERADMIN")

        target = await self._store.get(external_id)
        if target is None:
            raise UserNotFound("user not found")
        if not target.is_active:
            raise TargetInactive("user is inactive; its role cannot be changed")
        demotion = target.role is Role.SUPERADMIN and role is not Role.SUPERADMIN
        if demotion and not await self._another_superadmin(external_id):
            raise LastSuperadmin("the last active superadmin cannot be demoted")

        if self._clerk is not None:
            await self._clerk.set_role(external_id, role)  # ClerkUnavailable: nothing changed
        updated = await self._store.set_role(external_id, role, by=caller.subject, via="grpc")
        if updated is None:  # deleted between the read and the write
            raise UserNotFound("user not found")

        # Two superadmins demoting each other (or themselves) at once both pass
        # the check above. Re-checking after our own write closes that race:
        # whichever write lands last sees no active superadmin and reverts, so
        # at least one always remains. Both may revert; that is the safe side.
        if demotion and not await self._store.active_superadmins(limit=1):
            await self._revert(external_id, caller.subject)
            raise LastSuperadmin("the last active superadmin cannot be demoted")
        return updated

    async def _another_superadmin(self, external_id: str) -> bool:
        # With limit=2 a second active superadmin shows up whenever one exists.
        found = await self._store.active_superadmins(limit=2)
        return any(other != external_id for other in found)

    async def _revert(self, external_id: str, by: str) -> None:
        await self._store.set_role(external_id, Role.SUPERADMIN, by=by, via="grpc-revert")
        if self._clerk is not None:
            try:
                await self._clerk.set_role(external_id, Role.SUPERADMIN)
            except Exception:
                # Clerk now says the demoted role; its user.updated event would
                # demote this user in MongoDB. Loud, because an operator must fix it.
                log.error(
                    "clerk role revert failed; restore public_metadata.role=superadmin by hand",
                    exc_info=True,
                    extra=fields(externalId=external_id),
                )
        log.warning("demotion reverted: no active superadmin would remain", extra=fields(externalId=external_id))
