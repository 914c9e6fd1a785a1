"""A local Clerk-like issuer for tests: a real aiohttp server on 127.0.0.1 port 0 serving a JWKS.

Usage::

    async with LocalIssuer() as issuer:
        settings = Settings(frontend_api_url=issuer.url)
        token = issuer.mint("user_1")

or ``await issuer.start()`` ... ``await issuer.stop()``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from aiohttp import web

from authsvc.dev.issuer import JWKS_PATH, DevIssuer


class LocalIssuer:
    """Serves the JWKS of its keys; the newest key signs.

    ``down``: answer the JWKS with 503. ``delay_s``: hold each JWKS answer this
    long (to let concurrent callers pile up). ``extra_jwks``: more JWK objects
    published as-is (unusable keys, for example). ``fetches``: JWKS requests
    received, answered or not. ``requests``: every request received.
    """

    def __init__(self) -> None:
        self.keys: list[DevIssuer] = [DevIssuer.generate()]
        self.extra_jwks: list[dict[str, Any]] = []
        self.down = False
        self.delay_s = 0.0
        self.fetches = 0
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def current(self) -> DevIssuer:
        """The signing key."""
        return self.keys[-1]

    @property
    def url(self) -> str:
        """The issuer (Frontend API URL); the JWKS is at ``{url}/.well-known/jwks.json``."""
        return f"http://127.0.0.1:{self._port}"

    def rotate(self, *, drop_old: bool = False) -> DevIssuer:
        """Publish a new key that signs from now on; unpublish the old ones when ``drop_old``."""
        new = DevIssuer.generate()
        self.keys = [new] if drop_old else [*self.keys, new]
        return new

    def jwks(self) -> dict[str, Any]:
        """The JWKS document currently served."""
        return {"keys": [jwk for key in self.keys for jwk in key.jwks()["keys"]] + self.extra_jwks}

    def mint(self, subject: str, **kw: Any) -> str:
        """A token signed by the current key; ``issuer`` defaults to :attr:`url`."""
        kw.setdefault("issuer", self.url)
        return self.current.mint(subject, **kw)

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        response: web.StreamResponse = await handler(request)
        return response

    async def _serve_jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.down:
            return web.json_response({"error": "down"}, status=503)
        return web.json_response(self.jwks())

    async def start(self) -> None:
        """Listen on 127.0.0.1, port 0."""
        app = web.Application(middlewares=[self._count])
        app.router.add_get(JWKS_PATH, self._serve_jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> LocalIssuer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
