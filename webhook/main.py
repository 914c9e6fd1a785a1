"""The sidecar process's composition root: the aiohttp app served over a store, until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from service.clerkapi import ClerkBackend
from service.dbmonitor import DatabaseMonitor
from service.exposition import metrics_server
from service.logs import fields
from service.repair import Repairer
from service.settings import Settings
from service.startup import StartupError, served_database, split_addr, until_signalled
from service.tracing import traced
from service.users import UserStore
from webhook.app import DATABASE, create_app
from webhook.limits import Limits, descriptor_budget, quiet_accept_errors, start_site

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def sidecar(
    settings: Settings,
    store: UserStore,
    routes: Sequence[web.RouteDef] = (),
    *,
    worker: bool = False,
    limits: Limits | None = None,
    monitor: DatabaseMonitor | None = None,
) -> AsyncIterator[int]:
    """Serve the sidecar on ``AUTHSVC_WEBHOOK_ADDR`` until the block exits; yields the bound port.

    ``worker``: one of the workers of one ``authsvc webhook``, sharing the
    address (``SO_REUSEPORT``); their parent serves ``AUTHSVC_WEBHOOK_METRICS_ADDR``.
    ``limits``: the contract's (:class:`Limits`) unless a test passes smaller ones.
    ``monitor`` (the database's, from :func:`service.startup.served_database`) answers ``/readyz``;
    without one, ``/readyz`` pings.
    """
    limits = descriptor_budget(limits or Limits())
    app = create_app(settings, store, limits)
    if monitor is not None:
        app[DATABASE] = monitor
    app.add_routes(list(routes))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(runner.cleanup)
        if settings.webhook_metrics_addr and not worker:
            metrics = metrics_server(settings.webhook_metrics_addr, "AUTHSVC_WEBHOOK_METRICS_ADDR")
            await stack.enter_async_context(metrics)
        stack.enter_context(quiet_accept_errors())
        host, port = split_addr(settings.webhook_addr)
        try:
            await start_site(runner, host, port, limits, reuse_port=worker)
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.webhook_addr}: {exc.strerror}") from exc
        bound: int = runner.addresses[0][1] if runner.addresses else port
        log.info("webhook sidecar listening", extra=fields(addr=f"{host}:{bound}", path=settings.webhook_path))
        await _periodic_repair(settings, store, stack, monitor)
        yield bound


async def _periodic_repair(
    settings: Settings, store: UserStore, stack: contextlib.AsyncExitStack, monitor: DatabaseMonitor | None
) -> None:
    """With ``AUTHSVC_SYNC_INTERVAL_S`` and ``CLERK_SECRET_KEY``: reconcile from Clerk on that interval."""
    if not settings.sync_interval_s:
        return
    if not settings.clerk_secret_key:
        log.warning("AUTHSVC_SYNC_INTERVAL_S is set but CLERK_SECRET_KEY is not: no periodic repair")
        return
    clerk = ClerkBackend(settings.clerk_api_url, settings.clerk_secret_key)
    stack.push_async_callback(clerk.close)
    repairer = Repairer(store, clerk, settings.sync_interval_s)
    stack.push_async_callback(repairer.close)
    if monitor is None or monitor.up:
        await repairer.start()
        return

    async def once_reachable() -> None:  # a sidecar started without its database repairs once it has one
        await monitor.wait_up()
        await repairer.start()

    waiting = asyncio.create_task(once_reachable(), name="periodic-repair-start")
    stack.callback(waiting.cancel)


async def run_webhook(settings: Settings, *, worker: bool = False, on_ready: Callable[[], None] | None = None) -> None:
    """``authsvc webhook``: serve until SIGTERM/SIGINT.

    ``worker``: one of several workers (:mod:`service.workers`) sharing the
    address with ``SO_REUSEPORT``; ``on_ready`` is called once serving. Traces
    when OpenTelemetry's variables say so (set up first: the instrumentations
    must see the database client and the application being made).
    """
    async with (
        traced("authsvc-webhook"),
        served_database(settings) as database,
        sidecar(settings, database.store, monitor=database.monitor, worker=worker),
    ):
        if on_ready is not None:
            on_ready()
        await until_signalled(database)
