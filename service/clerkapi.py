"""Clerk's Backend API: the one client that role write-through (and sync, and just-in-time fetches) share."""

from __future__ import annotations

import logging
from urllib.parse import quote

import aiohttp

from service.errors import ClerkUnavailable
from service.logs import fields
from service.roles import Role

log = logging.getLogger(__name__)


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
