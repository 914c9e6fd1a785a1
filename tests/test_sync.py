"""authsvc sync against a real database and the fake Clerk Backend API on loopback."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from authsvc.dev.procs import child_env, run
from service.clerkapi import ClerkBackend
from service.embedded import EmbeddedMongo
from service.roles import Role
from service.settings import Settings
from service.sync import reconcile, run_sync
from service.users import MIRRORED_CHUNK, UserProfile, UserStore
from tests.commands import watched_store
from tests.fakeclerk import SECRET, FakeClerk, mirror

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))


@pytest.fixture
async def client(fake_clerk: FakeClerk) -> AsyncIterator[ClerkBackend]:
    """The real client, with retries short enough for tests."""
    backend = ClerkBackend(fake_clerk.url, SECRET, attempts=3, backoff_s=0.01, max_backoff_s=0.05)
    yield backend
    await backend.close()


def sync_settings(settings: Settings, fake_clerk: FakeClerk) -> Settings:
    return settings.model_copy(update={"clerk_api_url": fake_clerk.url, "clerk_secret_key": SECRET})


async def dump(store: UserStore) -> dict[str, list[dict[str, Any]]]:
    """Every document of every collection authsvc writes, in a stable order."""
    out = {}
    for name in ("users", "role_changes", "webhook_events", "leases"):
        out[name] = [doc async for doc in store.users.database[name].find({}).sort("_id", 1)]
    return out


def expected(user: dict[str, Any]) -> dict[str, Any]:
    """The mirrored fields of a Clerk user object, spelled out from the design (not via profile_of)."""
    full = f"{(user['first_name'] or '').strip()} {(user['last_name'] or '').strip()}".strip()
    emails = {e["id"]: e["email_address"] for e in user["email_addresses"]}
    role = (user["public_metadata"] or {}).get("role")
    return {
        "name": full or user["username"] or "User",
        "email": emails.get(user["primary_email_address_id"], user["email_addresses"][0]["email_address"]),
        "role": role if role in ("superadmin", "admin", "staff") else "staff",
        "isActive": not (user["banned"] or user["locked"]),
        "clerkUpdatedAt": datetime.fromtimestamp(user["updated_at"] / 1000, tz=UTC),
    }


def mirrored(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc.get(k) for k in ("name", "email", "role", "isActive", "clerkUpdatedAt")}


async def test_backfill_mirrors_every_user_field_by_field_and_a_rerun_writes_nothing(
    fake_clerk: FakeClerk, client: ClerkBackend, store: UserStore
) -> None:
    users = fake_clerk.add_users(2_000)
    created_before = REGISTRY.get_sample_value("authsvc_sync_users_total", {"outcome": "created"}) or 0.0
    first = await reconcile(client, store)
    assert REGISTRY.get_sample_value("authsvc_sync_users_total", {"outcome": "created"}) == created_before + 2000
    assert first.line() == "listed 2000, created 2000, updated 0, unchanged 0, stale 0, pruned 0"
    stored = {doc["externalId"]: doc async for doc in store.users.find({})}
    assert len(stored) == len(users)
    for user in users:
        assert mirrored(stored[user["id"]]) == expected(user), user["id"]
    # Pages were asked oldest first, 500 at a time, and the count once.
    pages = fake_clerk.requests("/v1/users")
    assert [p.query["offset"] for p in pages] == ["0", "500", "1000", "1500", "2000"]
    assert {(p.query["limit"], p.query["order_by"]) for p in pages} == {("500", "+created_at")}
    assert len(fake_clerk.requests("/v1/users/count")) == 1

    before = await dump(store)
    again = await reconcile(client, store)
    assert again.line() == "listed 2000, created 0, updated 0, unchanged 2000, stale 0, pruned 0"
    assert await dump(store) == before  # not one write: updatedAt unchanged everywhere


async def test_clerk_newer_applies_mongodb_newer_and_tombstones_stay(
    fake_clerk: FakeClerk, client: ClerkBackend, store: UserStore
) -> None:
    fake_clerk.add_user("user_clerk_newer", role="staff")
    fake_clerk.add_user("user_mongo_newer", first_name="Old")
    fake_clerk.add_user("user_deleted")
    await reconcile(client, store)
    fake_clerk.update_user("user_clerk_newer", role="admin", first_name="Grace")
    # A webhook got there first with a newer state than the one Clerk will list.
    newer = UserProfile("user_mongo_newer", "Newest", None, Role.STAFF, True, datetime.now(UTC) + timedelta(days=1))
    await store.upsert_from_clerk(newer, "msg_1")
    await store.delete("user_deleted")

    summary = await reconcile(client, store)
    assert summary.line() == "listed 3, created 0, updated 1, unchanged 0, stale 2, pruned 0"
    grace = await store.get("user_clerk_newer")
    assert grace is not None and (grace.name, grace.role) == ("Grace Lovelace", Role.ADMIN)
    kept = await store.get("user_mongo_newer")
    assert kept is not None and kept.name == "Newest"
    gone = await store.get("user_deleted")
    assert gone is not None and not gone.is_active and gone.deleted_at is not None
    audits = [(a["from"], a["to"], a["by"], a["via"]) async for a in store.role_changes.find({})]
    assert audits == [("staff", "admin", "clerk", "sync")]


async def test_dry_run_leaves_the_database_byte_identical_and_predicts_the_summary(
    fake_clerk: FakeClerk, client: ClerkBackend, store: UserStore
) -> None:
    fake_clerk.add_users(40)
    await reconcile(client, store, page_size=7)
    for i in range(0, 40, 4):
        fake_clerk.update_user(f"user_{i:05d}", role="superadmin")
    fake_clerk.add_users(5, prefix="user_new_")
    fake_clerk.delete_user("user_00003")
    await store.delete("user_00005")
    before = await dump(store)

    dry = await reconcile(client, store, dry_run=True, prune=True, page_size=7)
    assert await dump(store) == before
    real = await reconcile(client, store, prune=True, page_size=7)
    assert dry.line() == real.line() == "listed 44, created 5, updated 10, unchanged 28, stale 1, pruned 1"


async def test_prune_deletes_exactly_the_users_gone_from_clerk(
    fake_clerk: FakeClerk, client: ClerkBackend, store: UserStore, settings: Settings
) -> None:
    fake_clerk.add_users(12)
    await reconcile(client, store, page_size=5)
    await store.delete("user_00001")  # already deleted: a tombstone is not pruned again
    fake_clerk.delete_user("user_00001")
    fake_clerk.delete_user("user_00002")  # gone from Clerk: pruned
    fake_clerk.delete_user("user_00011")  # gone from Clerk: pruned

    async def meanwhile(offset: int) -> None:
        if offset == 5:
            # A webhook creates a user while the sync runs; Clerk's listing will not show it.
            late = UserProfile("user_late", "Late", None, Role.STAFF, True, datetime.now(UTC))
            await store.upsert_from_clerk(late, "msg_late")
            # A deletion in Clerk shifts the later pages back by one: user_00007 moves from offset 5 to 4,
            # which was already served, so the listing misses it. Clerk still has it: it is not pruned.
            # (user_00000 was listed on the first page: its own user.deleted webhook will delete it.)
            fake_clerk.delete_user("user_00000")

    fake_clerk.on_list = meanwhile
    summary = await reconcile(client, store, prune=True, page_size=5)
    fake_clerk.on_list = None

    assert (summary.listed, summary.pruned) == (8, 2)
    deleted = {doc["externalId"] async for doc in store.users.find({"deletedAt": {"$exists": True}})}
    assert deleted == {"user_00001", "user_00002", "user_00011"}
    # Asked about each candidate before pruning it: the two gone (404) and the one the listing missed.
    assert len(fake_clerk.requests("/v1/users/{id}")) == 3
    late = await store.get("user_late")
    assert late is not None and late.is_active
    missed = await store.get("user_00007")
    assert missed is not None and missed.is_active
    # Soft delete, exactly as user.deleted: the profile stays, inactive.
    pruned = await store.get("user_00002")
    assert pruned is not None and pruned.name and not pruned.is_active


async def test_hard_delete_mode_prunes_to_a_tombstone(
    fake_clerk: FakeClerk, client: ClerkBackend, settings: Settings, store: UserStore
) -> None:
    fake_clerk.add_users(3)
    await reconcile(client, store)
    fake_clerk.delete_user("user_00001")
    hard = UserStore(store.users.database, write_concern=store.users.write_concern, delete_mode="hard")
    assert (await reconcile(client, hard, prune=True)).pruned == 1
    assert await store.get("user_00001") is None  # erased: only a tombstone remains
    assert await store.get("user_00001", include_tombstones=True) is not None


async def test_a_listing_that_fails_halfway_prunes_nothing_and_exits_1(
    fake_clerk: FakeClerk, client: ClerkBackend, store: UserStore, settings: Settings
) -> None:
    await store.users.insert_many([mirror(user) for user in fake_clerk.add_users(1_000)])  # synced before
    fake_clerk.delete_user("user_00000")  # gone from Clerk: --prune would delete it after a complete listing
    fake_clerk.update_user("user_00001", first_name="Changed")
    fake_clerk.fail_from_offset = 500  # the second page of 500 keeps failing
    out, err = io.StringIO(), io.StringIO()
    code = await run_sync(sync_settings(settings, fake_clerk), prune=True, out=out, err=err, clerk=client)
    assert code == 1
    assert err.getvalue() == (
        "authsvc sync: stopped at offset 500 (listed 500 of 999): "
        "Clerk is unavailable for list_users (HTTP 503); nothing pruned\n"
    )
    assert out.getvalue().strip().splitlines()[-1] == (
        "listed 500, created 0, updated 1, unchanged 499, stale 0, pruned 0"
    )
    kept = await store.get("user_00000")
    assert kept is not None and kept.deleted_at is None  # not pruned
    changed = await store.get("user_00001")
    assert changed is not None and changed.name == "Changed Last1"  # the page before the failure was applied


@pytest.mark.parametrize("retry_after", ["1", None])
async def test_a_429_waits_its_retry_after_then_retries(
    fake_clerk: FakeClerk, client: ClerkBackend, store: UserStore, retry_after: str | None
) -> None:
    fake_clerk.add_users(3)
    fake_clerk.retry_after = retry_after  # None: absent, and the client waits 1 s
    fake_clerk.answer_next = [429]
    summary = await reconcile(client, store)
    assert summary.created == 3
    first, second = fake_clerk.requests("/v1/users/count")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0  # the fake saw the wait


async def test_429s_beyond_the_bound_are_clerk_unavailable(
    fake_clerk: FakeClerk, store: UserStore, settings: Settings
) -> None:
    fake_clerk.add_users(3)
    fake_clerk.retry_after = "0"
    fake_clerk.answer_next = [429] * 5
    backend = ClerkBackend(fake_clerk.url, SECRET, rate_limit_attempts=3)
    out, err = io.StringIO(), io.StringIO()
    try:
        code = await run_sync(sync_settings(settings, fake_clerk), out=out, err=err, clerk=backend)
    finally:
        await backend.close()
    assert code == 1
    assert err.getvalue() == "authsvc sync: stopped before listing: Clerk kept rate-limiting count_users (HTTP 429)\n"
    assert len(fake_clerk.requests("/v1/users/count")) == 3


# --- the command, as an operator runs it ---------------------------------------------------
async def run_cli(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str, str]:
    return await run(AUTHSVC, "sync", *args, env=env, cwd=cwd, timeout_s=120)


def cli_env(settings: Settings, mongo: EmbeddedMongo, **extra: str) -> dict[str, str]:
    return child_env(MONGODB_URI=mongo.uri, MONGODB_DB=settings.mongodb_db, **extra)


async def test_missing_key_exits_2_with_one_line(settings: Settings, mongo: EmbeddedMongo, tmp_path: Path) -> None:
    code, out, err = await run_cli(cli_env(settings, mongo), tmp_path)
    assert (code, out) == (2, "")
    assert err == "authsvc: CLERK_SECRET_KEY is required by authsvc sync (sk_live_... or sk_test_...)\n"


async def test_refused_key_exits_2_with_one_line(
    fake_clerk: FakeClerk, settings: Settings, mongo: EmbeddedMongo, tmp_path: Path
) -> None:
    fake_clerk.add_users(3)
    env = cli_env(settings, mongo, CLERK_API_URL=fake_clerk.url, CLERK_SECRET_KEY="sk_test_wrong")
    code, out, err = await run_cli(env, tmp_path)
    assert (code, out) == (2, "")
    assert err == "authsvc: Clerk refused CLERK_SECRET_KEY (HTTP 401)\n"


async def test_the_command_prints_json_progress_then_the_summary(
    fake_clerk: FakeClerk, settings: Settings, store: UserStore, mongo: EmbeddedMongo, tmp_path: Path
) -> None:
    fake_clerk.add_users(600)
    env = cli_env(settings, mongo, CLERK_API_URL=fake_clerk.url, CLERK_SECRET_KEY=SECRET)
    code, out, err = await run_cli(env, tmp_path, "--dry-run")
    assert code == 0, err
    assert await store.users.count_documents({}) == 0
    lines = out.strip().splitlines()
    assert lines[-1] == "listed 600, created 600, updated 0, unchanged 0, stale 0, pruned 0"
    progress = [json.loads(line) for line in lines[:-1]]
    assert [p["listed"] for p in progress] == [500, 600]
    assert {p["event"] for p in progress} == {"sync progress"} and progress[-1]["total"] == 600

    code, out, err = await run_cli(env, tmp_path)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "listed 600, created 600, updated 0, unchanged 0, stale 0, pruned 0"
    assert await store.users.count_documents({}) == 600


async def test_sync_help_lists_its_options_and_settings(tmp_path: Path) -> None:
    code, out, _ = await run(AUTHSVC, "sync", "--help", env=child_env(), cwd=tmp_path)
    assert code == 0
    assert "--dry-run" in out and "--prune" in out and "CLERK_SECRET_KEY" in out and "AUTHSVC_DELETE_MODE" in out


async def test_one_weird_user_never_fails_a_page(
    fake_clerk: FakeClerk, client: ClerkBackend, settings: Settings, store: UserStore
) -> None:
    """Issue 13, defect 8: deep or huge values in fields authsvc never reads sync; in a read field, ``invalid``."""
    users = fake_clerk.add_users(6)
    fake_clerk.set_raw(users[1]["id"], "unsafe_metadata", "[" * 4000 + "]" * 4000)
    fake_clerk.set_raw(users[2]["id"], "unsafe_metadata", '{"a":' * 1600 + "{}" + "}" * 1600)
    fake_clerk.set_raw(users[3]["id"], "private_metadata", '{"n": ' + "9" * 5000 + "}")
    fake_clerk.set_raw(users[4]["id"], "first_name", "[" * 3000 + "]" * 3000)  # a field authsvc reads
    out, err = io.StringIO(), io.StringIO()
    code = await run_sync(sync_settings(settings, fake_clerk), out=out, err=err, clerk=client)
    assert (code, err.getvalue()) == (0, "")
    assert out.getvalue().splitlines()[-1] == (
        "listed 5, created 5, updated 0, unchanged 0, stale 0, pruned 0, invalid 1"
    )
    stored = {doc["externalId"] async for doc in store.users.find({})}
    assert stored == {u["id"] for u in users} - {users[4]["id"]}
    # Just-in-time and periodic repair read users through the same client.
    assert (await client.get_user(users[1]["id"]))["id"] == users[1]["id"]


# --- the page write: one read, one unordered bulk write, decided per user ---------------------------
async def test_each_page_is_one_read_and_one_bulk_write_and_role_changes_are_audited_in_bulk(
    fake_clerk: FakeClerk, client: ClerkBackend, settings: Settings, mongo: EmbeddedMongo
) -> None:
    users = fake_clerk.add_users(1_000)
    async with watched_store(mongo, settings.mongodb_db) as (store, commands):
        assert (await reconcile(client, store)).created == 1_000
        # Two pages: each one read (split into queries of MIRRORED_CHUNK ids) and one insert of 500.
        assert commands.count("insert", "users") == 2 and commands.count("update", "users") == 0
        assert commands.count("find", "users") == 2 * (500 // MIRRORED_CHUNK)

        roles = {u["id"]: expected(u)["role"] for u in users}
        promoted = [u["id"] for u in users[0:1_000:50]]  # 20 users over both pages
        for user_id in promoted:
            fake_clerk.update_user(user_id, role="superadmin" if roles[user_id] != "superadmin" else "staff")
        for user in users[10:1_000:100]:
            fake_clerk.update_user(user["id"], first_name="Renamed")
        commands.sent.clear()
        summary = await reconcile(client, store)
        assert summary.line() == "listed 1000, created 0, updated 30, unchanged 970, stale 0, pruned 0"
        # One update command and one audit insert per page, whatever the number of users in it.
        assert commands.count("update", "users") == 2 and commands.count("insert", "users") == 0
        assert commands.count("insert", "role_changes") == 2
        audits = {(a["externalId"], a["from"], a["to"], a["by"], a["via"]) async for a in store.role_changes.find({})}
        assert audits == {
            (uid, roles[uid], "superadmin" if roles[uid] != "superadmin" else "staff", "clerk", "sync")
            for uid in promoted
        }


async def test_a_user_changed_between_the_page_read_and_its_write_is_decided_per_user(store: UserStore) -> None:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)

    def clerk(uid: str, *, at: datetime = t0, role: Role = Role.STAFF, name: str = "Sync") -> UserProfile:
        return UserProfile(uid, name, f"{uid}@example.com", role, True, at)

    hour = timedelta(hours=1)
    for uid in ("user_role_set", "user_newer", "user_deleted", "user_plain", "user_same"):
        await store.upsert_from_clerk(clerk(uid))
    page = [
        clerk("user_created_older", at=t0 + hour),  # a webhook creates it (older, admin) after the read
        clerk("user_created_newer", at=t0 + hour),  # a webhook creates it newer after the read
        clerk("user_tombstone", at=t0 + hour),  # a user.deleted arrives first, after the read
        clerk("user_role_set", at=t0 + hour, role=Role.ADMIN),  # SetRole makes it superadmin after the read
        clerk("user_newer", at=t0 + hour, role=Role.ADMIN),  # a newer webhook after the read
        clerk("user_deleted", at=t0 + hour),  # deleted after the read
        clerk("user_plain", at=t0 + hour, role=Role.ADMIN),  # nothing happens meanwhile
        clerk("user_new", at=t0 + hour),  # nothing happens meanwhile
        clerk("user_same"),  # mirrored already
    ]
    read = await store.mirrored([p.external_id for p in page])
    # Meanwhile, other writers:
    await store.upsert_from_clerk(clerk("user_created_older", role=Role.ADMIN, name="Webhook"), "msg_1")
    await store.upsert_from_clerk(clerk("user_created_newer", at=t0 + 2 * hour, name="Webhook"), "msg_2")
    await store.delete("user_tombstone")
    await store.set_role("user_role_set", Role.SUPERADMIN, expected=Role.STAFF, by="user_admin")
    await store.upsert_from_clerk(clerk("user_newer", at=t0 + 2 * hour, name="Webhook"), "msg_3")
    await store.delete("user_deleted")
    await store.role_changes.delete_many({})

    outcomes = await store.upsert_page_from_clerk(page, read, via="sync")
    assert [o.value for o in outcomes] == [
        "updated", "stale", "stale", "updated", "stale", "stale", "updated", "created", "unchanged"
    ]  # fmt: skip
    names = {doc["externalId"]: doc.get("name") async for doc in store.users.find({})}
    assert names["user_created_older"] == "Sync" and names["user_created_newer"] == "Webhook"
    assert names["user_newer"] == "Webhook" and names["user_tombstone"] is None
    assert (await store.get("user_deleted", include_tombstones=True)).deleted_at is not None  # type: ignore[union-attr]
    role_set = await store.get("user_role_set")
    assert role_set is not None and role_set.role is Role.ADMIN
    # Each audit names the role the write really replaced, not the one the page read.
    audits = {(a["externalId"], a["from"], a["to"], a["via"]) async for a in store.role_changes.find({})}
    assert audits == {
        ("user_created_older", "admin", "staff", "sync"),
        ("user_role_set", "superadmin", "admin", "sync"),
        ("user_plain", "staff", "admin", "sync"),
    }
