"""Availability: serving through database outages and failovers, starting without the database, URI options.

One private embedded database for the module, with test commands on
(fail points scoped to the ``appName`` of the client under test, so nothing
else is touched). authsvc reaches it through a :class:`tests.tcpproxy.TcpProxy`
the test controls: a silent partition (nothing relayed) or a crash
(connections refused). A second client, straight to the database, plays
"another replica" writing meanwhile. Intervals are the production ones; only
``AUTHSVC_STALE_S`` is short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from authsvc.dev.procs import ServerProcess, child_env, free_port, health_check, run
from authsvc_client import AuthsvcClient
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from bench.availability import deliver_updates, fail_point, run_until, simulate_election, verify_load
from service.database import DURABLE, GRPC_DEFAULTS, client_options, make_client, open_database
from service.embedded import EmbeddedMongo
from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests.conftest import WEBHOOK_SECRET
from tests.fakeclerk import SECRET, FakeClerk
from tests.grpc_helpers import FRONTEND, Harness, reason_of, seed, serve
from tests.issuer import LocalIssuer
from tests.tcpproxy import TcpProxy, tcp_proxy
from webhook.main import sidecar

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
APP = "authsvc-under-test"  # the appName of authsvc's client: fail points are scoped to it


@pytest.fixture(scope="module")
def failpoint_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMongo]:
    server = EmbeddedMongo(tmp_path_factory.mktemp("failpoints"), flags=("--enable-test-commands",))
    asyncio.run(server.start())
    yield server
    server.stop()


@pytest.fixture
async def admin(failpoint_mongo: EmbeddedMongo) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    """A client straight to the database, not under any fail point: "another replica"."""
    client = make_client(failpoint_mongo.uri, appname="test-admin")
    yield client
    await fail_point(client, "off")
    await client.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; return how long it took (a liveness bound, not a benchmark)."""
    started = time.monotonic()
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s} s"
        await asyncio.sleep(0.02)


async def health(h: Harness) -> int:
    reply = await health_check(h.channel)(health_pb2.HealthCheckRequest(service="authsvc.v1.AuthService"), timeout=2)
    return int(reply.status)


async def is_health(h: Harness, status: int) -> bool:
    return await health(h) == status


async def verify(h: Harness, token: str) -> authsvc_pb2.VerifyTokenResponse:
    return await h.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=token), timeout=5)


async def in_cache(h: Harness, token: str, external_id: str) -> authsvc_pb2.VerifyTokenResponse:
    """VerifyToken until its user is held in the cache: a read that overlapped the seed's own
    invalidation (still on its way through the change stream) is answered but not kept."""
    started = time.monotonic()
    while True:
        reply = await verify(h, token)
        if h.service.users.holds(external_id):
            return reply
        assert time.monotonic() - started < 5, f"{external_id} never cached"
        await asyncio.sleep(0.05)


async def refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), reason_of(info.value)


@dataclass
class Outage:
    """authsvc over a proxied database; ``direct`` writes past the proxy."""

    h: Harness
    proxy: TcpProxy
    direct: UserStore


@contextlib.asynccontextmanager
async def behind_proxy(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer, **changes: Any
) -> AsyncIterator[Outage]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    settings = Settings(grpc_addr="127.0.0.1:0", **changes)
    async with tcp_proxy("127.0.0.1", failpoint_mongo.port) as proxy:
        client = make_client(f"mongodb://{proxy.address}/?directConnection=true&appName={APP}")
        store = UserStore(client[name], write_concern=DURABLE)
        await store.ensure_indexes()
        try:
            async with serve(settings, store, issuer, health_interval_s=0.1) as h:
                await eventually(lambda: h.service.users.live, 5, "the change stream")
                yield Outage(h, proxy, UserStore(admin[name], write_concern=DURABLE))
        finally:
            await proxy.heal()
            await client.close()
            await admin.drop_database(name)


def sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


