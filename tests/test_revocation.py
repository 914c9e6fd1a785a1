"""Revoked sessions end to end: Clerk's session events through the sidecar, refused by every replica within 1 s.

Real servers only: the sidecar and gRPC replicas in this process, each over
its own MongoDB client; the set's own tests use private databases (one with
test commands, to cut one client's connections; one standalone, without
change streams).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from prometheus_client import REGISTRY

from authsvc_client.v1 import authsvc_pb2 as pb
from service.database import Database, make_client
from service.embedded import EmbeddedMongo
from service.revocations import Revocation, RevokedSessions, revoke
from service.roles import Role
from service.settings import Settings
from service.users import Outcome, UserStore
from tests.conftest import WEBHOOK_SECRET, open_test_database
from tests.grpc_helpers import Harness, reason_of, serve
from tests.issuer import LocalIssuer
from tests.sidecar import Sender, fixture
from tests.test_extauthz import check_request, denial, ok_headers
from tests.test_usercache import eventually
from webhook.main import sidecar

UID = "user_2pQm7sX9aLkT4vB1nR8cYe3Hd0F"  # the fixtures' user
SA, STAFF = "user_sa", "user_staff"
WEEK = timedelta(days=7)


def ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


@contextlib.asynccontextmanager
async def webhook(settings: Settings, store: UserStore) -> AsyncIterator[Sender]:
    async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
        yield Sender(session, f"http://127.0.0.1:{port}{settings.webhook_path}", WEBHOOK_SECRET)


@contextlib.asynccontextmanager
async def own_store(settings: Settings) -> AsyncIterator[UserStore]:
    """A store over its own client: what another process (a replica, the sidecar) would hold."""
    database = await open_test_database(settings)
    try:
        yield UserStore(database.db, write_concern=database.write_concern)
    finally:
        await database.close()


async def outcome(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), reason_of(exc)
    return grpc.StatusCode.OK, ""


REVOKED = (grpc.StatusCode.UNAUTHENTICATED, "SESSION_REVOKED")
OK = (grpc.StatusCode.OK, "")


# --- the sidecar: session.revoked, .ended and .removed into revoked_sessions -------------------
async def test_session_end_events_are_recorded_as_the_contract_says(settings: Settings, store: UserStore) -> None:
    assert await store.get(UID) is None  # a session of a user not in the database is revoked all the same
    async with webhook(settings, store) as sender:
        for kind in ("session.revoked", "session.ended", "session.removed"):
            sid = f"sess_{kind.split('.')[1]}"
            before = datetime.now(UTC) - timedelta(milliseconds=1)
            assert await sender.post(fixture(kind, id=sid), msg_id=f"msg_{sid}") == (200, {"status": "applied"})
            doc = await store.revoked_sessions.find_one({"_id": sid})
            assert doc is not None and set(doc) >= {"_id", "userId", "status", "at", "expireAt"}
            assert (doc["userId"], doc["status"]) == (UID, kind.split(".")[1])
            assert before <= doc["at"] <= datetime.now(UTC)
            assert doc["expireAt"] == doc["at"] + WEEK  # the fixture's expire_at is long past

        # A session that outlives the week keeps its entry until its own expiry.
        far = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        long_lived = fixture("session.revoked", id="sess_long", expire_at=ms(far))
        assert await sender.post(long_lived, msg_id="msg_long") == (200, {"status": "applied"})
        doc = await store.revoked_sessions.find_one({"_id": "sess_long"})
        assert doc is not None and doc["expireAt"] == far

        # Its svix-id again: duplicate; another event for the same session: stale. Nothing changes.
        assert await sender.post(long_lived, msg_id="msg_long") == (200, {"status": "duplicate"})
        assert await sender.post(fixture("session.ended", id="sess_long"), msg_id="msg_other") == (
            200,
            {"status": "stale"},
        )
        assert await store.revoked_sessions.find_one({"_id": "sess_long"}) == doc

        # Not a Clerk session: 400, nothing written.
        for broken in ({"id": None}, {"id": 7}, {"expire_at": "soon"}, {"user_id": None}):
            status, _ = await sender.post(fixture("session.revoked", **{"id": "sess_broken", **broken}))
            assert status == 400, broken
        assert await store.revoked_sessions.count_documents({}) == 4
        # session.created is unchanged: it revokes nothing.
        assert await sender.post(fixture("session.created", id="sess_new")) == (200, {"status": "ignored"})
        assert await store.revoked_sessions.count_documents({"_id": "sess_new"}) == 0

    ttl = [ix for ix in (await store.revoked_sessions.index_information()).values() if "expireAfterSeconds" in ix]
    assert [(ix["key"], ix["expireAfterSeconds"]) for ix in ttl] == [([("expireAt", 1)], 0)]


async def test_a_redelivery_after_a_lost_ledger_entry_applies_and_changes_nothing(store: UserStore) -> None:
    revocation = Revocation(session_id="sess_1", user_id=UID, status="revoked", expire_at=None)
    assert await revoke(store.revoked_sessions, revocation, "msg_1") is Outcome.APPLIED
    doc = await store.revoked_sessions.find_one({"_id": "sess_1"})
    # The effect is there but no ledger entry (a crash between the two): the retry applies, harmlessly.
    assert await revoke(store.revoked_sessions, revocation, "msg_1") is Outcome.APPLIED
    assert await revoke(store.revoked_sessions, revocation, "msg_2") is Outcome.STALE
    assert await store.revoked_sessions.find_one({"_id": "sess_1"}) == doc


# --- every replica, within 1 s, and across restarts ---------------------------------------------
async def verify(h: Harness, token: str) -> pb.VerifyTokenResponse:
    reply: pb.VerifyTokenResponse = await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token), timeout=10)
    return reply


async def check(h: Harness, token: str) -> Any:
    stub = external_auth_pb2_grpc.AuthorizationStub(h.channel)
    return await stub.Check(check_request({"authorization": f"Bearer {token}"}), timeout=10)


async def set_role(h: Harness, token: str) -> pb.User:
    request = pb.SetRoleRequest(external_id=STAFF, role=pb.ROLE_ADMIN)
    reply: pb.User = await h.stub.SetRole(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    return reply


async def test_a_revoked_session_is_refused_by_every_replica_within_a_second(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    async with (
        own_store(settings) as one,
        own_store(settings) as two,
        serve(settings, one, issuer, ext_authz=True) as a,
        serve(settings, two, issuer, ext_authz=True) as b,
        webhook(settings, store) as sender,
    ):
        await a.seed(SA, Role.SUPERADMIN)
        await a.seed(STAFF)
        token, other = a.token(SA, session_id="sess_gone"), a.token(SA, session_id="sess_kept")
        replicas = (a, b)
        for h in replicas:  # verified, cached and memoized on both
            assert (await verify(h, token)).session_id == "sess_gone"
            assert ok_headers(await check(h, token))["x-authsvc-session-id"] == "sess_gone"

        assert await sender.post(fixture("session.revoked", id="sess_gone", user_id=SA)) == (200, {"status": "applied"})

        async def refused_everywhere() -> bool:
            return all([await outcome(verify(h, token)) == REVOKED for h in replicas])

        assert await eventually(refused_everywhere) < 1.0
        for h in replicas:
            assert denial(await check(h, token)) == (code_pb2.UNAUTHENTICATED, 401, "SESSION_REVOKED")
            assert await outcome(verify(h, h.token(SA, session_id="sess_gone"))) == REVOKED  # a new token of it
            assert await outcome(set_role(h, token)) == REVOKED
            assert await outcome(verify(h, other)) == OK  # the sid counts, not the user
        user = await store.get(STAFF)
        assert user is not None and user.role is Role.STAFF


async def test_a_restart_keeps_the_revocation(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    async with own_store(settings) as before, serve(settings, before, issuer) as h:
        await h.seed(STAFF)
        token = h.token(STAFF, session_id="sess_gone")
        assert await outcome(verify(h, token)) == OK
        async with webhook(settings, store) as sender:
            revoked = fixture("session.revoked", id="sess_gone", user_id=STAFF)
            assert await sender.post(revoked) == (200, {"status": "applied"})
    async with own_store(settings) as after, serve(settings, after, issuer, ext_authz=True) as h:
        assert await outcome(verify(h, token)) == REVOKED  # from the very first call
        assert denial(await check(h, token)) == (code_pb2.UNAUTHENTICATED, 401, "SESSION_REVOKED")


# --- the in-process set ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def private_mongo(directory: Path, **server: bool) -> AsyncIterator[EmbeddedMongo]:
    """A database of this test's own; ``server`` options go into its config file (written before it starts)."""
    directory.mkdir(parents=True)
    (directory / "secantusd.toml").write_text(
        "[server]\n" + "".join(f"{key} = {str(value).lower()}\n" for key, value in server.items())
    )
    mongo = EmbeddedMongo(directory)
    await mongo.start()
    try:
        yield mongo
    finally:
        mongo.kill()  # its files are thrown away: a clean shutdown would only cost seconds


