"""Periodic repair in the sidecar: the reconcile on an interval, one replica at a time under a MongoDB lease."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from service.clerkapi import ClerkBackend
from service.repair import LEASE_ID, Repairer
from service.settings import Settings
from service.users import UserStore
from tests.fakeclerk import SECRET, FakeClerk, mirror
from webhook.main import sidecar

LIST = "/v1/users"


@pytest.fixture
async def client(fake_clerk: FakeClerk) -> AsyncIterator[ClerkBackend]:
    backend = ClerkBackend(fake_clerk.url, SECRET, attempts=2, backoff_s=0.01)
    yield backend
    await backend.close()


async def wait_for(predicate: object, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_two_sidecars_with_the_interval_set_never_list_at_the_same_time(
    settings: Settings, store: UserStore, fake_clerk: FakeClerk
) -> None:
    users = fake_clerk.add_users(1_010)  # three pages of 500: a run spans several requests
    # Already mirrored (one bulk insert, not 1,010 durable writes): the runs compare and write nothing.
    await store.users.insert_many([mirror(user) for user in users])
    fake_clerk.update_user("user_00007", first_name="Changed")
    fake_clerk.delay_s = 0.05
    repairing = settings.model_copy(
        update={"clerk_api_url": fake_clerk.url, "clerk_secret_key": SECRET, "sync_interval_s": 0.2}
    )
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            await stack.enter_async_context(sidecar(repairing, store))
        # Until three runs have listed their last page.
        await wait_for(lambda: sum(s.query["offset"] == "1000" for s in fake_clerk.requests(LIST)) >= 3)
    offsets = [s.query["offset"] for s in sorted(fake_clerk.requests(LIST), key=lambda s: s.at)]
    runs = [offsets[i : i + 3] for i in range(0, len(offsets), 3)]
    # Each run lists its pages in order with no other run's page in between.
    assert all(run == ["0", "500", "1000"][: len(run)] for run in runs), offsets
    changed = await store.get("user_00007")
    assert changed is not None and changed.name == "Changed Last7"


async def test_a_sidecar_without_the_interval_never_asks_clerk(
    settings: Settings, store: UserStore, fake_clerk: FakeClerk
) -> None:
    fake_clerk.add_users(3)
    quiet = settings.model_copy(update={"clerk_api_url": fake_clerk.url, "clerk_secret_key": SECRET})
    async with sidecar(quiet, store):
        await asyncio.sleep(0.3)
    assert fake_clerk.seen == []


async def test_a_replica_that_dies_mid_run_loses_the_lease_by_expiry(
    store: UserStore, fake_clerk: FakeClerk, client: ClerkBackend
) -> None:
    fake_clerk.add_users(3)
    dying = Repairer(store, client, 60.0, ttl_s=0.5, holder="replica-a")
    survivor = Repairer(store, client, 60.0, ttl_s=0.5, holder="replica-b")
    fake_clerk.hang = True
    run = asyncio.create_task(dying.run_once())
    lease = None
    async with asyncio.timeout(10):
        while lease is None:
            lease = await store.leases.find_one({"_id": LEASE_ID, "holder": "replica-a"})
            await asyncio.sleep(0.02)
    run.cancel()  # the process died: it neither finishes nor releases the lease
    with contextlib.suppress(asyncio.CancelledError):
        await run
    fake_clerk.release()

    assert not await survivor.run_once()  # held, not yet expired
    await wait_for(lambda: datetime.now(UTC) > lease["expiresAt"] + timedelta(milliseconds=50))
    assert await survivor.run_once()
    held = await store.leases.find_one({"_id": LEASE_ID})
    assert held is not None and held["holder"] == "replica-b"
    assert await store.users.count_documents({}) == 3


async def test_after_a_run_the_lease_is_kept_until_the_next_run_is_due(
    store: UserStore, fake_clerk: FakeClerk, client: ClerkBackend
) -> None:
    fake_clerk.add_users(2)
    first = Repairer(store, client, 30.0, holder="replica-a")
    second = Repairer(store, client, 30.0, holder="replica-b")
    assert await first.run_once()
    assert not await second.run_once()  # the next run is due in 30 s: the replicas share one schedule
    assert len(fake_clerk.requests("/v1/users/count")) == 1


async def test_a_failing_clerk_ends_the_run_not_the_schedule(
    store: UserStore, fake_clerk: FakeClerk, client: ClerkBackend
) -> None:
    fake_clerk.add_users(2)
    fake_clerk.fail = True
    repairer = Repairer(store, client, 0.05, holder="replica-a")
    await repairer.start()
    try:
        await wait_for(lambda: len(fake_clerk.requests("/v1/users/count")) >= 4)  # two runs, two attempts each
        fake_clerk.fail = False
        async with asyncio.timeout(30):
            while await store.users.count_documents({}) < 2:
                await asyncio.sleep(0.02)
    finally:
        await repairer.close()


async def test_a_replica_stopped_mid_run_releases_the_lease_at_once(
    store: UserStore, fake_clerk: FakeClerk, client: ClerkBackend
) -> None:
    fake_clerk.add_users(2)
    fake_clerk.hang = True
    stopping = Repairer(store, client, 60.0, holder="replica-a")
    await stopping.start()
    try:
        async with asyncio.timeout(10):
            while await store.leases.find_one({"_id": LEASE_ID, "holder": "replica-a"}) is None:
                await asyncio.sleep(0.02)
    finally:
        await stopping.close()  # SIGTERM while Clerk hangs
        fake_clerk.release()
    assert await Repairer(store, client, 60.0, holder="replica-b").run_once()