# --- serving through an outage ----------------------------------------------------------------------------
async def test_a_silent_partition_is_answered_from_the_cache_until_the_bound(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer
) -> None:
    stale_s = 3.0
    async with behind_proxy(failpoint_mongo, admin, issuer, stale_s=stale_s) as o:
        h = o.h
        await h.seed("user_cached", Role.ADMIN)
        await h.seed("user_uncached")
        cached, uncached = h.token("user_cached"), h.token("user_uncached")
        assert (await in_cache(h, cached, "user_cached")).user.role == authsvc_pb2.ROLE_ADMIN
        await h.stub.GetUser(authsvc_pb2.GetUserRequest(external_id="user_cached"))

        o.proxy.partition()  # connections accepted, nothing answers
        cut = time.monotonic()
        while h.service.monitor.up:  # answered all along, until noticed (and after)
            assert (await verify(h, cached)).subject == "user_cached"
            assert time.monotonic() - cut < 4.0, "a silent partition must be noticed within 4 s"
            await asyncio.sleep(0.05)
        assert sample("authsvc_database_up") == 0

        started = time.monotonic()
        assert await refusal(verify(h, uncached)) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        assert time.monotonic() - started < 0.5, "an uncached user is refused at once, not after a timeout"
        user = await h.stub.GetUser(authsvc_pb2.GetUserRequest(external_id="user_cached"), timeout=2)
        assert user.role == authsvc_pb2.ROLE_ADMIN
        assert await health(h) == SERVING  # within the bound: every replica sees this outage
        h.service.users._update_gauge()
        assert (sample("authsvc_user_cache_stale_seconds") or 0) > 0

        while True:  # past the bound (counted from the last confirmation, at most 0.5 s before the cut)
            try:
                await verify(h, cached)
            except grpc.aio.AioRpcError as err:
                assert (err.code(), reason_of(err)) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                break
            assert time.monotonic() - cut < stale_s + 2.0, "still answering past AUTHSVC_STALE_S"
            await asyncio.sleep(0.05)
        assert time.monotonic() - cut > stale_s - 0.6
        await eventually(lambda: is_health(h, NOT_SERVING), 2, "NOT_SERVING past the bound")


async def test_a_ban_applied_while_unreachable_is_seen_within_1s_of_reaching_the_database(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer
) -> None:
    async with behind_proxy(failpoint_mongo, admin, issuer, stale_s=30.0) as o:
        h = o.h
        await h.seed("user_banned")
        token = h.token("user_banned")
        await in_cache(h, token, "user_banned")

        await o.proxy.refuse()  # the database crashed, as this process sees it
        noticed = await eventually(lambda: not h.service.monitor.up, 2.0, "a refused connection noticed")
        assert noticed < 2.0
        await seed(o.direct, "user_banned", active=False)  # another replica applies a ban meanwhile
        assert (await verify(h, token)).subject == "user_banned"  # the trade-off: not seen while unreachable

        await o.proxy.heal()
        healed = time.monotonic()
        while True:
            try:
                await verify(h, token)
            except grpc.aio.AioRpcError as err:
                assert (err.code(), reason_of(err)) == (grpc.StatusCode.PERMISSION_DENIED, "USER_INACTIVE")
                break
            await asyncio.sleep(0.02)
        seen = time.monotonic() - healed
        print(f"\nban seen {seen:.2f} s after the database was reachable again")
        assert seen < 1.0, "a ban applied during the outage must show within 1 s"
        # The stream resumed from its token and dropped the entry: once answers come from memory again, still banned.
        await eventually(lambda: h.service.users.live, 5, "the stream resumed")
        assert await refusal(verify(h, token)) == (grpc.StatusCode.PERMISSION_DENIED, "USER_INACTIVE")


async def test_stale_s_0_fails_closed_within_2s_of_a_refused_connection(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer
) -> None:
    async with behind_proxy(failpoint_mongo, admin, issuer, stale_s=0.0) as o:
        await o.h.seed("user_1")
        token = o.h.token("user_1")
        await verify(o.h, token)
        await o.proxy.refuse()
        cut = time.monotonic()
        while True:
            try:
                await verify(o.h, token)
            except grpc.aio.AioRpcError as err:
                assert (err.code(), reason_of(err)) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                break
            await asyncio.sleep(0.02)
        assert time.monotonic() - cut < 2.0
        await eventually(lambda: is_health(o.h, NOT_SERVING), 1, "NOT_SERVING")