@contextlib.asynccontextmanager
async def store_at(uri: str, **client: Any) -> AsyncIterator[UserStore]:
    database = await open_test_database(Settings(mongodb_uri=uri, mongodb_db="sessions"))
    if client:  # a client of its own, named, so that a failpoint can single it out
        await database.client.close()
        named = make_client(uri, **client)
        database = Database(client=named, db=named["sessions"], write_concern=database.write_concern)
    store = UserStore(database.db, write_concern=database.write_concern)
    await store.ensure_indexes()
    try:
        yield store
    finally:
        await database.close()


def revocation(sid: str) -> Revocation:
    return Revocation(session_id=sid, user_id=UID, status="revoked", expire_at=None)


async def holds(revoked: RevokedSessions, sid: str) -> bool:
    return sid in revoked


async def test_while_its_stream_is_down_the_set_keeps_what_it_has_then_reloads(tmp_path: Path) -> None:
    async with (
        private_mongo(tmp_path / "mongo", enable_test_commands=True) as mongo,
        store_at(mongo.uri) as sidecar_store,
        store_at(mongo.uri, appname="revoked-follower") as replica_store,
    ):
        revoked = RevokedSessions(replica_store.revoked_sessions, retry_s=0.1)
        await revoked.start()
        try:
            assert revoked.loaded and revoked.live
            await revoke(sidecar_store.revoked_sessions, revocation("sess_before"), "msg_1")
            await eventually(lambda: holds(revoked, "sess_before"))

            # Cut the replica's connections on every read (a partition of that one process).
            admin = sidecar_store.users.database.client.admin
            cut = {"failCommands": ["aggregate", "getMore", "find"], "closeConnection": True}
            await admin.command(
                "configureFailPoint", "failCommand", mode="alwaysOn", data={**cut, "appName": "revoked-follower"}
            )
            try:

                async def down() -> bool:
                    return not revoked.live

                await eventually(down)
                await revoke(sidecar_store.revoked_sessions, revocation("sess_during"), "msg_2")
                await asyncio.sleep(0.3)
                assert "sess_during" not in revoked  # it cannot know yet...
                assert revoked.loaded and "sess_before" in revoked  # ...but forgets nothing
            finally:
                await admin.command("configureFailPoint", "failCommand", mode="off")
            # Back: the stream reopens and the set is reloaded, so the revocation made meanwhile arrives.
            assert await eventually(lambda: holds(revoked, "sess_during")) < 1.0
            assert revoked.live
        finally:
            await revoked.close()


