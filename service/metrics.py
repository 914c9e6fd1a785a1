"""Every Prometheus metric of authsvc, defined once (names and labels as docs/design.md lists them).

In a multi-worker process, ``PROMETHEUS_MULTIPROC_DIR`` must be set before
``prometheus_client`` is first imported, so that ``/metrics`` sums every
worker; the worker supervisor sees to that. Gauges are never summed: each
names its multiprocess mode.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram

# go-grpc-prometheus names, for every RPC served.
GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, regardless of success or failure.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

DENIALS = Counter("authsvc_denials", "Calls denied, by method and ErrorInfo reason.", ["method", "reason"])
CALLS = Counter(
    "authsvc_calls",
    "Calls by caller (AUTHSVC_CALLERS_FILE name; empty: no known caller), short method name and gRPC code.",
    ["caller", "method", "code"],
)
TOKEN_CACHE = Counter("authsvc_token_cache", "Verified-token cache lookups.", ["result"])
USER_CACHE = Counter("authsvc_user_cache", "User cache lookups.", ["result"])
JWKS_FETCHES = Counter("authsvc_jwks_fetches", "JWKS fetches, by outcome.", ["outcome"])
WEBHOOK_DELIVERIES = Counter(
    "authsvc_webhook_deliveries", "Webhook deliveries, by event type and outcome.", ["type", "outcome"]
)
WEBHOOK_DELIVERY_SECONDS = Histogram(
    "authsvc_webhook_delivery_seconds",
    "Time to answer a webhook delivery.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CLERK_REQUESTS = Counter(
    "authsvc_clerk_requests", "Clerk Backend API requests, by operation and status.", ["op", "status"]
)
SYNC_USERS = Counter("authsvc_sync_users", "Users seen by a sync, by outcome.", ["outcome"])


# Gauges are made on first use, by the processes that have a value for them: in multiprocess mode a
# gauge gets a value (0) for every process that creates it, and the parent of the workers (which
# never watches the database) would pin the minimum at 0; an unlabelled gauge is exported, as 0, from
# the moment it exists, where 0 would be a lie. "live" modes forget dead workers.
@functools.cache
def database_up() -> Gauge:
    """``authsvc_database_up``: 1 while MongoDB answers this process, else 0; the minimum over workers."""
    return Gauge("authsvc_database_up", "1 while MongoDB answers this process, else 0.", multiprocess_mode="livemin")


@functools.cache
def user_cache_stale_seconds() -> Gauge:
    """``authsvc_user_cache_stale_seconds``: 0 while the change stream is live; the maximum over workers."""
    return Gauge(
        "authsvc_user_cache_stale_seconds",
        "0 while the users change stream is live, else seconds since it last confirmed the cache.",
        multiprocess_mode="livemax",
    )


@functools.cache
def revoked_sessions() -> Gauge:
    """``authsvc_revoked_sessions``: the revoked sessions held in this process; the smallest set of any live worker."""
    return Gauge(
        "authsvc_revoked_sessions", "Revoked sessions held in this process's set.", multiprocess_mode="livemin"
    )


@functools.cache
def jwks_age() -> Gauge:
    """``authsvc grpc``: seconds since the last successful JWKS fetch (+Inf before the first, 0 with CLERK_JWT_KEY).

    With workers, the maximum over the live ones (a dead worker's last age is not kept).
    """
    return Gauge(
        "authsvc_jwks_age_seconds",
        "Seconds since the last successful JWKS fetch (+Inf before the first; 0 with CLERK_JWT_KEY).",
        multiprocess_mode="livemax",
    )


@functools.cache
def sync_last_success() -> Gauge:
    """The sidecar: when a periodic repair run last completed (Unix time); with workers, the latest."""
    return Gauge(
        "authsvc_sync_last_success_timestamp_seconds",
        "When a periodic repair (AUTHSVC_SYNC_INTERVAL_S) last completed, in Unix seconds.",
        multiprocess_mode="max",
    )