async def test_a_stream_that_cannot_resume_empties_the_cache_first(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer
) -> None:
    async with behind_proxy(failpoint_mongo, admin, issuer) as o:
        h = o.h
        await h.seed("user_1")
        token = h.token("user_1")
        await in_cache(h, token, "user_1")
        # The server lost the stream's history: every getMore and resume answers ChangeStreamHistoryLost.
        await fail_point(admin, "alwaysOn", failCommands=["getMore", "aggregate"], errorCode=286, appName=APP)
        await eventually(lambda: not h.service.users.live, 3, "the stream broken")
        await seed(o.direct, "user_1", active=False)  # a write the stream can never replay
        await fail_point(admin, "off")
        await eventually(lambda: h.service.users.live, 5, "the stream open again")
        assert await refusal(verify(h, token)) == (grpc.StatusCode.PERMISSION_DENIED, "USER_INACTIVE")


# --- failovers --------------------------------------------------------------------------------------------
async def test_an_election_under_load_fails_no_call_and_loses_no_delivery(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer
) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    uri = f"mongodb://127.0.0.1:{failpoint_mongo.port}/?replicaSet=secantus&appName={APP}"
    settings = Settings(
        mongodb_uri=uri, mongodb_db=name, grpc_addr="127.0.0.1:0", webhook_addr="127.0.0.1:0",
        webhook_secrets=(WEBHOOK_SECRET,),
    )  # fmt: skip
    client = make_client(uri)
    store = UserStore(client[name], write_concern=DURABLE)
    await store.ensure_indexes()
    cached = [f"user_cached_{i}" for i in range(10)]
    updated = [f"user_updated_{i}" for i in range(5)]
    try:
        async with (
            serve(settings, store, issuer) as h,
            sidecar(settings, store) as port,
            aiohttp.ClientSession() as session,
            AuthsvcClient(h.target, attempts=1) as authsvc,
        ):
            for user in cached:
                await h.seed(user)
            tokens = [h.token(user) for user in cached]
            for user, token in zip(cached, tokens, strict=True):
                await in_cache(h, token, user)
            stop = asyncio.Event()
            url = f"http://127.0.0.1:{port}{settings.webhook_path}"
            verifying = asyncio.create_task(verify_load(authsvc, tokens, stop, concurrency=4))
            delivering = asyncio.create_task(deliver_updates(session, url, WEBHOOK_SECRET, updated, stop))
            await simulate_election(admin, APP, 4.6, fault_s=0.4)  # then 3 s without a primary
            await run_until(stop, 0.5)
            verified, delivered = await verifying, await delivering
            print(f"\nelection: VerifyToken {verified}; webhook {delivered}")
            assert verified.failed == 0, verified
            assert not delivered.refused and set(delivered.statuses.values()) == {"applied"}, delivered

            stored = {doc["externalId"]: doc["role"] async for doc in admin[name]["users"].find()}
            assert {user: stored[user] for user in updated} == delivered.roles
            # The stream resumed through it all: answers from memory carry every user's last role.
            await eventually(lambda: h.service.users.live, 5, "the stream following")
            for user in updated:
                reply = await authsvc.verify(h.token(user))
                assert reply.user is not None and reply.user.role.wire == delivered.roles[user]
    finally:
        await client.close()
        await admin.drop_database(name)


