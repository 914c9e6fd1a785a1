"""Roles and their order (superadmin > admin > staff): the one definition lives in the client package."""

from __future__ import annotations

from authsvc_client.roles import Role

__all__ = ["DEFAULT_ROLE", "Role"]

DEFAULT_ROLE = Role.STAFF
