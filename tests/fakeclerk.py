"""A local stand-in for Clerk's Backend API: a real aiohttp server on loopback holding real-shaped users.

Users have the shape of ``data`` in ``tests/fixtures/clerk/user.created.json``
(what ``GET /v1/users/{id}`` returns). Served: ``GET /v1/users`` (``limit``,
``offset``, ``order_by`` on ``created_at``/``updated_at``, an array),
``GET /v1/users/count``, ``GET /v1/users/{id}``, ``PATCH
/v1/users/{id}/metadata``. On demand: 401 for a wrong key, 429 (with or
without ``Retry-After``), 5xx windows (the next N requests, or list pages from
an offset on), a delay, a hang, an answer delay per request (after the change
is applied), and gates that hold one chosen request (before or after it is
applied) until the test releases it. Every request is recorded with its arrival time.
A field can hold raw JSON text that ``json.dumps`` could not write (:meth:`FakeClerk.set_raw`).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURE = Path(__file__).parent / "fixtures" / "clerk" / "user.created.json"
SECRET = "sk_test_authsvc_fake"
BASE_MS = 1_764_062_000_000


CODES = {400: "malformed_request", 422: "form_param_value_invalid", 429: "too_many_requests", 503: "unavailable"}


@dataclass(frozen=True)
class Seen:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    at: float  # time.monotonic() on arrival
    status: int


@dataclass
class Gate:
    """Holds one request of :meth:`FakeClerk.hold` until :meth:`release`; ``arrived`` is set when it waits."""

    method: str
    user_id: str
    countdown: int  # matching requests still to let through before the one held
    applied: bool  # hold the answer after the change is applied (else before it)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.opened.set()

    async def wait(self) -> None:
        self.arrived.set()
        await self.opened.wait()


def _error(status: int, code: str, message: str) -> web.Response:
    body = {"errors": [{"message": message, "long_message": message, "code": code}], "clerk_trace_id": "trace"}
    return web.json_response(body, status=status)


class FakeClerk:
    """Clerk's Backend API for one instance, in memory."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.users: dict[str, dict[str, Any]] = {}
        self.seen: list[Seen] = []
        self.metadata_patches: list[tuple[str, dict[str, Any], str | None]] = []
        # On demand:
        self.fail = False  # every request answers 500
        self.answer_next: list[int] = []  # the next requests answer these statuses, in order (503, 429, 422...)
        self.fail_from_offset: int | None = None  # list pages at or past this offset answer 503
        self.retry_after: str | None = "1"  # the Retry-After header of a 429 (None: absent)
        self.delay_s = 0.0  # every request waits this long first
        self.hang = False  # requests wait until release() (or the server stops)
        self.on_list: Callable[[int], Awaitable[None]] | None = None  # runs before a page at this offset is served
        self.answer_delay: Callable[[], float] | None = None  # seconds each answer waits, the change already applied
        self.gates: list[Gate] = []
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._template: dict[str, Any] = json.loads(FIXTURE.read_text())["data"]
        self._clock_ms = BASE_MS
        self._raw: dict[str, str] = {}  # placeholder string -> the raw JSON text served in its place
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- the users ---------------------------------------------------------------------
    def tick(self) -> int:
        """A Clerk time (ms) later than every one handed out before."""
        self._clock_ms += 1000
        return self._clock_ms

    def add_user(
        self,
        user_id: str,
        *,
        first_name: str | None = "Ada",
        last_name: str | None = "Lovelace",
        username: str | None = None,
        email: str | None = None,
        role: str | None = "staff",
        banned: bool = False,
        locked: bool = False,
    ) -> dict[str, Any]:
        """A new user, created now (so listed after every user before it)."""
        user = copy.deepcopy(self._template)
        now = self.tick()
        address = email if email is not None else f"{user_id.lower()}@example.com"
        user.update(
            id=user_id,
            first_name=first_name,
            last_name=last_name,
            username=username,
            primary_email_address_id=f"idn_{user_id}",
            email_addresses=[
                {**user["email_addresses"][0], "id": f"idn_old_{user_id}", "email_address": f"old.{address}"},
                {**user["email_addresses"][1], "id": f"idn_{user_id}", "email_address": address},
            ],
            public_metadata={} if role is None else {"role": role},
            banned=banned,
            locked=locked,
            created_at=now,
            updated_at=now,
        )
        self.users[user_id] = user
        return user

    def add_users(self, count: int, prefix: str = "user_") -> list[dict[str, Any]]:
        roles = ("staff", "admin", "superadmin", None, "owner")  # None: missing; owner: unknown
        return [
            self.add_user(
                f"{prefix}{i:05d}",
                first_name=f"First{i}" if i % 7 else None,
                last_name=f"Last{i}" if i % 5 else None,
                username=f"name{i}",
                role=roles[i % len(roles)],
                banned=i % 11 == 0,
                locked=i % 13 == 0,
            )
            for i in range(count)
        ]

    def update_user(self, user_id: str, **changes: Any) -> dict[str, Any]:
        """Change fields of a user (``role=`` sets ``public_metadata.role``); ``updated_at`` moves on."""
        user = self.users[user_id]
        if "role" in changes:
            user["public_metadata"] = {"role": changes.pop("role")}
        user.update(changes)
        user["updated_at"] = self.tick()
        return user

    def set_raw(self, user_id: str, field: str, raw_json: str) -> None:
        """Serve ``raw_json`` as the user's ``field`` (nesting or numbers ``json.dumps`` cannot write)."""
        placeholder = f"\x00raw:{user_id}:{field}"
        self._raw[json.dumps(placeholder)] = raw_json
        self.users[user_id][field] = placeholder

    def _json(self, value: Any) -> web.Response:
        text = json.dumps(value)
        for placeholder, raw in self._raw.items():
            text = text.replace(placeholder, raw)
        return web.Response(text=text, content_type="application/json")

    def delete_user(self, user_id: str) -> None:
        del self.users[user_id]

    def release(self) -> None:
        """Let every hanging request go on."""
        self.hang = False
        self._released.set()

    def hold(self, method: str, user_id: str, *, nth: int = 1, applied: bool = False) -> Gate:
        """Hold the ``nth`` request from now for ``user_id`` (``PATCH``: its metadata) until the gate is released.

        With ``applied`` the change is made first and only the answer waits, as
        when Clerk is slow to answer; else the request waits before anything.
        """
        gate = Gate(method, user_id, nth, applied)
        self.gates.append(gate)
        return gate

    def _gate_for(self, request: web.Request) -> Gate | None:
        user_id = request.match_info.get("user_id")
        for gate in list(self.gates):
            if (gate.method, gate.user_id) == (request.method, user_id):
                gate.countdown -= 1
                if gate.countdown == 0:
                    self.gates.remove(gate)
                    return gate
        return None

    def requests(self, path: str, method: str = "GET") -> list[Seen]:
        return [s for s in self.seen if s.path == path and s.method == method]

    # --- the server --------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1/users", self._list)
        app.router.add_get("/v1/users/count", self._count)
        app.router.add_get("/v1/users/{user_id}", self._get)
        app.router.add_patch("/v1/users/{user_id}/metadata", self._metadata)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._released.set()
        for gate in self.gates:
            gate.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeClerk:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        arrived = time.monotonic()
        response = await self._answer(request, handler)
        path = request.path
        if path.startswith("/v1/users/") and path != "/v1/users/count":
            path = "/v1/users/{id}/metadata" if path.endswith("/metadata") else "/v1/users/{id}"
        self.seen.append(Seen(request.method, path, dict(request.query), arrived, response.status))
        return response

    async def _answer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        gate = self._gate_for(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hang:
            await self._released.wait()
        if gate is not None and not gate.applied:
            await gate.wait()
        response = await self._respond(request, handler)
        if gate is not None and gate.applied:
            await gate.wait()
        if self.answer_delay is not None:
            await asyncio.sleep(self.answer_delay())
        return response

    async def _respond(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.secret}":
            return _error(401, "authentication_invalid", "Invalid authentication")
        if self.answer_next:
            status = self.answer_next.pop(0)
            response = _error(status, CODES.get(status, "error"), "on demand")
            if status == 429 and self.retry_after is not None:
                response.headers["Retry-After"] = self.retry_after
            return response
        if self.fail:
            return _error(500, "internal_clerk_error", "Oops")
        result: web.StreamResponse = await handler(request)
        return result

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "10"))
            offset = int(request.query.get("offset", "0"))
        except ValueError:
            return _error(422, "form_param_format_invalid", "limit and offset must be integers")
        if not 1 <= limit <= 500 or offset < 0:
            return _error(422, "form_param_value_invalid", "limit must be 1..500, offset >= 0")
        if self.fail_from_offset is not None and offset >= self.fail_from_offset:
            return _error(503, "service_unavailable", "Unavailable")
        if self.on_list is not None:
            await self.on_list(offset)
        order = request.query.get("order_by", "-created_at")
        key = order.lstrip("+-")
        if key not in ("created_at", "updated_at"):
            return _error(422, "form_param_value_invalid", "order_by")
        users = sorted(self.users.values(), key=lambda u: (u[key], u["id"]), reverse=order.startswith("-"))
        return self._json(users[offset : offset + limit])

    async def _count(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "total_count", "total_count": len(self.users)})

    async def _get(self, request: web.Request) -> web.Response:
        user = self.users.get(request.match_info["user_id"])
        if user is None:
            return _error(404, "resource_not_found", "not found")
        return self._json(user)

    async def _metadata(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "malformed_request", "body is not JSON")
        self.metadata_patches.append((user_id, body, request.headers.get("Authorization")))
        if user_id not in self.users:
            return _error(404, "resource_not_found", "not found")
        public = body.get("public_metadata") if isinstance(body, dict) else None
        if not isinstance(public, dict):
            return _error(422, "form_param_value_invalid", "public_metadata must be an object")
        user = self.users[user_id]
        user["public_metadata"] = {**user["public_metadata"], **public}
        user["updated_at"] = self.tick()
        return web.json_response(user)


def mirror(user: dict[str, Any]) -> dict[str, Any]:
    """The ``users`` document that the one conditional write leaves for this Clerk user (to seed a database fast)."""
    from service.clerkuser import profile_of

    p = profile_of(user)
    return {
        "externalId": p.external_id,
        "name": p.name,
        "email": p.email,
        "role": p.role.wire,
        "isActive": p.is_active,
        "clerkUpdatedAt": p.clerk_updated_at,
    }


def serve_in_child(ports: Any, stop: Any, *, secret: str = SECRET, users: int = 0, prefix: str = "user_") -> None:
    """A child process's main (multiprocessing): the fake with ``users`` users until ``stop`` gets anything.

    Its port is put on ``ports`` once it listens.
    """

    async def main() -> None:
        async with FakeClerk(secret) as fake:
            if users:
                fake.add_users(users, prefix=prefix)
            ports.put(fake.port)
            await asyncio.get_running_loop().run_in_executor(None, stop.get)

    asyncio.run(main())