# --- URI options --------------------------------------------------------------------------------------------
def test_uri_options_win_over_authsvc_defaults() -> None:
    given = client_options("mongodb://db.example/?serverSelectionTimeoutMS=300&APPNAME=billing&ssl=true")
    assert "serverSelectionTimeoutMS" not in given and "appname" not in given
    assert "tls" not in given  # not ours to set: the URI's own (its alias ssl included) applies
    assert given["heartbeatFrequencyMS"] == 1000 and given["tz_aware"] is True
    silent = client_options("mongodb+srv://cluster.example/")
    assert silent["serverSelectionTimeoutMS"] == 10_000 and silent["appname"] == "authsvc"
    # authsvc grpc's own default (SetRole answers within a 5 s deadline) loses to the URI just the same.
    assert client_options("mongodb://db.example/", **GRPC_DEFAULTS)["serverSelectionTimeoutMS"] == 4_000
    given = client_options("mongodb://h/?serverSelectionTimeoutMS=300", **GRPC_DEFAULTS)
    assert "serverSelectionTimeoutMS" not in given


async def test_an_appname_in_the_uri_is_what_the_server_sees(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]]
) -> None:
    named = make_client(f"{failpoint_mongo.uri}&appName=billing-authsvc")
    default = make_client(failpoint_mongo.uri)
    try:
        await fail_point(admin, {"times": 1}, failCommands=["find"], errorCode=2, appName="billing-authsvc")
        await default.t.x.find_one({})  # authsvc's own appName: untouched
        with pytest.raises(OperationFailure) as info:
            await named.t.x.find_one({})
        assert info.value.code == 2
        timed = make_client(f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=200")
        started = time.monotonic()
        with pytest.raises(ServerSelectionTimeoutError):
            await timed.admin.command("ping")
        assert time.monotonic() - started < 2.0  # the URI's 0.2 s, not authsvc's 10 s
        await timed.close()
    finally:
        await named.close()
        await default.close()


# --- starting without the database ----------------------------------------------------------------------------
def log_lines(process: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in process.output().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    return lines


def attempts_of(process: ServerProcess) -> list[dict[str, Any]]:
    return [line for line in log_lines(process) if line["event"] == "database unreachable; retrying"]


async def test_servers_start_without_the_database_and_serve_once_it_answers(
    failpoint_mongo: EmbeddedMongo, admin: AsyncMongoClient[dict[str, Any]], issuer: LocalIssuer, tmp_path: Path
) -> None:
    name = f"t_{uuid.uuid4().hex[:12]}"
    async with tcp_proxy("127.0.0.1", failpoint_mongo.port) as proxy:
        await proxy.refuse()  # no database yet
        grpc_port, webhook_port = free_port(), free_port()
        env = child_env(
            # Each attempt gives up after 0.5 s instead of 2 s: the backoff between attempts is what is tested.
            MONGODB_URI=f"mongodb://{proxy.address}/?directConnection=true&serverSelectionTimeoutMS=500",
            MONGODB_DB=name,
            CLERK_FRONTEND_API_URL=issuer.url,
            CLERK_AUTHORIZED_PARTIES=FRONTEND,
            CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET,
            AUTHSVC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
            AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{webhook_port}",
            AUTHSVC_DRAIN_S="0",
        )
        servers = [
            ServerProcess(kind, [AUTHSVC, kind], env=env, logfile=tmp_path / f"{kind}.log")
            for kind in ("grpc", "webhook")
        ]
        for server in servers:
            server.start()
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
                aiohttp.ClientSession() as http,
            ):
                check = health_check(channel)

                async def grpc_health() -> int | None:
                    try:
                        reply = await check(health_pb2.HealthCheckRequest(), timeout=1)
                    except grpc.aio.AioRpcError:
                        return None
                    return int(reply.status)

                async def readyz() -> int | None:
                    try:
                        async with http.get(f"http://127.0.0.1:{webhook_port}/readyz") as reply:
                            return reply.status
                    except aiohttp.ClientError:
                        return None

                async def listening() -> bool:
                    for server in servers:
                        server.check_alive()
                    return await grpc_health() is not None and await readyz() is not None

                print(f"\nlistening after {await eventually(listening, 60, 'both servers listening'):.1f} s")
                assert await grpc_health() == NOT_SERVING
                assert await readyz() == 503
                stub = authsvc_pb2_grpc_stub(channel)
                code = await refusal(stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=issuer.mint("u"))))
                assert code == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")

                def retried() -> bool:
                    return all(len(attempts_of(server)) >= 2 for server in servers)

                await eventually(retried, 15, "two attempts each")

                await proxy.heal()
                took = await eventually(
                    lambda: _equals(grpc_health(), SERVING), 12, "SERVING once the database answers"
                )
                print(f"SERVING {took:.1f} s after the database answered")
                await eventually(lambda: _equals(readyz(), 200), 12, "/readyz 200 once the database answers")
                await seed(UserStore(admin[name], write_concern=DURABLE), "user_1")
                reply = await stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=issuer.mint("user_1")))
                assert reply.user.external_id == "user_1"
        finally:
            # Stopped in threads: the proxy runs on this loop and relays the servers' last words to the database.
            codes = await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers))
            await admin.drop_database(name)
    assert codes == [0, 0]
    for server in servers:
        lines, attempts = log_lines(server), attempts_of(server)
        assert len(attempts) >= 2, server.output()
        assert [line["attempt"] for line in attempts] == list(range(1, len(attempts) + 1))
        assert attempts[0]["retry_in_s"] == 0.5 and "cannot reach MongoDB" in attempts[0]["error"]
        others = [
            line
            for line in lines
            if line["level"] in ("warning", "error")
            and line not in attempts
            and line["event"] != "rpc"  # the test's own call, answered UNAVAILABLE
            and " is unset" not in line["event"]  # configuration warnings at startup
        ]
        assert not others, others
        assert "Traceback" not in server.output()


