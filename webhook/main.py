"""The sidecar process's composition root: the aiohttp app served over a store, until a signal."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from service.clerkapi import ClerkBackend
from service.logs import fields
from service.repair import Repairer
from service.settings import Settings
from service.startup import StartupError, split_addr, until_signalled, user_store
from service.tracing import traced
from service.users import UserStore
from webhook.app import create_app

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def sidecar(
    settings: Settings, store: UserStore, routes: Sequence[web.RouteDef] = (), *, reuse_port: bool = False
) -> AsyncIterator[int]:
    """Serve the sidecar on ``AUTHSVC_WEBHOOK_ADDR`` until the block exits; yields the bound port.

    ``reuse_port`` (``SO_REUSEPORT``) only for the workers of one ``authsvc webhook``.
    """
    app = create_app(settings, store)
    app.add_routes(list(routes))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        host, port = split_addr(settings.webhook_addr)
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.webhook_addr}: {exc.strerror}") from exc
        bound: int = runner.addresses[0][1] if runner.addresses else port
        log.info("webhook sidecar listening", extra=fields(addr=f"{host}:{bound}", path=settings.webhook_path))
        await _periodic_repair(settings, store, stack)
        yield bound


async def _periodic_repair(settings: Settings, store: UserStore, stack: contextlib.AsyncExitStack) -> None:
    """With ``AUTHSVC_SYNC_INTERVAL_S`` and ``CLERK_SECRET_KEY``: reconcile from Clerk on that interval."""
    if not settings.sync_interval_s:
        return
    if not settings.clerk_secret_key:
        log.warning("AUTHSVC_SYNC_INTERVAL_S is set but CLERK_SECRET_KEY is not: no periodic repair")
        return
    clerk = ClerkBackend(settings.clerk_api_url, settings.clerk_secret_key)
    stack.push_async_callback(clerk.close)
    repairer = Repairer(store, clerk, settings.sync_interval_s)
    await repairer.start()
    stack.push_async_callback(repairer.close)


async def run_webhook(settings: Settings, *, worker: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    """``authsvc webhook``: serve until SIGTERM/SIGINT.

    ``worker``: one of several workers (:mod:`service.workers`) sharing the
    address with ``SO_REUSEPORT``; ``on_ready`` is called once serving. Traces
    when OpenTelemetry's variables say so (set up first: the instrumentations
    must see the database client and the application being made).
    """
    async with traced("authsvc-webhook"), user_store(settings) as store, sidecar(settings, store, reuse_port=worker):
        if on_ready is not None:
            on_ready()
        await until_signalled()
