"""What both processes need to start and stop: the database as a resource, signals, startup errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from service.database import IndexConflict, describe_failure, open_database
from service.embedded import EmbeddedUnavailable
from service.errors import DatabaseUnavailable
from service.settings import Settings
from service.users import UserStore

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A problem that stops startup; ``str()`` is one line for the operator."""


def split_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.asynccontextmanager
async def user_store(settings: Settings) -> AsyncIterator[UserStore]:
    """The database (embedded when ``MONGODB_URI`` is unset) with its indexes, closed on exit."""
    try:
        database = await open_database(settings)
    except EmbeddedUnavailable as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        raise StartupError(describe_failure(settings.mongodb_uri or "", exc)) from exc
    try:
        store = UserStore(database.db, write_concern=database.write_concern, delete_mode=settings.delete_mode)
        try:
            await store.ensure_indexes()
        except DatabaseUnavailable as exc:
            raise StartupError("cannot create indexes: database unavailable") from exc
        except IndexConflict as exc:
            raise StartupError(describe_failure(settings.mongodb_uri or "", exc)) from exc
        yield store
    finally:
        await database.close()


async def until_signalled() -> None:
    """Return at the first SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")


@contextlib.asynccontextmanager
async def shared_database_uri(settings: Settings) -> AsyncIterator[str | None]:
    """For worker processes: the embedded server, started once for all of them (its URI); None with ``MONGODB_URI``."""
    if settings.mongodb_uri is not None:
        yield None
        return
    from service.embedded import EmbeddedMongo

    embedded = EmbeddedMongo(settings.data_dir / "mongo")
    try:
        await embedded.start()
    except EmbeddedUnavailable as exc:
        raise StartupError(str(exc)) from exc
    try:
        yield embedded.uri
    finally:
        embedded.stop()