async def _equals(value: Awaitable[int | None], expected: int) -> bool:
    return await value == expected


def authsvc_pb2_grpc_stub(channel: grpc.aio.Channel) -> authsvc_pb2_grpc.AuthServiceAsyncStub:
    return authsvc_pb2_grpc.AuthServiceStub(channel)


async def test_refused_credentials_exit_2_at_once_and_sync_still_needs_the_database(
    tmp_path: Path, fake_clerk: FakeClerk
) -> None:
    locked = EmbeddedMongo(tmp_path / "auth", flags=("--auth",))
    await locked.start()
    try:
        refused = f"mongodb://authsvc:hunter22@127.0.0.1:{locked.port}/?directConnection=true"
        unreachable = f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"
        grpc_env = child_env(MONGODB_URI=refused, CLERK_FRONTEND_API_URL="https://c.dev")
        sync_env = child_env(MONGODB_URI=unreachable, CLERK_SECRET_KEY=SECRET, CLERK_API_URL=fake_clerk.url)
        started = time.monotonic()
        (code, _, err), (sync_code, _, sync_err) = await asyncio.gather(
            run(AUTHSVC, "grpc", env=grpc_env, cwd=tmp_path), run(AUTHSVC, "sync", env=sync_env, cwd=tmp_path)
        )
        assert time.monotonic() - started < 15  # no waiting for a database that will never let it in
    finally:
        locked.stop()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("authsvc: MongoDB at ") and "refused authsvc" in err, err
    assert "hunter22" not in err
    assert sync_code == 2, sync_err
    assert sync_err.count("\n") == 1 and sync_err.startswith("authsvc: cannot reach MongoDB at 127.0.0.1:"), sync_err


# --- shutdown during an outage ----------------------------------------------------------------------------
async def test_closing_the_database_while_it_is_down_does_not_wait_for_it(tmp_path: Path) -> None:
    """A SIGTERM during an outage: the client's goodbye (ending sessions, killing cursors) cannot reach
    the server, and must not hold shutdown for the driver's server-selection timeout (10 s)."""
    mongo = EmbeddedMongo(tmp_path / "mongo")
    await mongo.start()
    database = await open_database(Settings(mongodb_uri=mongo.uri, data_dir=tmp_path))
    try:
        stream = await database.db["users"].watch(max_await_time_ms=100)
        await stream.try_next()  # an open cursor and a session for the client to end at close
        await asyncio.to_thread(mongo.stop)
        started = time.monotonic()
    finally:
        await database.close()
    assert time.monotonic() - started < 3.0
