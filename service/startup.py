"""What both processes need to start and stop: the database as a resource, signals, startup errors.

A server (``authsvc grpc``, ``authsvc webhook``, ``authsvc dev``) opens the
database with :func:`served_database`: it does not wait for MongoDB. The
first attempt to reach it is made at once; if MongoDB does not answer, the
server starts anyway (listening, ``NOT_SERVING``, ``/readyz`` 503) and the
attempts go on in the background with a backoff of 0.5 s doubling to 10 s,
one warning line each, until it answers: then the indexes are made and the
:class:`service.dbmonitor.DatabaseMonitor` takes over. Only a database that
does not answer is waited for: a malformed URI, or a server that answers with
a refusal (credentials, privileges, an index its data cannot take), stops
startup at once (one line, exit 2), also when the refusal comes on a later
attempt. ``authsvc sync`` uses :func:`user_store`: one attempt, and exit 2
when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pymongo
from pymongo.errors import ConfigurationError, ConnectionFailure, ExecutionTimeout, PyMongoError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential

from service.database import Database, IndexConflict, TlsMismatch, describe_failure, open_database, tls_mismatch
from service.dbmonitor import DatabaseMonitor
from service.embedded import EmbeddedUnavailable
from service.errors import DatabaseUnavailable
from service.logs import fields
from service.settings import Settings
from service.users import UserStore

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT_S = 2.0  # one attempt to reach the database (its ping; making the indexes may take longer)


class StartupError(Exception):
    """A problem that stops startup; ``str()`` is one line for the operator."""


def split_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def _open(settings: Settings, **defaults: Any) -> Database:
    try:
        return await open_database(settings, **defaults)
    except EmbeddedUnavailable as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:
        raise StartupError(describe_failure(settings.mongodb_uri or "", exc)) from exc


def _retryable(exc: BaseException) -> bool:
    """The database did not answer (yet): worth another attempt. A server that answers with a refusal
    (credentials, privileges, an index its data cannot take) will not change its mind."""
    cause = exc.__cause__ if isinstance(exc, DatabaseUnavailable) else exc
    return isinstance(cause, ConnectionFailure | ExecutionTimeout | ConfigurationError)


def _describe(uri: str, exc: BaseException) -> str:
    if isinstance(exc, DatabaseUnavailable) and exc.__cause__ is not None:
        return f"cannot create indexes: {describe_failure(uri, exc.__cause__)}"
    return describe_failure(uri, exc)


async def _reach(database: Database, store: UserStore, uri: str) -> None:
    """One attempt: a ping within :data:`ATTEMPT_TIMEOUT_S`, then the indexes (idempotent).

    A ping that finds no server while ``uri`` asks for TLS of a server that answers in plaintext is
    :class:`TlsMismatch`: a setting to fix, not a database to wait for.
    """
    try:
        with pymongo.timeout(ATTEMPT_TIMEOUT_S):
            await database.db.command("ping")
    except PyMongoError as exc:
        mismatch = await tls_mismatch(uri, database.client, exc)
        if mismatch is not None:
            raise mismatch from exc
        raise
    await store.ensure_indexes()


def _store(settings: Settings, database: Database) -> UserStore:
    return UserStore(database.db, write_concern=database.write_concern, delete_mode=settings.delete_mode)


@contextlib.asynccontextmanager
async def user_store(settings: Settings) -> AsyncIterator[UserStore]:
    """The database (embedded when ``MONGODB_URI`` is unset) with its indexes, reached now or a StartupError."""
    database = await _open(settings)
    try:
        store = _store(settings, database)
        try:
            await _reach(database, store, settings.mongodb_uri or "")
        except Exception as exc:
            raise StartupError(_describe(settings.mongodb_uri or "", exc)) from exc
        yield store
    finally:
        await database.close()


@dataclass
class ServedDatabase:
    """The database of a server: usable at once, reached in the background, watched once reached."""

    store: UserStore
    monitor: DatabaseMonitor
    uri: str
    failure: StartupError | None = None
    _first: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def start(self, database: Database) -> None:
        """Attempt to reach the database; return after the first attempt, raise if it was refused."""
        self._task = asyncio.create_task(self._connect(database), name="database-connect")
        await self._first.wait()
        if self.failure is not None:
            raise self.failure

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.monitor.close()

    async def _connect(self, database: Database) -> None:
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.5, max=10),
            retry=retry_if_exception(_retryable),
            before_sleep=self._retrying,
            reraise=True,
        )
        try:
            await retrying(_reach, database, self.store, self.uri)
        except (PyMongoError, DatabaseUnavailable, IndexConflict, TlsMismatch) as exc:
            self.failure = StartupError(_describe(self.uri, exc))
        else:
            self.monitor.start()
            log.info("database connected", extra=fields(db=self.store.users.database.name))
        finally:
            self._first.set()

    def _retrying(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "database unreachable; retrying",
            extra=fields(attempt=state.attempt_number, retry_in_s=delay, error=_describe(self.uri, exc or Exception())),
        )
        self._first.set()

    async def failed(self) -> StartupError:
        """Wait until the database refuses authsvc on some attempt (never, usually); return that error."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self.failure is None:
            await asyncio.Event().wait()  # reached: nothing more can fail startup
        assert self.failure is not None
        return self.failure


@contextlib.asynccontextmanager
async def served_database(settings: Settings, **defaults: Any) -> AsyncIterator[ServedDatabase]:
    """The database of a server process, without waiting for it (see the module); closed on exit.

    ``defaults``: the process's own client defaults (:func:`service.database.open_database`).
    Raises :class:`StartupError` at once for a malformed URI, an embedded
    server that cannot start, or a refusal on the first attempt.
    """
    database = await _open(settings, **defaults)
    try:
        served = ServedDatabase(_store(settings, database), DatabaseMonitor(database.db), settings.mongodb_uri or "")
        try:
            await served.start(database)
            yield served
        finally:
            await served.close()
    finally:
        await database.close()


async def until_signalled(served: ServedDatabase | None = None) -> None:
    """Return at the first SIGTERM or SIGINT; raise :class:`StartupError` if ``served`` is refused first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits: set[asyncio.Task[object]] = {asyncio.create_task(stop.wait())}
    if served is not None:
        waits.add(asyncio.create_task(served.failed()))
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    for task in done:
        result = task.result()
        if isinstance(result, StartupError):
            raise result
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
