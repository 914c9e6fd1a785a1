"""The webhook sidecar end to end: signed Clerk events over HTTP into a real database."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from authsvc.dev.events import signed_headers
from authsvc.dev.procs import child_env, free_port, run
from service.database import Database
from service.embedded import EmbeddedMongo
from service.settings import Settings
from service.users import UserStore
from tests.conftest import WEBHOOK_SECRET, open_test_database
from tests.sidecar import Sender, fixture, start_sidecar
from tests.test_metrics import grew, samples
from webhook.events import parse_event, profile_from_event
from webhook.main import sidecar

UID = "user_2pQm7sX9aLkT4vB1nR8cYe3Hd0F"
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-long!").decode()


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def at_ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)


async def serve(settings: Settings, store: UserStore) -> AsyncIterator[Sender]:
    async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
        yield Sender(session, f"http://127.0.0.1:{port}{settings.webhook_path}", WEBHOOK_SECRET)


@pytest.fixture
async def sender(settings: Settings, store: UserStore) -> AsyncIterator[Sender]:
    async for s in serve(settings, store):
        yield s


async def user_doc(store: UserStore, uid: str = UID) -> dict[str, object] | None:
    return await store.users.find_one({"externalId": uid}, {"_id": 0})


# --- the happy path, field by field ----------------------------------------------------------
async def test_created_updated_deleted_field_by_field(sender: Sender, store: UserStore) -> None:
    created = fixture("user.created")
    assert await sender.post(created) == (200, {"status": "applied"})
    doc = await user_doc(store)
    assert doc is not None
    assert doc["name"] == "Ada Lovelace"
    assert doc["email"] == "ada@analytical.example"  # the primary, not the first address
    assert doc["role"] == "admin"
    assert doc["isActive"] is True
    assert doc["clerkUpdatedAt"] == at_ms(created["data"]["updated_at"])
    assert doc["createdAt"] == doc["updatedAt"]
    assert "deletedAt" not in doc and "lastLoginAt" not in doc

    updated = fixture("user.updated")
    assert await sender.post(updated) == (200, {"status": "applied"})
    doc2 = await user_doc(store)
    assert doc2 is not None
    assert doc2["name"] == "Augusta Lovelace"
    assert doc2["role"] == "superadmin"
    assert doc2["clerkUpdatedAt"] == at_ms(updated["data"]["updated_at"])
    assert doc2["createdAt"] == doc["createdAt"]
    assert doc2["updatedAt"] >= doc["updatedAt"]  # type: ignore[operator]

    assert await sender.post(fixture("user.deleted")) == (200, {"status": "applied"})
    doc3 = await user_doc(store)
    assert doc3 is not None
    assert doc3["isActive"] is False
    assert isinstance(doc3["deletedAt"], datetime)
    assert doc3["name"] == "Augusta Lovelace"  # soft mode keeps the profile
    assert await store.users.count_documents({}) == 1


async def test_name_falls_back_to_username_then_user(sender: Sender, store: UserStore) -> None:
    await sender.post(fixture("user.created", id="user_a", first_name=None, last_name="  ", username="ada"))
    await sender.post(
        fixture(
            "user.created",
            id="user_b",
            first_name=None,
            last_name=None,
            username=None,
            email_addresses=[],
            primary_email_address_id=None,
        )
    )
    a, b = await user_doc(store, "user_a"), await user_doc(store, "user_b")
    assert a is not None and a["name"] == "ada"
    assert b is not None and b["name"] == "User" and b["email"] is None


async def test_banned_or_locked_user_is_inactive(sender: Sender, store: UserStore) -> None:
    await sender.post(fixture("user.created", id="user_banned", banned=True))
    await sender.post(fixture("user.created", id="user_locked", locked=True))
    for uid in ("user_banned", "user_locked"):
        doc = await user_doc(store, uid)
        assert doc is not None and doc["isActive"] is False


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"role": "superadmin"}, "superadmin"),
        ({"role": "admin"}, "admin"),
        ({"role": "staff"}, "staff"),
        ({}, "staff"),
        (None, "staff"),
        ({"role": "owner"}, "staff"),
        ({"role": 3}, "staff"),
    ],
)
async def test_role_from_public_metadata(sender: Sender, store: UserStore, metadata: object, expected: str) -> None:
    assert (await sender.post(fixture("user.created", public_metadata=metadata)))[0] == 200
    doc = await user_doc(store)
    assert doc is not None and doc["role"] == expected


# --- at-least-once, unordered -------------------------------------------------------------------
async def test_same_svix_id_twice_applies_once(sender: Sender, store: UserStore) -> None:
    event = fixture("user.created")
    assert await sender.post(event, msg_id="msg_dup") == (200, {"status": "applied"})
    first = await user_doc(store)
    assert await sender.post(event, msg_id="msg_dup") == (200, {"status": "duplicate"})
    assert await user_doc(store) == first  # not even updatedAt moved
    assert await store.events.count_documents({"_id": "msg_dup"}) == 1


async def test_older_update_after_newer_keeps_newer(sender: Sender, store: UserStore) -> None:
    base = fixture("user.updated")["data"]["updated_at"]
    newer = fixture("user.updated", first_name="Newer", updated_at=base + 1000)
    older = fixture("user.updated", first_name="Older", updated_at=base)
    assert await sender.post(newer) == (200, {"status": "applied"})
    assert await sender.post(older) == (200, {"status": "stale"})
    doc = await user_doc(store)
    assert doc is not None and doc["name"] == "Newer Lovelace"
    assert doc["clerkUpdatedAt"] == at_ms(base + 1000)


async def test_late_update_never_resurrects_deleted_user(sender: Sender, store: UserStore) -> None:
    await sender.post(fixture("user.created"))
    await sender.post(fixture("user.deleted"))
    late = fixture("user.updated", updated_at=ms(datetime.now(UTC)) + 10_000)
    assert await sender.post(late) == (200, {"status": "stale"})
    assert await sender.post(fixture("user.deleted")) == (200, {"status": "stale"})
    doc = await user_doc(store)
    assert doc is not None and doc["isActive"] is False and doc["name"] == "Ada Lovelace"


async def test_hard_delete_erases_name_and_email(settings: Settings, database: Database) -> None:
    hard = settings.model_copy(update=dict(delete_mode="hard"))
    store = UserStore(database.db, write_concern=database.write_concern, delete_mode="hard")
    await store.ensure_indexes()
    async for sender in serve(hard, store):
        await sender.post(fixture("user.created"))
        assert await sender.post(fixture("user.deleted")) == (200, {"status": "applied"})
        assert await sender.post(fixture("user.updated", updated_at=ms(datetime.now(UTC)))) == (
            200,
            {"status": "stale"},
        )
    doc = await user_doc(store)
    assert doc is not None
    assert "name" not in doc and "email" not in doc
    assert doc["isActive"] is False and isinstance(doc["deletedAt"], datetime)
    assert await store.get(UID) is None


async def test_delete_before_create_makes_late_create_stale(sender: Sender, store: UserStore) -> None:
    assert await sender.post(fixture("user.deleted")) == (200, {"status": "applied"})
    assert await sender.post(fixture("user.created")) == (200, {"status": "stale"})
    assert await sender.post(fixture("user.updated")) == (200, {"status": "stale"})
    doc = await user_doc(store)
    assert doc is not None and doc["isActive"] is False and "name" not in doc
    assert await store.users.count_documents({"isActive": True}) == 0


async def test_session_created_moves_last_login_forward_only(sender: Sender, store: UserStore) -> None:
    await sender.post(fixture("user.created"))
    login = fixture("session.created")
    t = login["data"]["created_at"]
    assert await sender.post(login) == (200, {"status": "applied"})
    assert await sender.post(fixture("session.created", created_at=t - 60_000)) == (200, {"status": "stale"})
    doc = await user_doc(store)
    assert doc is not None and doc["lastLoginAt"] == at_ms(t)
    assert await sender.post(fixture("session.created", created_at=t + 60_000)) == (200, {"status": "applied"})
    doc = await user_doc(store)
    assert doc is not None and doc["lastLoginAt"] == at_ms(t + 60_000)


async def test_session_for_unknown_user_is_ignored(sender: Sender, store: UserStore) -> None:
    assert await sender.post(fixture("session.created", user_id="user_nobody")) == (200, {"status": "ignored"})
    assert await store.users.count_documents({}) == 0


async def test_other_event_types_are_ignored(sender: Sender, store: UserStore) -> None:
    assert await sender.post(fixture("organizationMembership.created")) == (200, {"status": "ignored"})
    assert await store.users.count_documents({}) == 0


# --- every 4xx row of the contract changes nothing -------------------------------------------
async def assert_untouched(store: UserStore) -> None:
    assert await store.users.count_documents({}) == 0
    assert await store.events.count_documents({}) == 0


async def test_missing_headers_is_401(sender: Sender, store: UserStore) -> None:
    status, body = await sender.post(fixture("user.created"), headers={"content-type": "application/json"})
    assert status == 401 and "missing" in body["error"]
    await assert_untouched(store)


async def test_wrong_signature_is_401(sender: Sender, store: UserStore) -> None:
    event = json.dumps(fixture("user.created"))
    headers = signed_headers(WEBHOOK_SECRET, event)
    headers["svix-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    assert (await sender.post(event, headers=headers))[0] == 401
    headers["svix-signature"] = "garbage-without-comma"
    assert (await sender.post(event, headers=headers))[0] == 401
    tampered = signed_headers(WEBHOOK_SECRET, event)
    assert (await sender.post(event.replace("Ada", "Eve"), headers=tampered))[0] == 401
    await assert_untouched(store)


async def test_rotation_accepts_any_listed_secret_and_refuses_retired_ones(
    settings: Settings, store: UserStore
) -> None:
    rotating = settings.model_copy(update=dict(webhook_secrets=(OTHER_SECRET, WEBHOOK_SECRET)))
    async for sender in serve(rotating, store):
        assert (await sender.post(fixture("user.created", id="user_old_secret")))[0] == 200
        assert (await sender.post(fixture("user.created", id="user_new_secret"), secret=OTHER_SECRET))[0] == 200
    finished = settings.model_copy(update=dict(webhook_secrets=(OTHER_SECRET,)))
    async for sender in serve(finished, store):
        status, _ = await sender.post(fixture("user.created", id="user_retired"))  # signed with the retired one
        assert status == 401
    assert await user_doc(store, "user_retired") is None


async def test_timestamp_ten_minutes_old_is_401(sender: Sender, store: UserStore) -> None:
    old = datetime.now(UTC) - timedelta(minutes=10)
    status, body = await sender.post(fixture("user.created"), at=old)
    assert status == 401 and "timestamp" in body["error"]
    future = datetime.now(UTC) + timedelta(minutes=10)
    assert (await sender.post(fixture("user.created"), at=future))[0] == 401
    await assert_untouched(store)


async def test_body_over_one_mebibyte_is_413(sender: Sender, store: UserStore) -> None:
    event = fixture("user.created", padding="x" * (1024 * 1024))
    status, _ = await sender.post(event)
    assert status == 413
    await assert_untouched(store)


async def test_chunked_body_over_one_mebibyte_is_413(sender: Sender, store: UserStore) -> None:
    body = json.dumps(fixture("user.created", padding="x" * (1024 * 1024))).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies while reading
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    headers = signed_headers(WEBHOOK_SECRET, body.decode())
    async with sender.session.post(sender.url, data=chunks(), headers=headers) as response:
        assert response.status == 413
        assert "1 MiB" in (await response.json())["error"]
    await assert_untouched(store)


@pytest.mark.parametrize(
    "body",
    [
        "not json at all",
        "[1, 2, 3]",
        json.dumps({"type": "user.created"}),
        json.dumps({"type": "user.created", "data": {"first_name": "no id"}}),
        json.dumps({"type": "user.created", "data": {"id": 42}}),
        json.dumps({"type": "user.updated", "data": {"id": "user_x", "updated_at": "yesterday"}}),
        json.dumps({"type": "user.created", "data": {"id": "user_x", "updated_at": 1, "email_addresses": "a@b"}}),
        json.dumps({"type": "user.deleted", "data": {"deleted": True}}),
        json.dumps({"type": "session.created", "data": {"id": "sess_1"}}),
        json.dumps({"data": {"id": "user_x"}}),
    ],
    ids=[
        "garbage",
        "array",
        "no-data",
        "no-id",
        "id-not-string",
        "bad-updated-at",
        "bad-emails",
        "delete-no-id",
        "session-no-user",
        "no-type",
    ],
)
async def test_signed_but_invalid_event_is_400(sender: Sender, store: UserStore, body: str) -> None:
    status, payload = await sender.post(body)
    assert status == 400
    assert payload["error"]
    await assert_untouched(store)


async def test_retry_after_a_crash_between_effect_and_ledger_applies_once(sender: Sender, store: UserStore) -> None:
    event = fixture("user.created")
    # The effect of msg_crash landed, then the process died before its ledger entry.
    await store.upsert_from_clerk(profile_from_event(parse_event(json.dumps(event).encode())), "msg_crash")
    before = await user_doc(store)
    assert await store.events.count_documents({}) == 0
    assert await sender.post(event, msg_id="msg_crash") == (200, {"status": "applied"})
    assert await user_doc(store) == before  # not written twice
    assert await store.events.count_documents({"_id": "msg_crash"}) == 1
    assert await sender.post(event, msg_id="msg_crash") == (200, {"status": "duplicate"})


async def test_event_without_data_id_from_fixture_is_400(sender: Sender, store: UserStore) -> None:
    event = fixture("user.created")
    del event["data"]["id"]
    status, payload = await sender.post(event)
    assert status == 400 and "data.id" in payload["error"]
    await assert_untouched(store)


async def test_health_and_readiness(settings: Settings, store: UserStore) -> None:
    async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
        async with session.get(f"http://127.0.0.1:{port}/readyz") as r:
            assert r.status == 200
        async with session.get(f"http://127.0.0.1:{port}{settings.webhook_path}") as r:
            assert r.status == 405


# --- outages: nothing is ever lost ---------------------------------------------------------------
@dataclass
class Outage:
    """A private database the test may stop or kill, and a store over it."""

    mongo: EmbeddedMongo
    settings: Settings
    store: UserStore


@pytest.fixture
async def outage(settings: Settings, tmp_path: Path) -> AsyncIterator[Outage]:
    mongo = EmbeddedMongo(tmp_path / "private-mongo")
    await mongo.start()
    # Writes give up on a dead database after 2 s here, not authsvc's 10 s (meant to ride out an election):
    # options in the URI win.
    settings = settings.model_copy(update=dict(mongodb_uri=f"{mongo.uri}&serverSelectionTimeoutMS=2000"))
    database = await open_test_database(settings)
    store = UserStore(database.db, write_concern=database.write_concern)
    await store.ensure_indexes()
    yield Outage(mongo, settings, store)
    await database.close()
    mongo.stop()


async def test_database_outage_answers_503_then_retry_applies(outage: Outage) -> None:
    store = outage.store
    async for sender in serve(outage.settings, store):
        assert (await sender.post(fixture("user.created", id="user_before")))[0] == 200
        outage.mongo.stop()
        during = fixture("user.created", id="user_during")
        before = samples()
        status, _ = await asyncio.wait_for(sender.post(during, msg_id="msg_during"), timeout=15)
        assert status == 503
        # Counted as the database's failure, not as a rejected delivery (a 4xx: a wrong secret, a bad body).
        after = samples()
        counted = "authsvc_webhook_deliveries_total"
        assert grew(before, after, counted, type="user.created", outcome="unavailable") == 1
        assert grew(before, after, counted, outcome="rejected") == 0
        async with sender.session.get(sender.url.rsplit("/", 1)[0] + "/readyz") as r:
            assert r.status == 503
        await outage.mongo.start()
        assert await sender.post(during, msg_id="msg_during") == (200, {"status": "applied"})
    assert await user_doc(store, "user_before") is not None
    assert await user_doc(store, "user_during") is not None
    assert await store.events.count_documents({"_id": "msg_during"}) == 1


async def test_sigkill_right_after_200_keeps_the_write(outage: Outage) -> None:
    store = outage.store
    ids = [f"user_k{i}" for i in range(5)]
    async for sender in serve(outage.settings, store):
        for uid in ids:
            assert (await sender.post(fixture("user.created", id=uid), msg_id=f"msg_{uid}"))[0] == 200
    outage.mongo.kill()
    await outage.mongo.start()
    for uid in ids:
        doc = await user_doc(store, uid)
        assert doc is not None and doc["isActive"] is True, uid
    # The ledger entry is not durable (every effect is guarded): one lost in the kill only
    # makes the redelivery re-check. Either way the retry answers 200 and changes nothing.
    before = {uid: await user_doc(store, uid) for uid in ids}
    async for sender in serve(outage.settings, store):
        for uid in ids:
            status, body = await sender.post(fixture("user.created", id=uid), msg_id=f"msg_{uid}")
            assert status == 200 and body["status"] in ("duplicate", "applied"), body
    for uid in ids:
        assert await user_doc(store, uid) == before[uid]
        assert await store.events.count_documents({"_id": f"msg_{uid}"}) == 1


# --- as production runs it: separate processes ----------------------------------------------------
async def test_concurrent_duplicate_to_two_sidecar_processes_applies_once(
    settings: Settings, store: UserStore, tmp_path: Path
) -> None:
    env = child_env(
        MONGODB_URI=settings.mongodb_uri or "", MONGODB_DB=settings.mongodb_db, CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET
    )
    ports = [free_port(), free_port()]
    sidecars = []
    try:
        for port in ports:
            sidecars.append(await start_sidecar(env, tmp_path / f"sidecar{port}.log", port))
        async with aiohttp.ClientSession() as session:
            senders = [Sender(session, f"http://127.0.0.1:{p}/clerk-users-webhook", WEBHOOK_SECRET) for p in ports]
            for round_no in range(5):
                event = fixture("user.updated", first_name=f"Round{round_no}", updated_at=1764063500000 + round_no)
                msg_id = f"msg_race_{round_no}"
                results = await asyncio.gather(*(s.post(event, msg_id=msg_id) for s in senders))
                statuses = sorted(body["status"] for _, body in results)
                assert statuses == ["applied", "duplicate"], statuses
                assert await store.events.count_documents({"_id": msg_id}) == 1
        doc = await user_doc(store)
        assert doc is not None and doc["name"] == "Round4 Lovelace"
        assert await store.users.count_documents({}) == 1
    finally:
        for s in sidecars:
            s.stop()
    logs = [s.output() for s in sidecars]
    lines = [json.loads(line) for log in logs for line in log.splitlines() if line.startswith("{")]
    deliveries = [line for line in lines if line.get("event") == "webhook delivery"]
    assert len(deliveries) == 10
    for line in deliveries:
        assert {"svix_id", "type", "externalId", "outcome", "duration_ms"} <= line.keys()
    text = "\n".join(logs)
    assert WEBHOOK_SECRET not in text and WEBHOOK_SECRET.removeprefix("whsec_") not in text
    assert "Lovelace" not in text  # never the body


async def test_restart_on_embedded_database_keeps_data(tmp_path: Path) -> None:
    env = child_env(AUTHSVC_DATA_DIR=str(tmp_path / "data"), CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET)
    port = free_port()
    url = f"http://127.0.0.1:{port}/clerk-users-webhook"
    first = await start_sidecar(env, tmp_path / "first.log", port)
    try:
        async with aiohttp.ClientSession() as session:
            sender = Sender(session, url, WEBHOOK_SECRET)
            assert await sender.post(fixture("user.created"), msg_id="msg_persist") == (200, {"status": "applied"})
    finally:
        assert first.stop() == 0

    second = await start_sidecar(env, tmp_path / "second.log", port)
    try:
        async with aiohttp.ClientSession() as session:
            sender = Sender(session, url, WEBHOOK_SECRET)
            assert await sender.post(fixture("user.created"), msg_id="msg_persist") == (200, {"status": "duplicate"})
            assert await sender.post(fixture("session.created")) == (200, {"status": "applied"})
    finally:
        second.stop()
    assert (tmp_path / "data" / "mongo" / "db").is_dir()


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (None, "CLERK_WEBHOOK_SECRET is required"),
        ("not-a-secret", "must start with 'whsec_'"),
        ("whsec_!!!notbase64", "not valid base64"),
    ],
)
async def test_webhook_refuses_to_start_without_a_valid_secret(
    tmp_path: Path, secret: str | None, message: str
) -> None:
    env = child_env(AUTHSVC_DATA_DIR=str(tmp_path))
    if secret is not None:
        env["CLERK_WEBHOOK_SECRET"] = secret
    code, _, err = await run(sys.executable, "-m", "webhook", env=env, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in lines[0]
