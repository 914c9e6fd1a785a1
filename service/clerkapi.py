"""Clerk's Backend API: the one client that role write-through, ``authsvc sync`` and just-in-time sync share.

Every request carries ``Authorization: Bearer CLERK_SECRET_KEY``, has a
timeout, quotes user ids as one path segment, is counted in
``authsvc_clerk_requests_total{op,status}``, and follows one retry policy
(tenacity):

- 429: wait its ``Retry-After`` seconds (1 s when absent), then retry;
- 5xx, a connection error or a timeout: back off exponentially (with jitter),
  a bounded number of times;
- anything else is final and mapped once, here, onto :mod:`service.errors`:
  401/403 :class:`ClerkKeyRefused`, 404 on a user :class:`ClerkUserNotFound`,
  another 4xx :class:`ClerkRejected`, retries exhausted :class:`ClerkUnavailable`.
"""

from __future__ import annotations

import email.utils
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from service import clerkjson
from service.errors import ClerkKeyRefused, ClerkRejected, ClerkUnavailable, ClerkUserNotFound
from service.logs import fields
from service.metrics import CLERK_REQUESTS
from service.roles import Role

log = logging.getLogger(__name__)

ClerkUser = dict[str, Any]
DEFAULT_RETRY_AFTER_S = 1.0


class _Retryable(Exception):
    """An answer worth retrying; ``str()`` says what it was (``HTTP 503``, ``ClientConnectorError``)."""


class _RateLimited(_Retryable):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("HTTP 429")
        self.retry_after_s = retry_after_s


def retry_after_seconds(value: str | None, *, cap_s: float) -> float:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); 1 s when absent or unreadable."""
    if value is None:
        return DEFAULT_RETRY_AFTER_S
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), cap_s)


def _clerk_code(body: object) -> str:
    """The first ``errors[].code`` of a Clerk error body, if any (safe to show: no user data)."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = errors[0].get("code")
            if isinstance(code, str):
                return f": {code[:64]}"
    return ""


