"""Memory benchmark: RSS of one gRPC worker over 1,000,000 VerifyToken calls on 100,000 distinct tokens.

``python -m authsvc grpc`` (one worker: it sees every call and every token)
over a private embedded database holding 10,000 users; tokens of 100,000
distinct sessions of those users, minted beforehand by two processes. Two
client processes (grpc.aio, requests pre-serialized, 64 calls in flight each)
go through the tokens in blocks of 1,000: each block's tokens are called ten
times, interleaved (a session is presented again and again within a minute,
never ten times at once), so every token is verified once and then served
from the caches. The server's VmRSS is read
from ``/proc`` after each tenth of the calls: the bounded caches (10,000
tokens, replies and users) keep it flat.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from authsvc.dev.issuer import DevIssuer
from authsvc.dev.procs import ServerProcess, child_env
from authsvc_client.v1 import authsvc_pb2
from bench.common import private_mongo, serve_jwks, workdir
from bench.verify import METHOD, Server, wait_serving
from service.database import durable_write_concern, make_client
from service.embedded import free_port

DB = "bench"
AZP = "http://localhost:3000"
USERS = 10_000
REPEATS = 10  # calls per token
BLOCK = 1000  # tokens in use at a time
CLIENTS, IN_FLIGHT = 2, 64
CTX = multiprocessing.get_context("spawn")


def user_id(index: int) -> str:
    return f"user_benchmem{index:06d}"


def mint(issuer_dir: str, issuer_url: str, start: int, stop: int, path: str) -> None:
    """Write the serialized VerifyToken requests of tokens ``start..stop`` to ``path`` (one hex line each)."""
    issuer = DevIssuer.load_or_create(Path(issuer_dir))
    with open(path, "w") as out:
        for i in range(start, stop):
            token = issuer.mint(user_id(i % USERS), issuer=issuer_url, azp=AZP, ttl_s=3600,
                                session_id=f"sess_mem{i:08d}")  # fmt: skip
            out.write(authsvc_pb2.VerifyTokenRequest(token=token).SerializeToString().hex() + "\n")


_requests: list[bytes] = []


def send_calls(paths: list[str], target: str, first: int, last: int, client: int) -> int:
    """Send the calls ``first <= j < last`` with ``j % CLIENTS == client``; return how many failed."""
    if not _requests:
        for path in paths:
            _requests.extend(bytes.fromhex(line) for line in Path(path).read_text().split())
    return asyncio.run(_calls(target, range(first + (client - first) % CLIENTS, last, CLIENTS)))


async def _calls(target: str, indices: range) -> int:
    failed = 0
    todo = iter(indices)
    async with grpc.aio.insecure_channel(target) as channel:
        method: Any = channel.unary_unary(METHOD)  # bytes in, bytes out

        async def caller() -> None:
            nonlocal failed
            for j in todo:
                try:
                    await method(_requests[token_of(j, len(_requests))], timeout=30)
                except grpc.aio.AioRpcError:
                    failed += 1

        await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return failed


def token_of(j: int, distinct: int) -> int:
    """Call ``j``'s token: blocks of ``BLOCK`` tokens, each called ``REPEATS`` times, interleaved."""
    block, offset = divmod(j, BLOCK * REPEATS)
    return (block * BLOCK + offset % BLOCK) % distinct


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def seed(uri: str) -> None:
    from service.users import UserStore

    client = make_client(uri)
    try:
        store = UserStore(client[DB], write_concern=await durable_write_concern(client))
        await store.ensure_indexes()
        now = datetime.now(UTC)
        docs = [
            {"externalId": user_id(i), "name": f"Mem {i}", "email": f"{user_id(i)}@example.com", "role": "staff",
             "isActive": True, "clerkUpdatedAt": now, "createdAt": now, "updatedAt": now}
            for i in range(USERS)
        ]  # fmt: skip
        for start in range(0, USERS, 1000):
            await store.users.insert_many(docs[start : start + 1000])
    finally:
        await client.close()


async def run(*, calls: int = 1_000_000, distinct: int = 100_000, steps: int = 10) -> list[str]:
    """The RSS of the worker after each step of ``calls // steps`` calls, as printable lines."""
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    with workdir("authsvc-bench-memory-") as tmp:
        issuer_dir = tmp / "issuer"
        jwks, issuer_url = await serve_jwks(DevIssuer.load_or_create(issuer_dir))
        port = free_port()
        paths = [str(tmp / f"requests{c}.hex") for c in range(CLIENTS)]
        bounds = [distinct * c // CLIENTS for c in range(CLIENTS + 1)]
        with CTX.Pool(CLIENTS) as pool:
            minted = pool.starmap_async(
                mint, [(str(issuer_dir), issuer_url, bounds[c], bounds[c + 1], paths[c]) for c in range(CLIENTS)]
            )
            try:
                async with private_mongo(tmp) as mongo:
                    await seed(mongo.uri)
                    env = child_env(
                        MONGODB_URI=mongo.uri, MONGODB_DB=DB, CLERK_FRONTEND_API_URL=issuer_url,
                        CLERK_AUTHORIZED_PARTIES=AZP, AUTHSVC_GRPC_ADDR=f"127.0.0.1:{port}",
                        AUTHSVC_METRICS_ADDR=f"127.0.0.1:{free_port()}", AUTHSVC_LOG_LEVEL="warning",
                        AUTHSVC_WORKERS="1",
                    )  # fmt: skip
                    argv = [sys.executable, "-m", "authsvc", "grpc"]
                    server = Server("grpc", ServerProcess("grpc", argv, env=env, logfile=tmp / "grpc.log"), port)
                    server.process.start()
                    try:
                        await wait_serving(server)
                        await loop.run_in_executor(None, minted.get)
                        minted_s = time.monotonic() - began
                        samples = [(0, rss_mib(server.process.pid))]
                        failed = 0
                        step = calls // steps
                        started = time.monotonic()
                        for first in range(0, calls, step):
                            last = min(calls, first + step)
                            args = [(paths, f"127.0.0.1:{port}", first, last, c) for c in range(CLIENTS)]
                            result: Any = await loop.run_in_executor(None, pool.starmap, send_calls, args)
                            failed += sum(result)
                            server.process.check_alive()
                            samples.append((last, rss_mib(server.process.pid)))
                        elapsed = time.monotonic() - started
                    finally:
                        server.process.stop()
            finally:
                await jwks.cleanup()
    half = samples[len(samples) // 2][1]
    peak = max(rss for _, rss in samples)
    lines = [
        f"memory: one worker, {calls:,} VerifyToken calls over {distinct:,} distinct tokens "
        f"({REPEATS} calls each, {BLOCK:,} tokens at a time), {USERS:,} users; {elapsed:.0f} s of calls "
        f"({calls / elapsed:,.0f}/s), {minted_s:.0f} s to mint and start",
        "  calls      RSS MiB",
        *(f"  {n:>9,}  {rss:7.1f}" for n, rss in samples),
        f"  peak {peak:.1f} MiB (target < 150); second half grew {samples[-1][1] - half:+.1f} MiB; "
        f"failed calls {failed}",
    ]
    return lines
