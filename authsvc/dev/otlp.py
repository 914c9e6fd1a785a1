"""A local OTLP trace receiver on loopback: ``TraceService/Export`` over gRPC and ``POST /v1/traces`` over HTTP.

What an OpenTelemetry collector receives, decoded with OpenTelemetry's own
protos (``opentelemetry-proto``), for the tests and the tracing benchmark. It
keeps every request's raw bytes (to search them for what must never be
exported) and its spans; with ``keep=False`` it only counts spans (a sink
under load).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
HTTP_PATH = "/v1/traces"


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class Span:
    """One exported span, decoded: ids in hex, attributes as Python values."""

    service: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 server, 3 client
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status: int = 0  # 0 unset, 1 ok, 2 error

    SERVER, CLIENT = 2, 3


def decode(body: bytes) -> list[Span]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                spans.append(
                    Span(
                        service=str(resource.get("service.name", "")),
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        status=span.status.code,
                    )
                )
    return spans


class OtlpReceiver:
    """Both OTLP transports on 127.0.0.1, port 0: ``grpc_endpoint`` and ``http_endpoint`` for ``OTEL_*``."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.raw: list[bytes] = []
        self.spans: list[Span] = []
        self.requests = 0
        self.span_count = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _record(self, body: bytes) -> None:
        self.requests += 1
        if self.keep:
            self.raw.append(body)
            spans = decode(body)
            self.spans += spans
            self.span_count += len(spans)
        else:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            self.span_count += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)

    async def _export(self, body: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self._record(body)
        return trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    async def _post(self, request: web.Request) -> web.Response:
        self._record(await request.read())
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def start(self, grpc_port: int = 0) -> OtlpReceiver:
        """Listen (gRPC on ``grpc_port``, HTTP on a free port); RuntimeError when ``grpc_port`` is taken."""
        server = grpc.aio.server()
        handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(self._export)  # bytes
        service, method = EXPORT.lstrip("/").rsplit("/", 1)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        self.grpc_port = server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await server.start()
        self._grpc = server
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(HTTP_PATH, self._post)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._http = runner
        self.http_port = runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(None)
            self._grpc = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None

    async def __aenter__(self) -> OtlpReceiver:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_for(self, found: Callable[[list[Span]], bool], timeout_s: float = 15.0) -> list[Span]:
        """The spans received so far once ``found(spans)`` holds; AssertionError with them after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not found(self.spans):
            if time.monotonic() > deadline:
                got = "\n".join(
                    f"  {s.trace_id} {s.span_id} <- {s.parent_span_id or '-':16} {s.name}" for s in self.spans
                )
                raise AssertionError(f"spans not received within {timeout_s:g}s; got:\n{got}")
            await asyncio.sleep(0.05)
        return list(self.spans)


async def _serve_until_signalled() -> None:
    """Both receivers, counting; print ``grpc PORT http PORT`` and serve until SIGTERM/SIGINT."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with OtlpReceiver(keep=False) as receiver:
        print(f"grpc {receiver.grpc_port} http {receiver.http_port}", flush=True)
        await stop.wait()


if __name__ == "__main__":  # a receiver in a process of its own, for a measurement whose CPU it must not share
    asyncio.run(_serve_until_signalled())