class ClerkBackend:
    """The slice of Clerk's Backend API that authsvc uses: users (list, count, get) and their role."""

    def __init__(
        self,
        api_url: str,
        secret_key: str,
        *,
        timeout_s: float = 5.0,
        attempts: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        rate_limit_attempts: int = 10,
        max_retry_after_s: float = 60.0,
    ) -> None:
        self._api_url = api_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {secret_key}", "Accept": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._attempts = attempts
        self._rate_limit_attempts = rate_limit_attempts
        self._max_retry_after = max_retry_after_s
        self._backoff = wait_exponential(multiplier=backoff_s, max=max_backoff_s) + wait_random(0, backoff_s / 2)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def for_calls(cls, api_url: str, secret_key: str) -> ClerkBackend:
        """The policy for requests a caller waits on (SetRole's write-through, JIT fetches).

        A sync can wait minutes for Clerk's rate limit; a gRPC caller cannot. Here
        one retry at most, a 429 waits at most 1 s, and each attempt times out in
        3 s, so a Clerk outage is answered ``CLERK_UNAVAILABLE`` within about 7 s.
        """
        return cls(
            api_url,
            secret_key,
            timeout_s=3.0,
            attempts=2,
            backoff_s=0.2,
            max_backoff_s=0.5,
            rate_limit_attempts=2,
            max_retry_after_s=1.0,
        )

    async def close(self) -> None:
        """Close the HTTP session; a request after this (or racing it) is :class:`ClerkUnavailable`."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- operations ------------------------------------------------------------
    async def set_role(self, user_id: str, role: Role) -> ClerkUser:
        """Merge ``{"role": ...}`` into the user's ``public_metadata``; return the user as Clerk now holds it.

        The answer carries the user's new ``updated_at``: the version MongoDB's
        copy is written with. An answer that is not a user object is
        :class:`ClerkUnavailable`, though the change may have been made.
        """
        body = {"public_metadata": {"role": role.wire}}
        path = f"/v1/users/{quote(user_id, safe='')}/metadata"
        user = await self._request("set_role", "PATCH", path, json=body, user=True)
        if not isinstance(user, dict):
            raise ClerkUnavailable("Clerk answered set_role with something other than a user object")
        return user

    async def get_user(self, user_id: str) -> ClerkUser:
        """``GET /v1/users/{id}``; :class:`ClerkUserNotFound` when Clerk has no such user."""
        user = await self._request("get_user", "GET", f"/v1/users/{quote(user_id, safe='')}", user=True)
        if not isinstance(user, dict):
            raise ClerkUnavailable("Clerk answered get_user with something other than a user object")
        return user

    async def count_users(self) -> int:
        """``GET /v1/users/count``: how many users the instance has."""
        body = await self._request("count_users", "GET", "/v1/users/count")
        count = body.get("total_count") if isinstance(body, dict) else None
        if isinstance(count, bool) or not isinstance(count, int):
            raise ClerkUnavailable("Clerk answered count_users without a total_count")
        return count

    async def list_users(self, *, offset: int, limit: int = 500) -> list[ClerkUser]:
        """One page of ``GET /v1/users``, oldest first (``order_by=+created_at``)."""
        params = {"limit": str(limit), "offset": str(offset), "order_by": "+created_at"}
        body = await self._request("list_users", "GET", "/v1/users", params=params)
        page = body.get("data") if isinstance(body, dict) else body  # an array; the SDKs' {"data": [...]} too
        if not isinstance(page, list):
            raise ClerkUnavailable("Clerk answered list_users with something other than a list")
        return page

    # --- the policy --------------------------------------------------------------
    async def _request(
        self,
        op: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json: object = None,
        user: bool = False,
    ) -> Any:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retryable),
            stop=self._stop,
            wait=self._wait,
            before_sleep=lambda state: self._log_retry(op, state),
            reraise=True,
        )
        result: Any = None
        try:
            async for attempt in retrying:
                with attempt:
                    result = await self._once(op, method, path, params, json, user)
        except _RateLimited as exc:
            raise ClerkUnavailable(f"Clerk kept rate-limiting {op} (HTTP 429)") from exc
        except _Retryable as exc:
            raise ClerkUnavailable(f"Clerk is unavailable for {op} ({exc})") from exc
        return result

    async def _once(
        self, op: str, method: str, path: str, params: dict[str, str] | None, json: object, user: bool
    ) -> Any:
        if self._closed:
            raise ClerkUnavailable("the Clerk client is closed (shutting down)")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        try:
            async with self._session.request(method, self._api_url + path, params=params, json=json) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            CLERK_REQUESTS.labels(op=op, status="error").inc()
            raise _Retryable(type(exc).__name__) from exc
        code = response.status
        CLERK_REQUESTS.labels(op=op, status=str(code)).inc()
        try:
            body = clerkjson.loads(raw) if raw else None
        except ValueError:  # the page as a whole is not JSON (one odd user in it still parses)
            body = None
        if code < 300:
            if body is None and raw:
                raise _Retryable(f"HTTP {code} with a body that is not JSON")  # a proxy's page, not Clerk
            return body
        if code == 429:
            raise _RateLimited(retry_after_seconds(response.headers.get("Retry-After"), cap_s=self._max_retry_after))
        if code >= 500:
            raise _Retryable(f"HTTP {code}")
        if code in (401, 403):
            raise ClerkKeyRefused(f"Clerk refused CLERK_SECRET_KEY (HTTP {code})")
        if code == 404 and user:
            raise ClerkUserNotFound(f"Clerk has no such user (HTTP 404{_clerk_code(body)})")
        raise ClerkRejected(f"Clerk rejected {op} (HTTP {code}{_clerk_code(body)})")

    def _stop(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome is not None else None
        limit = self._rate_limit_attempts if isinstance(exc, _RateLimited) else self._attempts
        return state.attempt_number >= limit

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _RateLimited):
            return exc.retry_after_s
        return float(self._backoff(state))

    def _log_retry(self, op: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "clerk request retried",
            extra=fields(op=op, error=str(exc), attempt=state.attempt_number, wait_s=round(wait, 3)),
        )
