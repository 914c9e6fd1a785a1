"""The OpenTelemetry SDK of one process: provider, OTLP exporter, instrumentations, log correlation.

Imported only when tracing is on (:func:`service.tracing.traced`); it needs
the ``otel`` extra. The SDK reads its own variables: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the resource), ``OTEL_TRACES_SAMPLER`` and its
argument, ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, TLS, timeout),
``OTEL_BSP_*`` (batching). The provider is never made the global one: the
composition root owns it and shuts it down (a global provider can be set
only once per process), and every instrumentation is given it explicitly:

- gRPC: :class:`service.grpctracing.TracingInterceptor`, outermost on the server;
- the sidecar: opentelemetry-instrumentation-aiohttp-server (probes and
  ``/metrics`` excluded);
- MongoDB: opentelemetry-instrumentation-pymongo, without statements (they hold emails);
- Clerk's Backend API and the JWKS: opentelemetry-instrumentation-aiohttp-client.

Client spans with no parent (health pings, the change stream, the JWKS
refresh: background work, not a call's) are dropped by the sampler
(:class:`CallsOnly`), or each poll would be a trace of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.instrumentation.pymongo import PymongoInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes

from service.grpctracing import TracingInterceptor

# Set in the environment unless the operator set them: the instrumentations read them when instrumenting.
ENV_DEFAULTS = {
    # Current HTTP conventions: http.response.status_code, http.request.method, url.full (not http.status_code...).
    "OTEL_SEMCONV_STABILITY_OPT_IN": "http",
}
# At shutdown, what is still queued is exported for at most this long (an unreachable collector must
# not hold a stopping process past its drain budget).
FLUSH_S = 2.0
# Probes and scrapes are not traced (the aiohttp server instrumentation matches these on the path).
UNTRACED_PATHS = "^/healthz$,^/readyz$,^/metrics$"


def exporter_class(protocol: str) -> type[SpanExporter]:
    """The OTLP span exporter of ``protocol`` (``grpc`` or ``http/protobuf``); ImportError without the extra."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter


class CallsOnly(Sampler):
    """``inner``'s decision, except that a client span without a parent span is dropped."""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.CLIENT and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self._inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"CallsOnly{{{self._inner.get_description()}}}"


class SpanIds(logging.Filter):
    """Stamps ``trace_id`` and ``span_id`` on a record written inside a span (JsonFormatter writes them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = trace.format_trace_id(context.trace_id)
            record.span_id = trace.format_span_id(context.span_id)
        return True


def resource(default_name: str) -> Resource:
    """The SDK's resource from the environment; ``service.name`` is ``default_name`` unless set there."""
    named = SERVICE_NAME in OTELResourceDetector().detect().attributes  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    return Resource.create({} if named else {SERVICE_NAME: default_name})


def exporting_provider(service_name: str, protocol: str) -> TracerProvider:
    """A tracer provider as the SDK's variables configure it, sampling by :class:`CallsOnly`, exporting over OTLP."""
    provider = TracerProvider(resource=resource(service_name), shutdown_on_exit=False)
    provider.sampler = CallsOnly(provider.sampler)  # before any tracer exists: tracers copy it
    provider.add_span_processor(BatchSpanProcessor(exporter_class(protocol)()))
    return provider


class OtelTracing:
    """A tracer provider exporting over OTLP, the instrumentations given it, and log correlation.

    The instrumentors are singletons that patch aiohttp and register with
    PyMongo for the whole process: one process traces with one provider.
    """

    def __init__(self, provider: TracerProvider, instrumentors: Sequence[BaseInstrumentor]) -> None:
        self.provider = provider
        self._instrumentors = instrumentors
        self._log_filter = SpanIds()
        self._handlers = list(logging.getLogger().handlers)
        for handler in self._handlers:
            handler.addFilter(self._log_filter)

    @classmethod
    def start(cls, service_name: str, protocol: str) -> OtelTracing:
        """Build the provider (``service_name`` unless ``OTEL_SERVICE_NAME`` says otherwise) and instrument."""
        for name, value in ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if not os.environ.get("OTEL_PYTHON_EXCLUDED_URLS"):
            os.environ.setdefault("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", UNTRACED_PATHS)
        provider = exporting_provider(service_name, protocol)
        server, client, mongo = AioHttpServerInstrumentor(), AioHttpClientInstrumentor(), PymongoInstrumentor()
        server.instrument(tracer_provider=provider)
        client.instrument(tracer_provider=provider)
        mongo.instrument(tracer_provider=provider, capture_statement=False)  # statements hold emails
        return cls(provider, [server, client, mongo])

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        """The gRPC server interceptor that opens each call's span (outermost of the server's)."""
        return TracingInterceptor(self.provider.get_tracer("authsvc"))

    async def shutdown(self) -> None:
        """Stop instrumenting, stop stamping log lines, export what is left for at most :data:`FLUSH_S`.

        The SDK's own shutdown waits up to 30 s (and the exporter retries up to
        its timeout) for a collector that does not answer; it runs in a daemon
        thread here, which the process does not wait for past the bound.
        """
        for instrumentor in self._instrumentors:
            instrumentor.uninstrument()
        for handler in self._handlers:
            handler.removeFilter(self._log_filter)
        flushing = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        flushing.start()
        await asyncio.to_thread(flushing.join, FLUSH_S)
