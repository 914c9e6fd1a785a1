"""What tracing costs VerifyToken: ``authsvc grpc`` without the extra, with tracing off, and on at 100% and 1%.

Four ``authsvc grpc`` processes (one worker each) over one private embedded
database, one synced user and a JWKS served by this process, all idle but the
one under load, driven by h2load exactly as :mod:`bench.verify` drives them
(one token, 8 connections x 8 streams, no ``traceparent``: every call is a
root span):

- ``baseline``: ``python -m authsvc.dev.nootel grpc``, as installed without the ``otel`` extra;
- ``off``: the extra installed, no ``OTEL_EXPORTER_OTLP_ENDPOINT``;
- ``on 100%``: exporting over OTLP/gRPC (the default protocol) to a receiver in
  this process (which only counts spans), the SDK's default sampler (``parentbased_always_on``);
- ``on 1%``: the same with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.01``.

Throughput on a shared 2-core machine moves by 10-20% between identical
servers, more than what is measured here; so the run also times the one
thing tracing adds to a call, in this process and in CPU seconds: the
tracing interceptor (:class:`service.grpctracing.TracingInterceptor`) around an
empty handler, at 100% (with the batch processor and OTLP/gRPC exporter
running) and at 1%, against the bare handler. With tracing off there is no
interceptor at all.

Everything else is the SDK's defaults (batching: ``OTEL_BSP_*``). Rounds
interleave the servers; each figure is the median round, and the ratios
compare figures of this same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider

from authsvc.dev.issuer import DevIssuer
from authsvc.dev.otlp import OtlpReceiver
from authsvc.dev.procs import ServerProcess, child_env, printed
from authsvc_client.v1 import authsvc_pb2
from bench.common import Figure, Spread, median_figure, pair_ratios, private_mongo, ratio_line, serve_jwks, workdir
from bench.verify import AZP, DB, SUBJECT, Server, drive, grpc_frame, handled, seed, wait_serving
from service.embedded import free_port

BASELINE, OFF, ON, SAMPLED = (
    "tracing: baseline (no extra)",
    "tracing: off",
    "tracing: on, 100%",
    "tracing: on, 1%",
)
SERVERS = (BASELINE, OFF, ON, SAMPLED)
ONE_IN_100 = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}


def servers_env(receiver: OtlpReceiver) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Per server: the command after the interpreter, and its OpenTelemetry variables."""
    exporting = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_endpoint}
    authsvc = ["-m", "authsvc", "grpc"]
    return {
        BASELINE: (["-m", "authsvc.dev.nootel", "grpc"], {}),
        OFF: (authsvc, {}),
        ON: (authsvc, exporting),
        SAMPLED: (authsvc, {**exporting, **ONE_IN_100}),
    }


async def run(
    *, duration_s: float, warmup_s: float, rounds: int, profile: Path | None = None
) -> tuple[list[Figure], list[str], list[str]]:
    """Start the four servers, run the interleaved rounds; the median figures, the ratio lines, notes."""
    notes: list[str] = []
    with workdir("authsvc-bench-tracing-") as tmp:
        issuer = DevIssuer.load_or_create(tmp / "issuer")
        jwks, issuer_url = await serve_jwks(issuer)
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
                for round_ in range(rounds):
                    # A B C D, then D C B A: each pair of servers runs A-B-B-A across two rounds.
                    for name in SERVERS if round_ % 2 == 0 else SERVERS[::-1]:
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
                    f"{calls[ON] + calls[SAMPLED]:,.0f} traced calls ({calls[ON]:,.0f} at 100%, "
                    f"{calls[SAMPLED]:,.0f} at 1%; the SDK drops spans when its queue is full)"
                )
        finally:
            for server in servers:
                server.process.stop()
            await receiver.close()
            await jwks.cleanup()
    return figures, ratio_lines(runs), notes