async def test_entries_leave_the_set_when_they_expire(store: UserStore) -> None:
    now = datetime.now(UTC)
    await store.revoked_sessions.insert_many(
        [
            {"_id": "sess_expired", "expireAt": now - timedelta(seconds=1)},  # the TTL monitor has not run yet
            {"_id": "sess_soon", "expireAt": now + timedelta(seconds=0.5)},
            {"_id": "sess_week", "expireAt": now + WEEK},
        ]
    )
    revoked = RevokedSessions(store.revoked_sessions, sweep_s=0.05)
    await revoked.start()
    try:
        assert ("sess_expired" in revoked, "sess_soon" in revoked, "sess_week" in revoked) == (False, True, True)
        assert len(revoked) == 2

        async def swept() -> bool:
            return len(revoked) == 1

        await eventually(swept)
        assert "sess_soon" not in revoked and "sess_week" in revoked
        assert REGISTRY.get_sample_value("authsvc_revoked_sessions") == 1
        await revoke(store.revoked_sessions, revocation("sess_new"), "msg_new")  # through the stream
        await eventually(lambda: holds(revoked, "sess_new"))
        assert len(revoked) == 2 and REGISTRY.get_sample_value("authsvc_revoked_sessions") == 2
    finally:
        await revoked.close()


async def test_without_change_streams_the_set_is_polled(tmp_path: Path) -> None:
    async with private_mongo(tmp_path / "mongo", standalone=True) as mongo, store_at(mongo.uri) as store:
        revoked = RevokedSessions(store.revoked_sessions)
        await revoked.start()
        try:
            assert revoked.loaded and not revoked.live
            await revoke(store.revoked_sessions, revocation("sess_1"), "msg_1")
            assert await eventually(lambda: holds(revoked, "sess_1")) < 1.0
        finally:
            await revoked.close()


async def test_a_revocation_answered_200_survives_a_sigkill(settings: Settings, tmp_path: Path) -> None:
    async with private_mongo(tmp_path / "mongo") as mongo, store_at(mongo.uri) as store:
        async with webhook(settings.model_copy(update=dict(mongodb_uri=mongo.uri)), store) as sender:
            assert await sender.post(fixture("session.revoked", id="sess_k")) == (200, {"status": "applied"})
        mongo.kill()
        await mongo.start()
        assert await store.revoked_sessions.count_documents({"_id": "sess_k"}) == 1
