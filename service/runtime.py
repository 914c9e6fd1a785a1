"""Starting and stopping the two servers: shared by the CLI commands and `authsvc dev`."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from service.clerk import ClerkBackend
from service.database import Database, open_database
from service.embedded import EmbeddedUnavailable
from service.errors import DatabaseUnavailable
from service.logs import fields
from service.server import GrpcService, start_grpc
from service.settings import Settings
from service.tokens import TokenVerifier
from service.users import UserStore
from webhook.app import create_app

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A problem that stops startup; ``str()`` is one line for the operator."""


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def open_store(settings: Settings) -> tuple[Database, UserStore]:
    """Open the database (embedded when ``MONGODB_URI`` is unset) and its indexes."""
    try:
        database = await open_database(settings)
    except EmbeddedUnavailable as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        raise StartupError(f"cannot reach MongoDB: {type(exc).__name__}") from exc
    store = UserStore(database.db, write_concern=database.write_concern, delete_mode=settings.delete_mode)
    try:
        await store.ensure_indexes()
    except DatabaseUnavailable as exc:
        await database.close()
        raise StartupError("cannot create indexes: database unavailable") from exc
    return database, store


async def start_webhook(
    settings: Settings, store: UserStore, routes: Sequence[web.RouteDef] = ()
) -> tuple[web.AppRunner, int]:
    """Serve the sidecar on ``AUTHSVC_WEBHOOK_ADDR``; returns the runner and the bound port."""
    app = create_app(settings, store)
    app.add_routes(list(routes))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    host, port = split_addr(settings.webhook_addr)
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {settings.webhook_addr}: {exc.strerror}") from exc
    bound: int = runner.addresses[0][1] if runner.addresses else port
    log.info("webhook sidecar listening", extra=fields(addr=f"{host}:{bound}", path=settings.webhook_path))
    return runner, bound


@dataclass
class GrpcStack:
    service: GrpcService
    verifier: TokenVerifier
    clerk: ClerkBackend | None

    async def stop(self) -> None:
        await self.service.stop()
        await self.verifier.close()
        if self.clerk is not None:
            await self.clerk.close()


async def start_grpc_stack(settings: Settings, store: UserStore) -> GrpcStack:
    """The token verifier, the optional Clerk client and the gRPC server, started."""
    verifier = TokenVerifier(settings)
    await verifier.start()
    clerk = ClerkBackend(settings.clerk_api_url, settings.clerk_secret_key) if settings.clerk_secret_key else None
    try:
        service = await start_grpc(settings, store, verifier, clerk)
    except Exception as exc:
        await verifier.close()
        raise StartupError(f"cannot serve gRPC on {settings.grpc_addr}: {exc}") from exc
    if not settings.authorized_parties:
        log.warning("CLERK_AUTHORIZED_PARTIES is unset: the azp claim is not checked")
    if not settings.clerk_secret_key:
        log.warning("CLERK_SECRET_KEY is unset: SetRole writes MongoDB only; the next Clerk event wins")
    return GrpcStack(service, verifier, clerk)


async def until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")


async def run_webhook(settings: Settings) -> None:
    database, store = await open_store(settings)
    try:
        runner, _ = await start_webhook(settings, store)
        try:
            await until_signalled()
        finally:
            await runner.cleanup()
    finally:
        await database.close()


async def run_grpc(settings: Settings) -> None:
    database, store = await open_store(settings)
    try:
        stack = await start_grpc_stack(settings, store)
        try:
            await until_signalled()
        finally:
            await stack.stop()
    finally:
        await database.close()
