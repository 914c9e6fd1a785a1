"""VerifyToken benchmark: calls per second of the gRPC service, against its own floor.

A private embedded database with one synced user; the gRPC service as its own
process (:mod:`bench.grpc_runner`: JWKS over HTTP, the production path); load
from separate client processes (grpc.aio, one channel each, N calls in
flight each). Three phases:

- ``one token``: the same token on every call.
- ``10k tokens``: distinct tokens (own ``sid`` and ``jti``), all valid for the run.
- ``floor``: ``grpc.health.v1.Health/Check`` on the same server, process and
  interceptors: what a call costs before any authsvc code runs.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from authsvc.dev.issuer import DevIssuer
from authsvc.dev.procs import ServerProcess, child_env, free_port, grpc_serving, health_check
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from bench.common import (
    Figure,
    Recorder,
    private_mongo,
    run_phase,
    sleep_until,
    wait_go,
    workdir,
)
from service.database import durable_write_concern, make_client
from service.tokens import RESULT_CACHE_SIZE

DB = "bench"
SUBJECT = "user_benchverify000000000001"
AZP = "http://localhost:3000"
TOKEN_TTL_S = 900
CALL_TIMEOUT_S = 10.0


def mint(config: dict[str, Any], count: int) -> list[str]:
    issuer = DevIssuer.load_or_create(Path(config["issuer_dir"]))
    return [
        issuer.mint(SUBJECT, issuer=config["issuer_url"], azp=AZP, ttl_s=TOKEN_TTL_S,
                    session_id=f"sess_{secrets.token_hex(12)}", extra={"jti": secrets.token_hex(16)})
        for _ in range(count)
    ]  # fmt: skip


# --- load process ------------------------------------------------------------------------------
def client_worker(config: dict[str, Any], ready: Any, go: Any) -> dict[str, Any]:
    tokens = config["tokens"] if config["tokens"] else mint(config, config["mint"])
    return asyncio.run(_calls(config, tokens, ready, go))


async def _calls(config: dict[str, Any], tokens: list[str], ready: Any, go: Any) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(config["target"]) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        method: Any
        if config["rpc"] == "health":
            method = health_check(channel)
            requests: list[Any] = [health_pb2.HealthCheckRequest(service="")]
        else:
            method = authsvc_pb2_grpc.AuthServiceStub(channel).VerifyToken
            requests = [authsvc_pb2.VerifyTokenRequest(token=token) for token in tokens]
        await method(requests[0], timeout=CALL_TIMEOUT_S)
        ready.put("ready")
        window = wait_go(go)
        recorder = Recorder(window)
        concurrency = config["concurrency"]

        async def caller(offset: int) -> None:
            index = offset
            while time.monotonic() < window.end:
                request = requests[index % len(requests)]
                # A token's first call verifies it; later calls hit the verifier's result cache.
                label = "OK-first-use" if index < len(requests) and config["rpc"] != "health" else "OK"
                index += concurrency
                began = time.monotonic()
                try:
                    await method(request, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    recorder.add(began, time.monotonic(), exc.code().name, ok=False)
                    continue
                recorder.add(began, time.monotonic(), label)

        await sleep_until(window.go)
        sampler = asyncio.create_task(recorder.sample_cpu())
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        await sampler
    return recorder.result()


# --- the orchestration ----------------------------------------------------------------------------
async def seed(uri: str) -> None:
    """The one synced, active user every token names."""
    from service.users import UserStore

    client = make_client(uri)
    try:
        store = UserStore(client[DB], write_concern=await durable_write_concern(client))
        await store.ensure_indexes()
        now = datetime.now(UTC)
        await store.users.insert_one(
            {"externalId": SUBJECT, "name": "Bench Verify", "email": "bench@example.com", "role": "admin",
             "isActive": True, "clerkUpdatedAt": now, "createdAt": now, "updatedAt": now}
        )  # fmt: skip
    finally:
        await client.close()


async def run(
    *, duration_s: float, warmup_s: float, concurrency: int, clients: int, tokens: int, profile: Path | None = None
) -> tuple[list[Figure], list[str]]:
    """Run the three phases; return their figures and notes."""
    notes: list[str] = []
    with workdir("authsvc-bench-verify-") as tmp:
        issuer_dir = tmp / "issuer"
        DevIssuer.load_or_create(issuer_dir)  # made once, before anyone reads it
        async with private_mongo(tmp) as mongo:
            assert mongo.pid is not None
            await seed(mongo.uri)
            grpc_port, jwks_port = free_port(), free_port()
            issuer_url = f"http://127.0.0.1:{jwks_port}"
            server = ServerProcess(
                "grpc service",
                [sys.executable, "-m", "bench.grpc_runner"],
                env=child_env(
                    MONGODB_URI=mongo.uri,
                    MONGODB_DB=DB,
                    CLERK_FRONTEND_API_URL=issuer_url,
                    CLERK_AUTHORIZED_PARTIES=AZP,
                    AUTHSVC_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
                    AUTHSVC_LOG_LEVEL="warning",
                    BENCH_ISSUER_DIR=str(issuer_dir),
                    BENCH_JWKS_ADDR=f"127.0.0.1:{jwks_port}",
                ),
                logfile=tmp / "grpc.log",
            )
            server.start()
            try:
                target = f"127.0.0.1:{grpc_port}"
                await server.wait_ready(grpc_serving(target), timeout_s=30)
                base = {"target": target, "concurrency": concurrency, "issuer_dir": str(issuer_dir),
                        "issuer_url": issuer_url, "tokens": [], "mint": 0}  # fmt: skip
                one = mint(base, 1)
                per_client = -(-tokens // clients)
                phases: list[tuple[str, dict[str, Any]]] = [
                    ("verify: one token", {"rpc": "verify", "tokens": one}),
                    ("verify: 10k tokens" if tokens == 10_000 else f"verify: {tokens} tokens",
                     {"rpc": "verify", "mint": per_client}),
                    ("verify: floor (Health/Check)", {"rpc": "health"}),
                ]  # fmt: skip
                figures = []
                for name, extra in phases:
                    figures.append(
                        await run_phase(
                            name,
                            client_worker,
                            [{**base, **extra} for _ in range(clients)],
                            {"server": server.pid, "mongo": mongo.pid},
                            warmup_s=warmup_s,
                            duration_s=duration_s,
                            profile=profile,
                        )
                    )
                    server.check_alive()
            finally:
                server.stop()
    notes.append(
        f"verify: b cycles {tokens} tokens through a result cache of {RESULT_CACHE_SIZE}; "
        "OK-first-use counts calls that verified a token for the first time"
    )
    return figures, notes
