"""``python -m bench.availability [election|outage|rollout]``: failed calls through a failover, an outage, a rollout.

Each scenario runs authsvc as production does (``authsvc grpc`` and
``authsvc webhook`` child processes) over a private embedded database
started with ``--enable-test-commands``, loads it from this process with the
client package and signed deliveries, and prints what failed:

- ``election``: 10 s as the driver sees a MongoDB election, on authsvc's own
  connections only (fail points scoped to its ``appName``): dropped
  connections, ``NotWritablePrimary``, ``InterruptedDueToReplStateChange`` and
  ``ShutdownInProgress`` on reads, writes, the change stream's ``getMore``
  and its resume, then no primary at all for the rest (``replSetStepDown``).
  VerifyToken for cached users, and deliveries sent as Svix does (a 503 is
  retried; every delivery must end applied);
- ``outage``: the database frozen (SIGSTOP: connections accepted, nothing
  answers) for 10 s within ``AUTHSVC_STALE_S``: VerifyToken for cached users;
- ``rollout``: two ``authsvc grpc`` replicas behind the client package
  (``ipv4:a,b``), each replaced in turn (SIGTERM, a new one started) under load.

The pieces (:func:`simulate_election`, :func:`verify_load`,
:func:`deliver_updates`) are shared with ``tests/test_availability.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from authsvc.dev.events import clerk_event, signed_headers
from authsvc.dev.procs import ServerProcess
from authsvc_client import AuthsvcClient
from authsvc_client.errors import AuthsvcError

# Where a failover hits a client: its reads, its writes (both the user and the ledger), and the change stream
# (getMore, and the aggregate that resumes it). Fail points are scoped to authsvc's appName.
ELECTION_COMMANDS = ("find", "getMore", "aggregate", "insert", "update", "findAndModify")
ELECTION_FAULTS: tuple[dict[str, Any], ...] = (
    {"closeConnection": True},
    {"errorCode": 10107},  # NotWritablePrimary
    {"errorCode": 11602},  # InterruptedDueToReplStateChange
    {"errorCode": 91},  # ShutdownInProgress
)
ROLES = ("staff", "admin", "superadmin")


async def fail_point(admin: AsyncMongoClient[dict[str, Any]], mode: object, **data: object) -> None:
    await admin.admin.command({"configureFailPoint": "failCommand", "mode": mode, "data": data})


async def simulate_election(
    admin: AsyncMongoClient[dict[str, Any]], app_name: str, seconds: float, *, fault_s: float = 0.5
) -> None:
    """An election as ``app_name``'s driver sees it, on one SecantusDB node, lasting ``seconds``.

    First each fault of :data:`ELECTION_FAULTS` in turn (``fault_s`` each, on
    the next two matching commands: a retry meets the new primary), then no
    primary at all for the rest (``replSetStepDown``: writes wait for one),
    the old primary gone for the change stream too: its ``getMore`` and every
    resume fail with ``InterruptedDueToReplStateChange`` until the end.
    """
    for fault in ELECTION_FAULTS:
        await fail_point(admin, {"times": 2}, failCommands=list(ELECTION_COMMANDS), appName=app_name, **fault)
        await asyncio.sleep(fault_s)
    without_primary = max(1, round(seconds - fault_s * len(ELECTION_FAULTS)))
    await fail_point(admin, "alwaysOn", failCommands=["getMore", "aggregate"], errorCode=11602, appName=app_name)
    await admin.admin.command({"replSetStepDown": without_primary, "force": True})
    await asyncio.sleep(without_primary)
    await fail_point(admin, "off")


@dataclass
class Tally:
    """Calls answered, and failures by ``CODE REASON``."""

    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1

    def __str__(self) -> str:
        detail = ", ".join(f"{what} x{n}" for what, n in sorted(self.failures.items()))
        return f"{self.ok + self.failed} calls, {self.failed} failed" + (f" ({detail})" if detail else "")


async def verify_load(
    client: AuthsvcClient, tokens: Sequence[str], stop: asyncio.Event, *, concurrency: int = 8
) -> Tally:
    """VerifyToken over ``tokens`` round-robin, ``concurrency`` calls in flight, until ``stop``."""
    tally = Tally()

    async def worker(first: int) -> None:
        index = first
        while not stop.is_set():
            try:
                await client.verify(tokens[index % len(tokens)])
                tally.ok += 1
            except AuthsvcError as exc:
                tally.fail(f"{exc.code} {exc.reason}")
            index += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return tally


@dataclass
class Deliveries:
    """Deliveries sent as Svix sends them: each retried after a 503 (or no answer) until it gets a 2xx."""

    statuses: dict[str, str] = field(default_factory=dict)  # svix-id -> final {"status": ...}
    unavailable: int = 0  # 503 answers (each then retried)
    unanswered: int = 0  # connection errors (each then retried)
    refused: list[tuple[int, str]] = field(default_factory=list)  # any other answer: a failure
    roles: dict[str, str] = field(default_factory=dict)  # user -> the role of its newest delivery

    def __str__(self) -> str:
        ends: dict[str, int] = {}
        for status in self.statuses.values():
            ends[status] = ends.get(status, 0) + 1
        return (
            f"{len(self.statuses)} deliveries ended {ends}, {self.unavailable} answers 503 (retried), "
            f"{self.unanswered} unanswered (retried), {len(self.refused)} refused"
        )


async def deliver_updates(
    session: aiohttp.ClientSession,
    url: str,
    secret: str,
    users: Sequence[str],
    stop: asyncio.Event,
    *,
    retry_s: float = 0.2,
) -> Deliveries:
    """``user.updated`` for each user in turn (a new role each time, newer ``updated_at``) until ``stop``.

    One user's deliveries go one after another (as Svix orders an endpoint's
    messages); users go concurrently. The last round in flight is finished.
    """
    result = Deliveries()
    base_ms = int(time.time() * 1000)

    async def one_user(user: str) -> None:
        round_ = 0
        while not stop.is_set():
            role = ROLES[(round_ + hash(user)) % len(ROLES)]
            body = json.dumps(clerk_event("user.updated", user, role=role, now_ms=base_ms + round_))
            msg_id = f"msg_{uuid.uuid4().hex}"
            while True:
                try:
                    async with session.post(url, data=body, headers=signed_headers(secret, body, msg_id)) as reply:
                        payload = await reply.json(content_type=None)
                        status = reply.status
                except (aiohttp.ClientError, TimeoutError):
                    result.unanswered += 1
                    await asyncio.sleep(retry_s)
                    continue
                if status == 503:
                    result.unavailable += 1
                    await asyncio.sleep(retry_s)
                    continue
                if status == 200:
                    result.statuses[msg_id] = payload.get("status", "?")
                    result.roles[user] = role
                else:
                    result.refused.append((status, str(payload)[:200]))
                break
            round_ += 1

    await asyncio.gather(*(one_user(user) for user in users))
    return result


async def run_until(stop: asyncio.Event, seconds: float) -> None:
    await asyncio.sleep(seconds)
    stop.set()


# --- the command: child processes over a private database ---------------------------------------------------
@dataclass
class Stage:
    """A private database with test commands, a JWKS issuer and what the servers need to reach them."""

    directory: Path
    mongo: Any
    issuer: Any
    jwks: Any
    secret: str
    app_name: str = "authsvc-bench"
    uri_options: str = ""  # appended to MONGODB_URI (options there win over authsvc's defaults)

    @property
    def uri(self) -> str:
        options = f"&{self.uri_options}" if self.uri_options else ""
        return f"mongodb://127.0.0.1:{self.mongo.port}/?replicaSet=secantus&appName={self.app_name}{options}"

    def env(self, **more: str) -> dict[str, str]:
        from authsvc.dev.procs import child_env

        return child_env(
            MONGODB_URI=self.uri,
            MONGODB_DB="bench",
            CLERK_FRONTEND_API_URL=self.jwks,
            CLERK_AUTHORIZED_PARTIES="http://localhost:3000",
            CLERK_WEBHOOK_SECRET=self.secret,
            AUTHSVC_LOG_LEVEL="warning",
            **more,
        )


async def _stage(directory: Path) -> tuple[Stage, Callable[[], Awaitable[None]]]:
    import base64

    from aiohttp import web

    from authsvc.dev.issuer import DevIssuer, jwks_routes
    from service.embedded import EmbeddedMongo, free_port

    mongo = EmbeddedMongo(directory / "mongo", flags=("--enable-test-commands",))
    await mongo.start()
    issuer = DevIssuer.load_or_create(directory / "issuer")
    app = web.Application()
    app.add_routes(jwks_routes(issuer))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()

    async def close() -> None:
        await runner.cleanup()
        mongo.stop()

    return Stage(directory, mongo, issuer, f"http://127.0.0.1:{port}", secret), close


def _mint(stage: Stage, subject: str) -> str:
    token: str = stage.issuer.mint(subject, issuer=stage.jwks, azp="http://localhost:3000", ttl_s=3600)
    return token


async def _seed(stage: Stage, users: Sequence[str]) -> None:
    from datetime import UTC, datetime

    from service.database import DURABLE, make_client
    from service.roles import Role
    from service.users import UserProfile, UserStore

    client = make_client(f"mongodb://127.0.0.1:{stage.mongo.port}/?directConnection=true")
    try:
        store = UserStore(client["bench"], write_concern=DURABLE)
        await store.ensure_indexes()
        for user in users:
            profile = UserProfile(user, "Bench User", f"{user}@example.com", Role.STAFF, True, datetime.now(UTC))
            await store.upsert_from_clerk(profile)
    finally:
        await client.close()


async def _servers(
    stage: Stage, *, grpc_ports: Sequence[int], webhook_port: int | None, **env: str
) -> list[ServerProcess]:
    from authsvc.dev.procs import grpc_serving, http_ok

    authsvc = str(Path(sys.executable).with_name("authsvc"))
    procs: list[ServerProcess] = []
    for port in grpc_ports:
        procs.append(
            ServerProcess(
                f"grpc:{port}",
                [authsvc, "grpc"],
                env=stage.env(AUTHSVC_GRPC_ADDR=f"127.0.0.1:{port}", AUTHSVC_METRICS_ADDR="127.0.0.1:0", **env),
                logfile=stage.directory / f"grpc-{port}-{len(procs)}.log",
            )
        )
    if webhook_port is not None:
        procs.append(
            ServerProcess(
                "webhook",
                [authsvc, "webhook"],
                env=stage.env(AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{webhook_port}", **env),
                logfile=stage.directory / "webhook.log",
            )
        )
    for proc in procs:
        proc.start()
    for proc in procs:
        if proc.name.startswith("grpc"):
            await proc.wait_ready(grpc_serving(proc.env["AUTHSVC_GRPC_ADDR"]))
        else:
            await proc.wait_ready(http_ok(f"http://127.0.0.1:{webhook_port}/readyz"))
    return procs


async def election(stage: Stage, seconds: float) -> str:
    from authsvc.dev.procs import free_port

    cached = [f"user_cached_{i}" for i in range(50)]
    updated = [f"user_updated_{i}" for i in range(10)]
    await _seed(stage, cached)
    grpc_port, webhook_port = free_port(), free_port()
    procs = await _servers(stage, grpc_ports=[grpc_port], webhook_port=webhook_port)
    tokens = [_mint(stage, user) for user in cached]
    admin: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stage.mongo.uri, appname="bench-admin")
    try:
        async with AuthsvcClient(f"127.0.0.1:{grpc_port}", attempts=1) as client, aiohttp.ClientSession() as http:
            for token in tokens:  # every one cached before the election
                await client.verify(token)
            stop = asyncio.Event()
            url = f"http://127.0.0.1:{webhook_port}/clerk-users-webhook"
            verifying = asyncio.create_task(verify_load(client, tokens, stop))
            delivering = asyncio.create_task(deliver_updates(http, url, stage.secret, updated, stop))
            await asyncio.sleep(1.0)
            await simulate_election(admin, stage.app_name, seconds)
            await asyncio.sleep(1.0)
            stop.set()
            verified, delivered = await verifying, await delivering
        stored = {doc["externalId"]: doc.get("role") async for doc in admin["bench"]["users"].find()}
        wrong = [user for user, role in delivered.roles.items() if stored.get(user) != role]
    finally:
        await admin.close()
        for proc in procs:
            proc.stop()
    return (
        f"election ({seconds:.0f} s): VerifyToken (cached users, no client retries): {verified}\n"
        f"  webhook: {delivered}; users whose final role is wrong: {len(wrong)}"
    )


async def outage(stage: Stage, seconds: float) -> str:
    from authsvc.dev.procs import free_port

    cached = [f"user_cached_{i}" for i in range(50)]
    await _seed(stage, cached)
    grpc_port = free_port()
    procs = await _servers(stage, grpc_ports=[grpc_port], webhook_port=None, AUTHSVC_STALE_S=str(seconds * 3))
    tokens = [_mint(stage, user) for user in cached]
    pid = stage.mongo.pid
    assert pid is not None
    try:
        async with AuthsvcClient(f"127.0.0.1:{grpc_port}", attempts=1) as client:
            for token in tokens:
                await client.verify(token)
            stop = asyncio.Event()
            verifying = asyncio.create_task(verify_load(client, tokens, stop))
            await asyncio.sleep(1.0)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(seconds)
            finally:
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(1.0)
            stop.set()
            verified = await verifying
    finally:
        for proc in procs:
            proc.stop()
    return f"outage ({seconds:.0f} s, database frozen, AUTHSVC_STALE_S={seconds * 3:.0f}): VerifyToken: {verified}"


async def rollout(stage: Stage, seconds: float) -> str:
    from authsvc.dev.procs import free_port

    cached = [f"user_cached_{i}" for i in range(50)]
    await _seed(stage, cached)
    ports = [free_port(), free_port()]
    procs = await _servers(stage, grpc_ports=ports, webhook_port=None, AUTHSVC_DRAIN_S="2")
    tokens = [_mint(stage, user) for user in cached]
    codes = []
    try:
        target = f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        async with AuthsvcClient(target) as client:
            stop = asyncio.Event()
            verifying = asyncio.create_task(verify_load(client, tokens, stop))
            for index, port in enumerate(ports):  # replace each replica in turn, as a Deployment does
                await asyncio.sleep(seconds / 4)
                codes.append(await asyncio.to_thread(procs[index].stop, signal.SIGTERM, 60))
                (procs[index],) = await _servers(stage, grpc_ports=[port], webhook_port=None, AUTHSVC_DRAIN_S="2")
            await asyncio.sleep(seconds / 4)
            stop.set()
            verified = await verifying
    finally:
        for proc in procs:
            proc.stop()
    return f"rollout (2 replicas, each replaced under load; exit codes {codes}): VerifyToken via the client: {verified}"


SCENARIOS = {"election": election, "outage": outage, "rollout": rollout}


async def main(which: Sequence[str], seconds: float, uri_options: str) -> None:
    for name in which:
        with tempfile.TemporaryDirectory(prefix=f"authsvc-bench-{name}-") as tmp:
            stage, close = await _stage(Path(tmp))
            stage.uri_options = uri_options
            try:
                print(await SCENARIOS[name](stage, seconds), flush=True)
            finally:
                await close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.availability", description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", metavar="{election,outage,rollout}", help="default: all three")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the election, outage or rollout")
    parser.add_argument(
        "--uri-options",
        default="",
        metavar="K=V&...",
        help="added to MONGODB_URI, e.g. serverSelectionTimeoutMS=2000&heartbeatFrequencyMS=10000 (the old defaults)",
    )
    args = parser.parse_args()
    unknown = [name for name in args.which if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}")
    asyncio.run(main(args.which or list(SCENARIOS), args.seconds, args.uri_options))
