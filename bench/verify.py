"""VerifyToken benchmark: ``authsvc grpc`` with one and two workers against a bare grpc.aio floor, driven by h2load.

A private embedded database with one synced user, a JWKS served by this
process, and four servers, each its own process tree, all idle but the one
under load:

- ``bare``: :mod:`bench.bare`, one grpc.aio process answering the recorded
  reply bytes for the request bytes (no authsvc code, no serialization);
- ``bare + interceptor``: the same with authsvc's metrics interceptor;
- ``1 worker`` and ``2 workers``: ``python -m authsvc grpc`` with
  ``AUTHSVC_WORKERS`` 1 and 2, exactly as production runs it.

h2load (C, nghttp2; ``make bench`` installs Debian's ``nghttp2-client``) sends
the same gRPC request (one token, no ``min_role``) over 8 connections x 8
concurrent streams; rounds interleave the servers, and each figure is the
median round. h2load counts HTTP/2 answers, so the gRPC outcome is checked
from the service's own ``/metrics``: every VerifyToken handled must be ``OK``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from authsvc.dev.issuer import DevIssuer
from authsvc.dev.procs import ServerProcess, child_env, health_check
from authsvc_client.v1 import authsvc_pb2
from bench import profiles
from bench.common import (
    Figure,
    Spread,
    Window,
    median_figure,
    pair_ratios,
    private_mongo,
    ratio_line,
    sample_groups,
    serve_jwks,
    workdir,
)
from service.database import durable_write_concern, make_client
from service.embedded import free_port

DB = "bench"
SUBJECT = "user_benchverify000000000001"
AZP = "http://localhost:3000"
METHOD = "/authsvc.v1.AuthService/VerifyToken"
CONNECTIONS, STREAMS = 8, 8

BARE, BARE_I, ONE, TWO = "verify: bare grpc.aio", "verify: bare + interceptor", "verify: 1 worker", "verify: 2 workers"


@dataclass
class Server:
    name: str
    process: ServerProcess
    port: int
    metrics_port: int | None = None


def h2load() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise RuntimeError("h2load not found: `make bench` installs it (Debian package nghttp2-client)")
    return found


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC length-prefixed message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


_FINISHED = re.compile(r"finished in [\d.]+\w*, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")
_MEAN = re.compile(r"time for request:\s+\S+\s+\S+\s+(\S+)")


def _ms(text: str) -> float:
    """h2load's ``522us``, ``5.11ms`` or ``1.02s`` in milliseconds."""
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


async def drive(
    name: str, server: Server, body: Path, duration_s: float, warmup_s: float, tmp: Path, profile: Path | None = None
) -> Figure:
    """One h2load run against ``server``; CPU of the server's process tree and of h2load in the window."""
    argv = [h2load(), "-c", str(CONNECTIONS), "-m", str(STREAMS), "-t", "1", "-D", f"{duration_s:g}",
            f"--warm-up-time={warmup_s:g}", "-d", str(body), "-H", "content-type: application/grpc",
            "-H", "te: trailers", f"http://127.0.0.1:{server.port}{METHOD}"]  # fmt: skip
    out = tmp / "h2load.out"
    with out.open("wb") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    window = Window.after(0.0, warmup_s + 0.2, duration_s - 0.4)
    spy = None
    if profile is not None:
        spy = asyncio.create_task(profiles.record(profile, name, window, {"server": server.process.pid}))
    cpu = await sample_groups(window, {"server": server.process.pid, "h2load": proc.pid})
    if spy is not None:
        await spy
    await asyncio.to_thread(proc.wait, duration_s + warmup_s + 60)
    text = out.read_text()
    finished, requests, mean = _FINISHED.search(text), _REQUESTS.search(text), _MEAN.search(text)
    if finished is None or requests is None:
        raise RuntimeError(f"h2load against {name} printed no result:\n{text}")
    rps = float(finished.group(1))
    succeeded, failed, errored = int(requests.group(3)), int(requests.group(4)), int(requests.group(5))
    cpu.pop("_machine", None)
    return Figure(
        name=name, rps=rps, p50_ms=_ms(mean.group(1)) if mean else 0.0, p99_ms=0.0, count=succeeded,
        errors=failed + errored, seconds=duration_s, outcomes={"http2xx": succeeded}, cpu=cpu,
    )  # fmt: skip


async def seed(uri: str) -> None:
    """The one synced, active user the token names."""
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


