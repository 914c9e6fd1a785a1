"""The user cache against a real database: served from memory, dropped by the change stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pymongo import monitoring

from service.database import durable_write_concern, make_client
from service.embedded import EmbeddedMongo
from service.errors import DatabaseUnavailable
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


async def open_store(uri: str, db: str, listener: FindCounter | None = None) -> tuple[UserStore, object]:
    client = make_client(uri, event_listeners=[listener] if listener else [])
    store = UserStore(client[db], write_concern=await durable_write_concern(client))
    await store.ensure_indexes()
    return store, client


@pytest.fixture
async def counted(settings: Settings) -> AsyncIterator[tuple[UserStore, FindCounter]]:
    assert settings.mongodb_uri
    listener = FindCounter()
    store, client = await open_store(settings.mongodb_uri, settings.mongodb_db, listener)
    yield store, listener
    await client.drop_database(settings.mongodb_db)  # type: ignore[attr-defined]
    await client.close()  # type: ignore[attr-defined]


async def test_repeated_reads_are_served_from_memory(counted: tuple[UserStore, FindCounter]) -> None:
    store, listener = counted
    await seed(store, "user_1", Role.ADMIN)
    cache = UserCache(store)
    await cache.start()
    try:
        await eventually(lambda: asyncio.sleep(0, cache.live))
        before = listener.finds
        for _ in range(50):
            user = await cache.get("user_1")
            assert user is not None and user.role is Role.ADMIN
        assert listener.finds - before == 1
    finally:
        await cache.close()


async def test_a_write_from_elsewhere_is_seen_within_moments(
    counted: tuple[UserStore, FindCounter], store: UserStore
) -> None:
    cached_store, _ = counted
    await seed(store, "user_1", Role.ADMIN)
    cache = UserCache(cached_store)
    await cache.start()
    try:
        await eventually(lambda: asyncio.sleep(0, cache.live))
        assert (await cache.get("user_1")).role is Role.ADMIN  # type: ignore[union-attr]
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
    finally:
        await cache.close()


async def test_tombstones_only_when_asked(store: UserStore) -> None:
    await store.delete("user_ghost")
    cache = UserCache(store)
    await cache.start()
    try:
        assert await cache.get("user_ghost") is None
        ghost = await cache.get("user_ghost", include_tombstones=True)
        assert ghost is not None and ghost.erased and not ghost.is_active
    finally:
        await cache.close()


async def test_database_outage_is_never_answered_from_memory(tmp_path: Path) -> None:
    mongo = EmbeddedMongo(tmp_path / "mongo")
    await mongo.start()
    store, client = await open_store(mongo.uri, "cache")
    cache = UserCache(store, retry_s=0.2)
    await cache.start()
    try:
        await seed(store, "user_1")
        await eventually(lambda: asyncio.sleep(0, cache.live))
        assert await cache.get("user_1") is not None
        mongo.stop()
        await eventually(lambda: asyncio.sleep(0, not cache.live), timeout_s=15)
        with pytest.raises(DatabaseUnavailable):
            await cache.get("user_1")
        await mongo.start()
        await eventually(lambda: asyncio.sleep(0, cache.live), timeout_s=15)
        assert await cache.get("user_1") is not None
    finally:
        await cache.close()
        await client.close()  # type: ignore[attr-defined]
        mongo.stop()
