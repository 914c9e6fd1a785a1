"""The user cache against a real database: served from memory, dropped by the change stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo import AsyncMongoClient, monitoring

from service.database import Database, Document, durable_write_concern, make_client
from service.dbmonitor import DatabaseMonitor
from service.roles import Role
from service.settings import Settings
from service.usercache import UserCache
from service.users import UserStore
from tests.grpc_helpers import seed


class FindCounter(monitoring.CommandListener):
    """Counts the `find` commands a client sends (real driver events, nothing patched)."""

    def __init__(self) -> None:
        self.finds = 0

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find":
            self.finds += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> float:
    """Poll ``check`` until true; return how long it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def open_store(
    uri: str, db: str, listener: FindCounter | None = None
) -> tuple[UserStore, AsyncMongoClient[Document]]:
    client = make_client(uri, event_listeners=[listener] if listener else [])
    store = UserStore(client[db], write_concern=await durable_write_concern(client))
    await store.ensure_indexes()
    return store, client


@contextlib.asynccontextmanager
async def following(store: UserStore, **options: Any) -> AsyncIterator[UserCache]:
    """A cache over ``store`` with its own database monitor, following the change stream."""
    monitor = DatabaseMonitor(store.users.database)
    monitor.start()
    cache = UserCache(store, monitor, **options)
    await cache.start()
    try:
        await eventually(lambda: is_live(cache))
        yield cache
    finally:
        await cache.close()
        await monitor.close()


async def is_live(cache: UserCache) -> bool:
    return cache.live


@dataclass
class Live:
    """A cache following the change stream, over its own client whose `find` commands are counted."""

    cache: UserCache
    finds: FindCounter


@pytest.fixture
async def live(settings: Settings, database: Database) -> AsyncIterator[Live]:
    assert settings.mongodb_uri
    finds = FindCounter()
    store, client = await open_store(settings.mongodb_uri, settings.mongodb_db, finds)
    async with following(store) as cache:
        yield Live(cache, finds)
    await client.close()


async def test_repeated_reads_are_served_from_memory(live: Live, store: UserStore) -> None:
    await seed(store, "user_1", Role.ADMIN)
    before = live.finds.finds
    for _ in range(50):
        user = await live.cache.get("user_1")
        assert user is not None and user.role is Role.ADMIN
    # One read, or two if the seed's own change event landed after the first read and dropped it.
    assert live.finds.finds - before <= 2


async def test_a_write_from_elsewhere_is_seen_within_moments(live: Live, store: UserStore) -> None:
    cache = live.cache
    await seed(store, "user_1", Role.ADMIN)
    first = await cache.get("user_1")
    assert first is not None and first.role is Role.ADMIN
    assert await cache.get("user_new") is None  # unknown users are cached too...
    await seed(store, "user_1", Role.STAFF)  # another client, as the sidecar would
    await seed(store, "user_new", Role.ADMIN)  # ...and a create drops the "unknown"

    async def demoted() -> bool:
        user = await cache.get("user_1")
        return user is not None and user.role is Role.STAFF

    async def created() -> bool:
        return await cache.get("user_new") is not None

    assert await eventually(demoted) < 2.0
    assert await eventually(created) < 2.0
    await store.delete("user_new")

    async def inactive() -> bool:
        user = await cache.get("user_new")
        return user is not None and not user.is_active

    assert await eventually(inactive) < 2.0


async def test_tombstones_only_when_asked(store: UserStore) -> None:
    await store.delete("user_ghost")
    async with following(store) as cache:
        assert await cache.get("user_ghost") is None
        ghost = await cache.get("user_ghost", include_tombstones=True)
        assert ghost is not None and ghost.erased and not ghost.is_active
