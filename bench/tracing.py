"""What tracing costs VerifyToken: ``authsvc grpc`` without the extra, with tracing off, and on at 100% and 1%.

Four ``authsvc grpc`` processes (one worker each) over one private embedded
database, one synced user and a JWKS served by this process, all idle but the
one under load, driven by h2load exactly as :mod:`bench.verify` drives them
(one token, 8 connections x 8 streams, no ``traceparent``: every call is a
root span):

- ``baseline``: ``python -m authsvc.dev.nootel grpc``, as installed without the ``otel`` extra;
- ``off``: the extra installed, no ``OTEL_EXPORTER_OTLP_ENDPOINT``;
- ``on 100%``: exporting over OTLP/HTTP (the default protocol) to a receiver in
  this process (which only counts spans), the SDK's default sampler (``parentbased_always_on``);
- ``on 1%``: the same with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.01``;
- ``on 1%, OTLP/gRPC``: the same over ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``, whose
  exporter (a sync grpcio channel) shares the process with the grpc.aio server.

Everything else is the SDK's defaults (batching: ``OTEL_BSP_*``). Rounds
interleave the servers; each figure is the median round, and the ratios
compare figures of this same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web

from authsvc.dev.issuer import DevIssuer, jwks_routes
from authsvc.dev.otlp import OtlpReceiver
from authsvc.dev.procs import ServerProcess, child_env
from authsvc_client.v1 import authsvc_pb2
from bench.common import Figure, private_mongo, workdir
from bench.verify import AZP, DB, SUBJECT, Server, drive, grpc_frame, handled, median_figure, seed, wait_serving
from service.embedded import free_port

BASELINE, OFF, ON, SAMPLED, OVER_GRPC = (
    "tracing: baseline (no extra)",
    "tracing: off",
    "tracing: on, 100%",
    "tracing: on, 1%",
    "tracing: on, 1%, OTLP/gRPC",
)
SERVERS = (BASELINE, OFF, ON, SAMPLED, OVER_GRPC)


def servers_env(receiver: OtlpReceiver) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per server: the command after the interpreter, and its OpenTelemetry variables."""
    exporting = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.http_endpoint}
    one_in_100 = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    over_grpc = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    authsvc = ["-m", "authsvc", "grpc"]
    return {
        BASELINE: (["-m", "authsvc.dev.nootel", "grpc"], {}),
        OFF: (authsvc, {}),
        ON: (authsvc, exporting),
        SAMPLED: (authsvc, {**exporting, **one_in_100}),
        OVER_GRPC: (authsvc, {**over_grpc, **one_in_100}),
    }


async def run(
    *, duration_s: float, warmup_s: float, rounds: int, profile: Path | None = None
) -> tuple[list[Figure], list[str]]:
    """Start the four servers, run the interleaved rounds, return the median figures and notes."""
    notes: list[str] = []
    with workdir("authsvc-bench-tracing-") as tmp:
        issuer = DevIssuer.load_or_create(tmp / "issuer")
        jwks_port = free_port()
        issuer_url = f"http://127.0.0.1:{jwks_port}"
        app = web.Application()
        app.add_routes(jwks_routes(issuer))
        jwks = web.AppRunner(app, access_log=None)
        await jwks.setup()
        await web.TCPSite(jwks, "127.0.0.1", jwks_port).start()
        token = issuer.mint(SUBJECT, issuer=issuer_url, azp=AZP, ttl_s=3600)
        body = tmp / "request.grpc"
        body.write_bytes(grpc_frame(authsvc_pb2.VerifyTokenRequest(token=token).SerializeToString()))
        servers: list[Server] = []
        receiver = await OtlpReceiver(keep=False).start()
        try:
            async with private_mongo(tmp) as mongo:
                await seed(mongo.uri)
                for index, (name, (argv, otel)) in enumerate(servers_env(receiver).items()):
                    port, metrics_port = free_port(), free_port()
                    env = child_env(
                        MONGODB_URI=mongo.uri, MONGODB_DB=DB, CLERK_FRONTEND_API_URL=issuer_url,
                        CLERK_AUTHORIZED_PARTIES=AZP, AUTHSVC_GRPC_ADDR=f"127.0.0.1:{port}",
                        AUTHSVC_METRICS_ADDR=f"127.0.0.1:{metrics_port}", AUTHSVC_LOG_LEVEL="warning", **otel,
                    )  # fmt: skip
                    process = ServerProcess(name, [sys.executable, *argv], env=env, logfile=tmp / f"grpc{index}.log")
                    servers.append(Server(name, process, port, metrics_port))
                    process.start()
                for server in servers:
                    await wait_serving(server)
                by_name = {s.name: s for s in servers}
                runs: dict[str, list[Figure]] = {name: [] for name in SERVERS}
                for _ in range(rounds):
                    for name in runs:
                        runs[name].append(await drive(name, by_name[name], body, duration_s, warmup_s, tmp, profile))
                        by_name[name].process.check_alive()
                figures = [median_figure(name, found) for name, found in runs.items()]
                calls = {}
                for server in servers:
                    assert server.metrics_port is not None
                    codes = await handled(server.metrics_port)
                    calls[server.name] = codes.get("OK", 0)
                    bad = {code: n for code, n in codes.items() if code != "OK"}
                    if bad:
                        notes.append(f"{server.name}: VerifyToken NOT OK: {bad}")
                for server in servers:
                    server.process.stop()  # flushes what the exporters still hold
                notes.append(
                    f"tracing: the receiver got {receiver.span_count:,} spans for "
                    f"{calls[ON] + calls[SAMPLED] + calls[OVER_GRPC]:,.0f} traced calls ({calls[ON]:,.0f} at 100%, "
                    f"{calls[SAMPLED] + calls[OVER_GRPC]:,.0f} at 1%; the SDK drops spans when its queue is full)"
                )
        finally:
            for server in servers:
                server.process.stop()
            await receiver.close()
            await jwks.cleanup()
    return figures, notes


def ratio_lines(figures: list[Figure]) -> list[str]:
    """Throughput against the baseline's, and the server's CPU per call against the baseline's (machine noise aside)."""
    by = {f.name: f for f in figures}
    if not all(name in by and by[name].rps for name in SERVERS):
        return []

    def cpu_us(name: str) -> float:
        return by[name].cpu.get("server", 0.0) / by[name].rps * 1e6

    lines = []
    labels = ((OFF, "off"), (ON, "on, 100%"), (SAMPLED, "on, 1%"), (OVER_GRPC, "on, 1%, OTLP/gRPC"))
    for name, label in labels:
        ratio = by[name].rps / by[BASELINE].rps
        extra = cpu_us(name) - cpu_us(BASELINE)
        lines.append(f"  {'tracing ' + label + ' / no extra':<37} {ratio:.2f}  (server CPU {extra:+.0f} us per call)")
    return lines
