"""Roles and their order: superadmin > admin > staff. Pure; the server imports this one definition too."""

from __future__ import annotations

import enum


class Role(enum.IntEnum):
    """A user's role; the integer value is the rank and the ``authsvc.v1.Role`` enum number."""

    STAFF = 1
    ADMIN = 2
    SUPERADMIN = 3

    @property
    def wire(self) -> str:
        """The name stored in MongoDB and in Clerk ``public_metadata.role`` (``"admin"``)."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: object) -> Role | None:
        """The role named ``value`` (``"admin"``, ASCII case ignored), or None when it is not a known role.

        Only ASCII is folded: ``str.upper()`` maps look-alikes (a long s, a dotless i)
        onto ASCII names, and those must never grant a role.
        """
        if isinstance(value, str) and value.isascii():
            try:
                return cls[value.strip().upper()]
            except KeyError:
                return None
        return None

    @classmethod
    def from_proto(cls, value: int) -> Role | None:
        """The role of an ``authsvc.v1.Role`` number; None for ROLE_UNSPECIFIED and unknown numbers."""
        try:
            return cls(value)
        except ValueError:
            return None

    def at_least(self, minimum: Role) -> bool:
        return self >= minimum