def ratio_lines(runs: dict[str, list[Figure]]) -> list[str]:
    """Per round, throughput against the baseline's and the server's CPU per call against the baseline's."""
    if not all(runs.get(name) for name in SERVERS):
        return []

    def cpu_us(figure: Figure) -> float:
        return figure.cpu.get("server", 0.0) / figure.rps * 1e6 if figure.rps else 0.0

    lines = []
    for name, label in ((OFF, "off"), (ON, "on, 100%"), (SAMPLED, "on, 1%")):
        ratios = pair_ratios([f.rps for f in runs[name]], [f.rps for f in runs[BASELINE]])
        extra = Spread([cpu_us(f) - cpu_us(b) for f, b in zip(runs[name], runs[BASELINE], strict=True)])
        cpu = f"  (server CPU {extra.text('+.0f')} us a call)"
        lines.append(ratio_line(f"tracing {label} / no extra", ratios) + cpu)
    return lines


class _Details:
    method = "/authsvc.v1.AuthService/VerifyToken"
    invocation_metadata = ()


class _Context:
    """What the tracing interceptor reads of a ServicerContext: the metadata (no traceparent), the code."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-c/52.0.0"), ("x-authsvc-key", "k" * 32))

    def code(self) -> None:
        return None


async def _calls_per_cpu_s(
    behavior: Callable[[Any, Any], Awaitable[Any]], count: int, provider: TracerProvider | None
) -> float:
    context = _Context()
    began = time.process_time()  # every thread of this process: the exporter's too
    for _ in range(count):
        await behavior(b"", context)
    if provider is not None:
        provider.force_flush()  # the export of these calls' spans counts too
    return count / (time.process_time() - began)


async def interceptor_cost(*, calls: int = 20_000, passes: int = 5) -> list[str]:
    """CPU per call of the tracing interceptor around an empty handler, at 100% and 1%, as printable lines."""
    from service.grpctracing import TracingInterceptor
    from service.otel import exporting_provider

    async def empty(request: Any, context: Any) -> bytes:
        return b""

    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(empty)

    async def continuation(details: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    with workdir("authsvc-bench-otlp-") as tmp:
        # The receiver in a process of its own: its CPU is not the interceptor's.
        receiver = ServerProcess(
            "otlp", [sys.executable, "-m", "authsvc.dev.otlp"], env=child_env(), logfile=tmp / "otlp.log"
        )
        await receiver.start_ready(printed("grpc "))
        try:
            port = receiver.output().split()[1]
            behaviors: dict[str, tuple[Callable[[Any, Any], Awaitable[Any]], TracerProvider | None]] = {
                "bare": (empty, None)
            }
            for label, sampler in (("100%", {}), ("1%", ONE_IN_100)):
                # every span queued, none dropped: the export of each is part of the cost
                queue = {"OTEL_BSP_MAX_QUEUE_SIZE": str(calls * 2)}
                with _environ(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}", **queue, **sampler):
                    provider = exporting_provider("authsvc-bench", "grpc")
                tracer = provider.get_tracer("bench")
                details: Any = _Details()
                wrapped = await TracingInterceptor(tracer).intercept_service(continuation, details)
                assert wrapped is not None and wrapped.unary_unary is not None
                behaviors[label] = (wrapped.unary_unary, provider)
            found: dict[str, list[float]] = {name: [] for name in behaviors}
            for _ in range(passes):
                for name, (behavior, provider_) in behaviors.items():
                    found[name].append(await _calls_per_cpu_s(behavior, calls, provider_))
            for _, provider_ in behaviors.values():
                if provider_ is not None:
                    await asyncio.to_thread(provider_.shutdown)
        finally:
            receiver.stop()
    rate = {name: statistics.median(values) for name, values in found.items()}
    cost = {name: (1 / rate[name] - 1 / rate["bare"]) * 1e6 for name in ("100%", "1%")}
    return [
        f"tracing interceptor: {calls:,} calls of an empty handler x {passes} passes, medians (CPU of one process, "
        "the export of every span included)",
        f"  on, 100%: {cost['100%']:.1f} us per call; on, 1%: {cost['1%']:.1f} us per call; off: no interceptor",
    ]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """The SDK reads its configuration from the environment: set ``values`` while the provider is built."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
