"""The aiohttp and ASGI middleware inside real apps, verifying through a real authsvc."""

from __future__ import annotations

import json
import posixpath
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from authsvc_client import AuthsvcClient, Identity, Role, current_identity
from authsvc_client.aiohttp import IDENTITY, authsvc_middleware, public, requires
from authsvc_client.asgi import AuthsvcASGI
from authsvc_client.paths import is_public, resolve, under
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import Harness, seed, serve
from tests.issuer import LocalIssuer


async def me(request: web.Request) -> web.Response:
    identity: Identity = request[IDENTITY]
    assert current_identity() is identity
    return web.json_response({"sub": identity.subject, "role": identity.role.wire if identity.role else None})


@requires(Role.ADMIN)
async def admin(request: web.Request) -> web.Response:
    return web.json_response({"admin": request[IDENTITY].subject})


@public
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@dataclass
class App:
    h: Harness
    url: str
    http: aiohttp.ClientSession

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.get(self.url + path, headers=headers or {}) as response:
            return response.status, await response.json()


@pytest.fixture
async def app(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[App]:
    async with serve(settings, store, issuer) as h, AuthsvcClient(h.target) as authsvc:
        application = web.Application(middlewares=[authsvc_middleware(authsvc, default=Role.STAFF)])
        application.router.add_get("/me", me)
        application.router.add_get("/admin", admin)
        application.router.add_get("/healthz", healthz)
        runner = web.AppRunner(application, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as http:
                yield App(h, f"http://127.0.0.1:{port}", http)
        finally:
            await runner.cleanup()


async def test_header_or_cookie_reaches_the_handler_as_the_identity(app: App) -> None:
    await seed(app.h.store, "user_admin", Role.ADMIN)
    token = app.h.token("user_admin")
    assert await app.get("/me", {"Authorization": f"Bearer {token}"}) == (200, {"sub": "user_admin", "role": "admin"})
    assert await app.get("/me", {"Cookie": f"__session={token}"}) == (200, {"sub": "user_admin", "role": "admin"})
    assert await app.get("/admin", {"Authorization": f"Bearer {token}"}) == (200, {"admin": "user_admin"})


async def test_cookies_that_simplecookie_rejects_never_hide_the_session(app: App) -> None:
    await seed(app.h.store, "user_staff")
    token = app.h.token("user_staff")
    cookie = f'ajs_user_traits={{"plan":"pro"}}; cart=two words; p=C:\\x; ; __session={token}'
    assert await app.get("/me", {"Cookie": cookie}) == (200, {"sub": "user_staff", "role": "staff"})
    # Several Cookie header lines are one cookie list.
    headers = CIMultiDict([("Cookie", "theme=dark"), ("Cookie", f"__session={token}")])
    async with app.http.get(app.url + "/me", headers=headers) as response:
        assert (response.status, await response.json()) == (200, {"sub": "user_staff", "role": "staff"})


async def test_denials_are_401_or_403_with_the_reason(app: App) -> None:
    h = app.h
    await seed(h.store, "user_staff")
    await seed(h.store, "user_banned", active=False)

    async def reason(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        status, body = await app.get(path, headers)
        assert set(body) == {"error", "reason"}
        return status, body["reason"]

    staff = h.token("user_staff")
    assert await reason("/me") == (401, "TOKEN_MISSING")
    assert await reason("/me", {"Authorization": "Basic x", "Cookie": f"__session={staff}"}) == (401, "TOKEN_MALFORMED")
    assert await reason("/me", {"Authorization": f"Bearer {h.token('user_staff', ttl_s=-60)}"}) == (
        401,
        "TOKEN_EXPIRED",
    )
    assert await reason("/admin", {"Authorization": f"Bearer {staff}"}) == (403, "ROLE_TOO_LOW")
    assert await reason("/me", {"Authorization": f"Bearer {h.token('user_banned')}"}) == (403, "USER_INACTIVE")
    assert await reason("/me", {"Authorization": f"Bearer {h.token('user_new')}"}) == (403, "USER_NOT_SYNCED")


async def test_public_routes_and_unknown_paths_need_no_token(app: App) -> None:
    assert await app.get("/healthz") == (200, {"ok": True})
    async with app.http.get(app.url + "/nowhere") as response:
        assert response.status == 404


async def asgi_call(app: AuthsvcASGI, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """One HTTP request through an ASGI app, as a server would make it."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def test_asgi_middleware(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        body = json.dumps({"sub": current_identity().subject, "state": scope["state"]["authsvc_identity"].subject})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    async with serve(settings, store, issuer) as h, AuthsvcClient(h.target) as authsvc:
        await seed(h.store, "user_staff")
        app = AuthsvcASGI(inner, authsvc, min_roles={"/admin": Role.ADMIN}, public=("/healthz",))
        token = h.token("user_staff")
        assert await asgi_call(app, "/me", {"cookie": f"__session={token}"}) == (
            200,
            {"sub": "user_staff", "state": "user_staff"},
        )
        assert await asgi_call(app, "/admin/x", {"authorization": f"Bearer {token}"}) == (
            403,
            {"error": "role staff is below the required admin", "reason": "ROLE_TOO_LOW"},
        )
        status, body = await asgi_call(app, "/me", {})
        assert (status, body["reason"]) == (401, "TOKEN_MISSING")
        cookie = f'ajs_user_traits={{"plan":"pro"}}; cart=two words; __session={token}'
        assert (await asgi_call(app, "/me", {"cookie": cookie}))[0] == 200
        # A min_roles prefix reached through dot segments still needs its role.
        for path in ("/me/../admin/x", "/me/%2e%2e/admin/x", "/./admin/x"):
            status, body = await asgi_call(app, path, {"authorization": f"Bearer {token}"})
            assert (status, body["reason"]) == (403, "ROLE_TOO_LOW"), path


async def reached(app: AuthsvcASGI, path: str) -> bool:
    """Whether a request for ``path`` without any token reaches the inner app."""
    status, body = await asgi_call(app, path, {})
    if status == 200:
        return True
    assert (status, body["reason"]) == (401, "TOKEN_MISSING"), path
    return False


@pytest.mark.parametrize(
    ("path", "public"),
    [
        ("/health", True),
        ("/health/", True),
        ("/health/live", True),
        ("/health/./live", True),
        ("/healthcheck-admin/export", False),
        ("/healthz", False),
        ("/health/../admin/users", False),
        ("/health/%2e%2e/admin/users", False),
        ("/health/%2E%2E%2Fadmin", False),
        ("/health/..%2fadmin", False),
        ("/health//../admin", False),
        ("/health/..", False),
        ("/admin/../health", False),  # a router that does not resolve ".." routes it under /admin
        ("//health", False),
        ("/", False),
        ("/admin", False),
    ],
)
async def test_asgi_public_entries_match_whole_segments_of_the_resolved_path(path: str, public: bool) -> None:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    # No authsvc behind it: a request that is not public is refused (TOKEN_MISSING) before any call.
    async with AuthsvcClient("127.0.0.1:9") as authsvc:
        app = AuthsvcASGI(inner, authsvc, default=Role.STAFF, public=("/health",))
        assert await reached(app, path) is public
        trailing = AuthsvcASGI(inner, authsvc, default=Role.STAFF, public=("/health/",))
        assert await reached(trailing, path) is public


@given(st.text(st.sampled_from(list("/.%2eEfF5cChealthadmin")), max_size=30))
def test_a_public_path_is_under_the_entry_however_a_router_resolves_it(path: str) -> None:
    if not is_public(path, ("/health",)):
        return
    for reading in (path, posixpath.normpath(path), posixpath.normpath(unquote(path)), resolve(unquote(path))):
        assert under(reading.replace("//", "/"), "/health"), (path, reading)
