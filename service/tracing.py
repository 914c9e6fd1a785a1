"""Whether this process traces, what it lacks to, and the tracing of one process as a resource.

Tracing is configured only by OpenTelemetry's own variables, which its SDK
reads from the environment (not from ``.env``): it is on when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
and ``OTEL_SDK_DISABLED`` is not ``true``. Off, nothing of the SDK is imported,
no tracer exists and no interceptor or middleware is added: the hot path runs
exactly as without the ``otel`` extra. On, :mod:`service.otel` (which needs the
extra) builds the provider that the composition root owns.

:func:`annotate` adds attributes to the current span from code that must not
depend on the extra (the webhook handler); without a span it does nothing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import grpc

from service.startup import StartupError

try:  # the API alone; it is a no-op without a provider (the SDK)
    from opentelemetry import trace as _trace
except ImportError:  # the otel extra is not installed
    _trace = None  # type: ignore[assignment]

ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
PROTOCOLS = ("grpc", "http/protobuf")
DEFAULT_PROTOCOL = "grpc"  # as the OpenTelemetry Python SDK's own configuration defaults


class Tracing(Protocol):
    """The tracing of one process (:class:`service.otel.OtelTracing`), as the composition roots use it."""

    def server_interceptor(self) -> grpc.aio.ServerInterceptor: ...


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether an OTLP endpoint is set and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINTS)


def protocol(environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The OTLP protocol for traces and the variable that chose it (the traces-specific one first)."""
    for name in PROTOCOL_VARS:
        value = environ.get(name, "").strip()
        if value:
            return value, name
    return DEFAULT_PROTOCOL, PROTOCOL_VARS[1]


def problems(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Why tracing cannot start as configured (one line each); none when it is off."""
    if not wanted(environ):
        return []
    chosen, variable = protocol(environ)
    if chosen not in PROTOCOLS:
        return [f"{variable} must be grpc or http/protobuf, got {chosen!r}"]
    endpoint = next(name for name in ENDPOINTS if environ.get(name, "").strip())
    try:
        from service import otel

        otel.exporter_class(chosen)
    except ImportError as exc:
        if exc.name is not None and _present(exc.name):
            return [
                f"{endpoint} is set but OpenTelemetry does not import ({exc}): xds-protos ships an older "
                "copy of opentelemetry/proto; reinstall opentelemetry-proto's own files last: "
                "pip install --force-reinstall --no-deps opentelemetry-proto"
            ]
        return [f"{endpoint} is set but OpenTelemetry is not installed ({exc.name}): pip install 'authsvc[otel]'"]
    return []


def _present(module: str) -> bool:
    """Whether ``module`` is installed (it may still fail to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


@contextlib.asynccontextmanager
async def traced(service_name: str) -> AsyncIterator[Tracing | None]:
    """This process's tracing until the block exits (then its spans are flushed); None when tracing is off.

    ``service_name`` is the default of ``OTEL_SERVICE_NAME``. Raises
    :class:`StartupError` when tracing is asked for but cannot start.
    """
    if not wanted():
        yield None
        return
    found = problems()
    if found:
        raise StartupError(found[0])
    from service.otel import OtelTracing

    tracing = OtelTracing.start(service_name, protocol()[0])
    try:
        yield tracing
    finally:
        await tracing.shutdown()


def annotate(attributes: Mapping[str, str | int]) -> None:
    """Set ``attributes`` on the current span, if tracing is on and there is one."""
    if _trace is not None:
        _trace.get_current_span().set_attributes(attributes)
