"""The caller's trace context on every call, when the calling service uses OpenTelemetry.

OpenTelemetry is not a dependency of this package: the import is tried once,
when this module is imported. Without it :func:`with_trace_context` returns
the metadata as given, at no cost; with it, the current context's
``traceparent`` (and whatever else the configured propagators carry,
``OTEL_PROPAGATORS``) is added, so authsvc's spans join the caller's trace.
"""

from __future__ import annotations

from collections.abc import Callable

Metadata = tuple[tuple[str, str], ...]


def _unchanged(metadata: Metadata) -> Metadata:
    return metadata


with_trace_context: Callable[[Metadata], Metadata] = _unchanged

try:
    from opentelemetry.propagate import inject
except ImportError:  # OpenTelemetry is not installed in the calling service
    pass
else:

    def _propagated(metadata: Metadata) -> Metadata:
        carrier: dict[str, str] = {}
        inject(carrier)
        return (*metadata, *carrier.items()) if carrier else metadata

    with_trace_context = _propagated
