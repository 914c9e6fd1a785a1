"""The user store against a real database: each delivery rule as one atomic operation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from service.embedded import EmbeddedMongo
from service.roles import Role
from service.settings import Settings
from service.users import Outcome, UserProfile, UserStore
from tests.commands import watched_store

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def profile(
    uid: str = "user_1", *, at: datetime = T0, name: str = "Ada Lovelace", role: Role = Role.STAFF, active: bool = True
) -> UserProfile:
    return UserProfile(
        external_id=uid, name=name, email=f"{uid}@example.com", role=role, is_active=active, clerk_updated_at=at
    )


async def test_upsert_creates_then_updates(store: UserStore) -> None:
    assert await store.upsert_from_clerk(profile()) is Outcome.CREATED
    first = await store.get("user_1")
    assert first is not None and first.name == "Ada Lovelace" and first.role is Role.STAFF
    assert (
        await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=1), name="Augusta", role=Role.ADMIN))
        is Outcome.UPDATED
    )
    second = await store.get("user_1")
    assert second is not None and second.name == "Augusta" and second.role is Role.ADMIN
    assert second.created_at == first.created_at
    assert await store.users.count_documents({}) == 1


async def test_older_update_never_overwrites_newer(store: UserStore) -> None:
    await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=5), name="New"))
    assert await store.upsert_from_clerk(profile(at=T0, name="Old")) is Outcome.STALE
    user = await store.get("user_1")
    assert user is not None and user.name == "New"


async def test_equal_updated_at_applies_again(store: UserStore) -> None:
    await store.upsert_from_clerk(profile(name="Same"))
    assert await store.upsert_from_clerk(profile(name="Other")) is Outcome.UPDATED
    user = await store.get("user_1")
    assert user is not None and user.name == "Other"


async def test_a_user_already_mirrored_is_unchanged_and_not_written(store: UserStore) -> None:
    await store.upsert_from_clerk(profile(name="Same"))
    before = await store.users.find_one({"externalId": "user_1"})
    assert await store.upsert_from_clerk(profile(name="Same"), via="sync") is Outcome.UNCHANGED
    assert await store.users.find_one({"externalId": "user_1"}) == before  # updatedAt too: no write


async def test_same_fields_with_a_newer_clerk_time_are_written(store: UserStore) -> None:
    # Clerk changed something authsvc does not mirror: clerkUpdatedAt still moves, so a late older event is stale.
    await store.upsert_from_clerk(profile())
    assert await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=1))) is Outcome.UPDATED
    assert await store.upsert_from_clerk(profile(name="Late", at=T0 + timedelta(milliseconds=500))) is Outcome.STALE


async def test_concurrent_creates_of_one_user_leave_one_document(store: UserStore) -> None:
    results = await asyncio.gather(
        *[store.upsert_from_clerk(profile(at=T0 + timedelta(milliseconds=ms))) for ms in range(20)]
    )
    assert all(r in (Outcome.CREATED, Outcome.UPDATED, Outcome.STALE) for r in results)
    assert await store.users.count_documents({"externalId": "user_1"}) == 1
    user = await store.users.find_one({"externalId": "user_1"})
    assert user is not None and user["clerkUpdatedAt"] == T0 + timedelta(milliseconds=19)


async def test_delete_is_terminal(store: UserStore) -> None:
    await store.upsert_from_clerk(profile())
    assert await store.delete("user_1") is Outcome.APPLIED
    assert await store.delete("user_1") is Outcome.STALE
    assert await store.upsert_from_clerk(profile(at=T0 + timedelta(days=1))) is Outcome.STALE
    user = await store.get("user_1")
    assert user is not None and not user.is_active and user.deleted_at is not None


async def test_delete_before_create_leaves_tombstone(store: UserStore) -> None:
    assert await store.delete("user_9") is Outcome.APPLIED
    assert await store.get("user_9") is None
    assert await store.upsert_from_clerk(profile("user_9")) is Outcome.STALE
    doc = await store.users.find_one({"externalId": "user_9"})
    assert doc is not None and doc["isActive"] is False and "name" not in doc


async def test_login_moves_only_forward_and_ignores_unknown(store: UserStore) -> None:
    await store.upsert_from_clerk(profile())
    assert await store.record_login("user_1", T0 + timedelta(hours=2)) is Outcome.APPLIED
    assert await store.record_login("user_1", T0 + timedelta(hours=1)) is Outcome.STALE
    user = await store.get("user_1")
    assert user is not None and user.last_login_at == T0 + timedelta(hours=2)
    assert await store.record_login("user_unknown", T0) is Outcome.IGNORED
    assert await store.users.count_documents({"externalId": "user_unknown"}) == 0


async def test_ledger_records_once(store: UserStore) -> None:
    assert await store.record_delivery("msg_1", "user.created", "user_1", Outcome.APPLIED)
    assert not await store.record_delivery("msg_1", "user.created", "user_1", Outcome.APPLIED)
    assert await store.events.count_documents({"_id": "msg_1"}) == 1


async def test_ledger_entries_of_concurrent_deliveries_are_written_together_each_told_its_own_fate(
    mongo: EmbeddedMongo, settings: Settings
) -> None:
    async with watched_store(mongo, settings.mongodb_db) as (store, commands):
        # 60 deliveries at once, two of each svix-id: exactly one of each pair is recorded.
        ids = [f"msg_{i % 30}" for i in range(60)]
        recorded = await asyncio.gather(
            *(store.record_delivery(i, "user.updated", "user_1", Outcome.APPLIED) for i in ids)
        )
        assert sorted(i for i, first in zip(ids, recorded, strict=True) if first) == sorted(set(ids))
        assert await store.events.count_documents({}) == 30
        # Entries that arrive while a write is under way wait for it and go in the next one, together.
        assert 1 <= commands.count("insert", "webhook_events") <= 3
        # Later, alone: recorded, then a duplicate.
        assert await store.record_delivery("msg_late", "user.updated", "user_1", Outcome.STALE)
        assert not await store.record_delivery("msg_late", "user.updated", "user_1", Outcome.STALE)


async def test_redelivery_of_the_latest_event_changes_nothing(store: UserStore) -> None:
    assert await store.upsert_from_clerk(profile(name="First"), "msg_a") is Outcome.CREATED
    before = await store.users.find_one({"externalId": "user_1"})
    # The same delivery again (a retry after a lost ledger write) writes nothing...
    assert await store.upsert_from_clerk(profile(name="First"), "msg_a") is Outcome.APPLIED
    assert await store.users.find_one({"externalId": "user_1"}) == before
    # ...while another delivery with the same updated_at applies again, as the design says.
    assert await store.upsert_from_clerk(profile(name="Second"), "msg_b") is Outcome.UPDATED
    doc = await store.users.find_one({"externalId": "user_1"})
    assert doc is not None and doc["name"] == "Second" and doc["lastSvixId"] == "msg_b"
    # An older event is stale, whatever its id.
    assert await store.upsert_from_clerk(profile(at=T0 - timedelta(seconds=1)), "msg_c") is Outcome.STALE


async def test_role_change_from_clerk_is_audited(store: UserStore) -> None:
    await store.upsert_from_clerk(profile(role=Role.STAFF))
    await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=1), role=Role.ADMIN))
    await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=1), role=Role.ADMIN))
    await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=2), role=Role.SUPERADMIN), via="sync")
    await store.upsert_from_clerk(profile(at=T0 + timedelta(seconds=3), role=Role.STAFF), via="jit")
    audits = [doc async for doc in store.role_changes.find({"externalId": "user_1"}).sort("at", 1)]
    assert [(a["from"], a["to"], a["via"]) for a in audits] == [
        ("staff", "admin", "webhook"),
        ("admin", "superadmin", "sync"),
        ("superadmin", "staff", "jit"),
    ]
