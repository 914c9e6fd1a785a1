"""The session rules: which verified tokens may be used, and which may change roles.

Clerk's SDKs verify a token without the network, so they cannot know that its
session was revoked or still has tasks to finish; authsvc hears both. Every
path that checks a token (VerifyToken, Envoy's Check, SetRole's caller) goes
through :func:`service.access.authorize`, which applies :meth:`SessionRules.check`;
SetRole's caller check adds :meth:`SessionRules.check_role_admin` and
:meth:`SessionRules.check_factor_age`.
"""

from __future__ import annotations

from typing import Any, Protocol

from service.errors import (
    DatabaseUnavailable,
    ImpersonationNotAllowed,
    ReverificationRequired,
    SessionPending,
    SessionRevoked,
)
from service.tokens import VerifiedToken


class Revoked(Protocol):
    """What the rules read revocations from (:class:`service.revocations.RevokedSessions`)."""

    @property
    def loaded(self) -> bool: ...

    def __contains__(self, session_id: str) -> bool: ...


def second_factor_age(claims: dict[str, Any]) -> int | None:
    """Minutes since the second factor was verified (``fva[1]``); None when never, or ``fva`` is malformed.

    Clerk's ``fva`` is ``[first, second]``, ages in minutes, ``-1`` for never.
    Anything else (absent, not a list of two integers) is treated as "not
    verified recently": a step-up that cannot be read is not a step-up.
    """
    fva = claims.get("fva")
    if not isinstance(fva, list) or len(fva) != 2:
        return None
    age = fva[1]
    if isinstance(age, bool) or not isinstance(age, int) or age < 0:
        return None
    return age


class SessionRules:
    """Revoked and pending sessions for every token check; impersonation and step-up for SetRole's caller.

    ``accept_pending``: ``AUTHSVC_ACCEPT_PENDING_SESSIONS``;
    ``max_factor_age_min``: ``AUTHSVC_SETROLE_MAX_FACTOR_AGE_MIN`` (0: off).
    """

    def __init__(self, revoked: Revoked, *, accept_pending: bool = False, max_factor_age_min: int = 0) -> None:
        self._revoked = revoked
        self._accept_pending = accept_pending
        self._max_factor_age = max_factor_age_min

    def check(self, verified: VerifiedToken) -> None:
        """Refuse a token of a revoked session (its ``sid``), then of a pending one unless accepted."""
        sid = verified.session_id
        if sid:
            if not self._revoked.loaded:
                raise DatabaseUnavailable("revoked sessions are not loaded yet")
            if sid in self._revoked:
                raise SessionRevoked("session revoked")
        if verified.pending and not self._accept_pending:
            raise SessionPending("session is pending: the user has tasks to finish")

    def check_role_admin(self, verified: VerifiedToken) -> None:
        """Refuse an impersonated session (an ``act`` claim) as SetRole's caller."""
        if verified.actor:
            raise ImpersonationNotAllowed("an impersonated session cannot change roles")

    def check_factor_age(self, verified: VerifiedToken) -> None:
        """With a maximum age set, require ``0 <= fva[1] <= max`` (a second factor verified recently)."""
        if not self._max_factor_age:
            return
        age = second_factor_age(verified.claims)
        if age is None or age > self._max_factor_age:
            raise ReverificationRequired(
                f"changing roles needs a second factor verified within {self._max_factor_age} minutes"
            )
