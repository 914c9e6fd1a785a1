"""Webhook benchmark: signed ``user.updated`` deliveries per second through the sidecar, against raw upserts.

A private embedded database; the sidecar as production runs it (``python -m
webhook``, its own process, logging at the default level: one JSON line per
delivery, to a file); seeded users. Two phases, each window from a separate
load process at the same concurrency, interleaved (sidecar, raw, raw,
sidecar, ...) so that a database that slows as writes accumulate, or other
load on the machine, weighs on both alike:

- ``sidecar``: pre-signed deliveries (distinct svix-id, increasing
  ``updated_at``), HTTP POST, end to end.
- ``raw upsert``: a plain upsert of the same fields by ``externalId``, with
  the same durable write concern, straight through ``AsyncMongoClient``: what
  the database itself sustains.

Every window's events are later than any before it, so every write applies.
The ratio is the median over the interleaved pairs, with its spread.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from authsvc.dev.events import clerk_event, signed_headers
from authsvc.dev.procs import ServerProcess, child_env, free_port, http_ok
from bench.common import (
    Figure,
    Recorder,
    abba,
    median_figure,
    pair_ratios,
    private_mongo,
    ratio_line,
    run_phase,
    sleep_until,
    wait_go,
    workdir,
)
from service.database import durable_write_concern, make_client

SECRET = "whsec_" + base64.b64encode(b"authsvc-bench-webhook-secret-32b").decode()
DB = "bench"
PATH = "/clerk-users-webhook"
ROLES = ("staff", "admin", "staff", "staff")
STRIDE_MS = 1_000_000  # event time between the starts of two windows: more than any window sends
SIDECAR, RAW = "webhook: sidecar", "webhook: raw upsert"


def role_of(index: int) -> str:
    """Each user keeps one role: deliveries are profile updates, the common case (a role change
    also writes an audit record)."""
    return ROLES[index % len(ROLES)]


def user_id(index: int) -> str:
    return f"user_bench{index:06d}"


def _ms(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, tz=UTC)


# --- load process: the sidecar ----------------------------------------------------------------
def presign(config: dict[str, Any]) -> list[tuple[bytes, dict[str, str]]]:
    """Bodies and Svix headers for every delivery of the phase, signed before the window."""
    users, base_ms = config["users"], config["base_ms"]
    signed = []
    for i in range(config["deliveries"]):
        body = json.dumps(bench_event(i % users, i, base_ms))
        signed.append((body.encode(), signed_headers(SECRET, body, f"msg_bench_{config['run']}_{i}")))
    return signed


def sidecar_worker(config: dict[str, Any], ready: Any, go: Any) -> dict[str, Any]:
    signed = presign(config)
    return asyncio.run(_post_all(config, signed, ready, go))


async def _post_all(
    config: dict[str, Any], signed: list[tuple[bytes, dict[str, str]]], ready: Any, go: Any
) -> dict[str, Any]:
    url = config["url"]
    connector = aiohttp.TCPConnector(limit=config["concurrency"], force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url.replace(PATH, "/healthz")) as response:
            response.raise_for_status()
        ready.put("ready")
        window = wait_go(go)
        recorder = Recorder(window)
        deliveries = iter(signed)
        exhausted = False

        async def sender() -> None:
            nonlocal exhausted
            while time.monotonic() < window.end:
                item = next(deliveries, None)
                if item is None:
                    exhausted = True
                    return
                body, headers = item
                began = time.monotonic()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        payload = await response.read()
                        status = response.status
                except aiohttp.ClientError as exc:
                    recorder.add(began, time.monotonic(), type(exc).__name__, ok=False)
                    continue
                finished = time.monotonic()
                if status == 200:
                    recorder.add(began, finished, json.loads(payload).get("status", "?"))
                else:
                    recorder.add(began, finished, f"http {status}", ok=False)

        await sleep_until(window.go)
        sampler = asyncio.create_task(recorder.sample_cpu())
        await asyncio.gather(*(sender() for _ in range(config["concurrency"])))
        if exhausted:
            sampler.cancel()
        else:
            await sampler
    note = f"ran out of {len(signed)} pre-signed deliveries: raise --deliveries" if exhausted else ""
    return recorder.result(note=note)


# --- load process: raw AsyncMongoClient ---------------------------------------------------------
def raw_worker(config: dict[str, Any], ready: Any, go: Any) -> dict[str, Any]:
    return asyncio.run(_raw(config, ready, go))


def bench_event(user: int, i: int, base_ms: int) -> dict[str, Any]:
    """The ``user.updated`` body of delivery ``i`` (the sidecar phase signs the same bodies)."""
    return clerk_event(
        "user.updated", user_id(user), role=role_of(user), email=f"{user_id(user)}@example.com",
        first_name="Bench", last_name=str(i), now_ms=base_ms + i,
    )  # fmt: skip


async def _raw(config: dict[str, Any], ready: Any, go: Any) -> dict[str, Any]:
    """A plain upsert of the same fields by ``externalId``: what the database itself sustains."""
    from service.users import UserStore

    client = make_client(config["uri"])
    try:
        concern = await durable_write_concern(client)
        store = UserStore(client[DB], write_concern=concern)
        await store.users.find_one({})
        ready.put("ready")
        window = wait_go(go)
        recorder = Recorder(window)
        counter = itertools.count()

        async def writer() -> None:
            while time.monotonic() < window.end:
                i = next(counter)
                if i >= STRIDE_MS:
                    return
                user = i % config["users"]
                uid = user_id(user)
                began = time.monotonic()
                fields = {"name": f"Bench {i}", "email": f"{uid}@example.com", "role": role_of(user),
                          "isActive": True, "clerkUpdatedAt": _ms(config["base_ms"] + i),
                          "updatedAt": datetime.now(UTC)}  # fmt: skip
                await store.users.update_one({"externalId": uid}, {"$set": fields}, upsert=True)
                recorder.add(began, time.monotonic(), "applied")

        await sleep_until(window.go)
        sampler = asyncio.create_task(recorder.sample_cpu())
        await asyncio.gather(*(writer() for _ in range(config["concurrency"])))
        await sampler
    finally:
        await client.close()
    return recorder.result()


# --- the orchestration ----------------------------------------------------------------------------
async def seed(uri: str, users: int, base_ms: int) -> None:
    """``users`` synced users whose ``clerkUpdatedAt`` predates every benchmark event."""
    from service.users import UserStore

    client = make_client(uri)
    try:
        concern = await durable_write_concern(client)
        store = UserStore(client[DB], write_concern=concern)
        await store.ensure_indexes()
        now = datetime.now(UTC)
        docs = [
            {"externalId": user_id(i), "name": "Bench Seed", "email": f"{user_id(i)}@example.com",
             "role": role_of(i), "isActive": True, "clerkUpdatedAt": _ms(base_ms - 1000),
             "createdAt": now, "updatedAt": now}
            for i in range(users)
        ]  # fmt: skip
        for start in range(0, users, 1000):
            await store.users.insert_many(docs[start : start + 1000])
    finally:
        await client.close()


async def run(
    *,
    duration_s: float,
    warmup_s: float,
    concurrency: int,
    users: int,
    deliveries: int,
    pairs: int = 2,
    profile: Path | None = None,
) -> tuple[list[Figure], list[str], list[str]]:
    """Run the interleaved phases; return the median figures, the ratio lines and notes."""
    notes: list[str] = []
    base_ms = int(time.time() * 1000) - 3_600_000
    runs: dict[str, list[Figure]] = {SIDECAR: [], RAW: []}
    with workdir("authsvc-bench-webhook-") as tmp:
        async with private_mongo(tmp) as mongo:
            assert mongo.pid is not None
            await seed(mongo.uri, users, base_ms)
            port = free_port()
            sidecar = ServerProcess(
                "sidecar",
                [sys.executable, "-m", "webhook"],
                env=child_env(
                    MONGODB_URI=mongo.uri,
                    MONGODB_DB=DB,
                    CLERK_WEBHOOK_SECRET=SECRET,
                    AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{port}",
                    AUTHSVC_LOG_LEVEL="info",
                ),
                logfile=tmp / "sidecar.log",
            )
            sidecar.start()
            try:
                await sidecar.wait_ready(http_ok(f"http://127.0.0.1:{port}/readyz"), timeout_s=30)
                for phase, side in enumerate(abba(pairs)):
                    # Each window's events are later than every earlier window's: all of them apply.
                    phase_ms = base_ms + phase * STRIDE_MS
                    common = {"users": users, "concurrency": concurrency, "run": str(phase), "base_ms": phase_ms}
                    if side == 0:
                        url = f"http://127.0.0.1:{port}{PATH}"
                        config = {**common, "url": url, "deliveries": min(deliveries, STRIDE_MS)}
                        found = await run_phase(SIDECAR, sidecar_worker, [config],
                                                {"server": sidecar.pid, "mongo": mongo.pid},
                                                warmup_s=warmup_s, duration_s=duration_s, profile=profile)  # fmt: skip
                        sidecar.check_alive()
                    else:
                        found = await run_phase(RAW, raw_worker, [{**common, "uri": mongo.uri}], {"mongo": mongo.pid},
                                                warmup_s=warmup_s, duration_s=duration_s, profile=profile)  # fmt: skip
                    runs[found.name].append(found)
            finally:
                sidecar.stop()
            logged = sum('"webhook delivery"' in line for line in (tmp / "sidecar.log").read_text().splitlines())
            notes.append(f"webhook: the sidecar logged {logged:,} delivery lines (info level, to a file)")
    ratios = pair_ratios([f.rps for f in runs[SIDECAR]], [f.rps for f in runs[RAW]])
    lines = [ratio_line("sidecar / raw upsert", ratios, 0.7)]
    figures = [median_figure(name, found) for name, found in runs.items()]
    return figures, lines, notes