async def wait_serving(server: Server, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.process.check_alive()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                reply = await health_check(channel)(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name} did not serve within {timeout_s:.0f}s:\n{server.process.tail()}")


async def raw_call(port: int, request: bytes) -> bytes:
    """One VerifyToken call with the request and the reply as bytes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method: Any = channel.unary_unary(METHOD)  # bytes in, bytes out
        reply: bytes = await method(request, timeout=10)
        return reply


async def handled(metrics_port: int) -> dict[str, float]:
    """``grpc_server_handled_total`` of VerifyToken by code, from the service's ``/metrics``."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
        text = await r.text()
    codes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_method") == "VerifyToken":
                codes[sample.labels["grpc_code"]] = codes.get(sample.labels["grpc_code"], 0) + sample.value
    return codes


async def run(
    *, duration_s: float, warmup_s: float, rounds: int, profile: Path | None = None
) -> tuple[list[Figure], list[str], list[str]]:
    """Start the four servers, run the interleaved rounds, return the median figures and notes."""
    notes: list[str] = []
    with workdir("authsvc-bench-verify-") as tmp:
        issuer = DevIssuer.load_or_create(tmp / "issuer")
        jwks, issuer_url = await serve_jwks(issuer)
        token = issuer.mint(SUBJECT, issuer=issuer_url, azp=AZP, ttl_s=3600)
        request = authsvc_pb2.VerifyTokenRequest(token=token).SerializeToString()
        body = tmp / "request.grpc"
        body.write_bytes(grpc_frame(request))
        servers: list[Server] = []
        try:
            async with private_mongo(tmp) as mongo:
                await seed(mongo.uri)
                for name, workers in ((ONE, 1), (TWO, 2)):
                    port, metrics_port = free_port(), free_port()
                    env = child_env(
                        MONGODB_URI=mongo.uri, MONGODB_DB=DB, CLERK_FRONTEND_API_URL=issuer_url,
                        CLERK_AUTHORIZED_PARTIES=AZP, AUTHSVC_GRPC_ADDR=f"127.0.0.1:{port}",
                        AUTHSVC_METRICS_ADDR=f"127.0.0.1:{metrics_port}", AUTHSVC_LOG_LEVEL="warning",
                        AUTHSVC_WORKERS=str(workers),
                    )  # fmt: skip
                    process = ServerProcess(
                        name, [sys.executable, "-m", "authsvc", "grpc"], env=env, logfile=tmp / f"grpc{workers}.log"
                    )
                    servers.append(Server(name, process, port, metrics_port))
                    process.start()
                for server in servers:
                    await wait_serving(server)
                reply = await raw_call(servers[0].port, request)
                expected = authsvc_pb2.VerifyTokenResponse.FromString(reply)
                for _ in range(8):  # every worker answers the same reply (map order aside)
                    other = await raw_call(servers[1].port, request)
                    assert authsvc_pb2.VerifyTokenResponse.FromString(other) == expected and len(other) == len(reply)
                replies = tmp / "replies.json"
                replies.write_text(json.dumps({request.hex(): reply.hex()}))
                for name, extra in ((BARE, []), (BARE_I, ["--interceptor"])):
                    port = free_port()
                    argv = ["-m", "bench.bare", str(port), str(replies), *extra]
                    process = ServerProcess(
                        name, [sys.executable, *argv], env=child_env(), logfile=tmp / f"{len(servers)}.log"
                    )
                    servers.append(Server(name, process, port))
                    process.start()
                for server in servers[2:]:
                    await wait_serving_bare(server, request, reply)
                by_name = {s.name: s for s in servers}
                runs: dict[str, list[Figure]] = {name: [] for name in (BARE, TWO, ONE, BARE_I)}
                order = list(runs)
                for round_ in range(rounds):
                    # A B C D, then D C B A: each pair of servers runs A-B-B-A across two rounds.
                    for name in order if round_ % 2 == 0 else order[::-1]:
                        runs[name].append(await drive(name, by_name[name], body, duration_s, warmup_s, tmp, profile))
                        by_name[name].process.check_alive()
                figures = [median_figure(name, found) for name, found in runs.items()]
                for server in servers[:2]:
                    assert server.metrics_port is not None
                    codes = await handled(server.metrics_port)
                    bad = {code: n for code, n in codes.items() if code != "OK"}
                    notes.append(
                        f"{server.name}: VerifyToken handled {codes.get('OK', 0):,.0f} OK"
                        + (f", NOT OK: {bad}" if bad else ", none failed")
                    )
        finally:
            for server in servers:
                server.process.stop()
            await jwks.cleanup()
    notes.append(
        f"verify: h2load -c {CONNECTIONS} -m {STREAMS} -t 1, {duration_s:g} s after {warmup_s:g} s warm-up, "
        f"{rounds} rounds (order reversed every other round), the median round shown; the p50 column is h2load's mean"
    )
    return figures, ratio_lines({name: [f.rps for f in found] for name, found in runs.items()}), notes


async def wait_serving_bare(server: Server, request: bytes, reply: bytes, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.process.check_alive()
        try:
            if await raw_call(server.port, request) == reply:
                return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.name} did not serve within {timeout_s:.0f}s:\n{server.process.tail()}")


def ratio_lines(rps: dict[str, list[float]]) -> list[str]:
    """Each ratio over the rounds (one pair per round, in the order they ran): median and spread."""
    if not all(rps.get(name) for name in (BARE, BARE_I, ONE, TWO)):
        return []
    bare_i = pair_ratios(rps[BARE_I], rps[BARE])
    per_call_us = Spread([(1 / i - 1 / b) * 1e6 for i, b in zip(rps[BARE_I], rps[BARE], strict=True)])
    return [
        ratio_line("2 workers / bare grpc.aio", pair_ratios(rps[TWO], rps[BARE]), 0.9),
        ratio_line("2 workers / 1 worker", pair_ratios(rps[TWO], rps[ONE])),
        ratio_line("1 worker / bare grpc.aio", pair_ratios(rps[ONE], rps[BARE])),
        ratio_line("bare + interceptor / bare", bare_i) + f"  ({per_call_us.text('.1f')} us more per call)",
    ]
