"""The async client: VerifyToken, GetUser and SetRole with typed results and errors.

Every call has a deadline (``timeout_s``, 5 s by default). The read calls
(VerifyToken, GetUser) are retried on ``UNAVAILABLE`` by gRPC's own retry
policy (exponential backoff from 0.1 s, at most ``attempts`` tries); SetRole
is never retried, since a retry could apply a change twice in a race with
another writer. Nothing is cached here: every answer is the server's, so a
role change, a ban or a delete is seen by the next call. When the calling
service uses OpenTelemetry, each call carries its current trace context
(:mod:`authsvc_client.tracecontext`).

The target is any gRPC target: ``host:port``, ``dns:///host:port``,
``ipv4:10.0.0.1:50051,10.0.0.2:50051``. A target that names several servers
(a ``dns:`` name, for a Kubernetes headless Service, or an ``ipv4:``/``ipv6:``
list) is balanced: ``round_robin`` over every address, with gRPC client-side
health checking on ``authsvc.v1.AuthService``, so a replica that reports
``NOT_SERVING`` (draining on SIGTERM) gets no new calls. A plain
``host:port`` (a ClusterIP Service) keeps one connection, which the server
ends after ``AUTHSVC_MAX_CONNECTION_AGE_S`` so it rebalances.
"""

from __future__ import annotations

import json
from types import TracebackType

import grpc

from authsvc_client.errors import from_rpc_error
from authsvc_client.models import Identity, User
from authsvc_client.roles import Role
from authsvc_client.tracecontext import with_trace_context
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_ATTEMPTS = 4
SERVICE = authsvc_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
READ_METHODS = ("VerifyToken", "GetUser")
# The metadata that carries a caller's key (the server's AUTHSVC_CALLERS_FILE lists its SHA-256).
KEY_METADATA = "x-authsvc-key"


# With several servers, a replaced one must be found again quickly: gRPC re-resolves a name only when a
# connection fails or ends (at most every 30 s by default) and backs reconnections off up to 120 s.
BALANCED_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


def balanced(target: str) -> bool:
    """True when ``target`` may name several servers: a ``dns:`` target, or an ``ipv4:``/``ipv6:`` list."""
    scheme, _, rest = target.partition(":")
    return scheme == "dns" or (scheme in ("ipv4", "ipv6") and "," in rest)


def service_config(attempts: int = DEFAULT_ATTEMPTS, *, balance: bool = False) -> str:
    """The gRPC service config: retries with backoff on UNAVAILABLE for the read methods only;
    with ``balance``, ``round_robin`` over healthy servers (client-side health checking on AuthService)."""
    config: dict[str, object] = {"methodConfig": []}
    if attempts >= 2:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE, "method": method} for method in READ_METHODS],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    if balance:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return json.dumps(config)


def _async_stub(channel: grpc.aio.Channel) -> authsvc_pb2_grpc.AuthServiceAsyncStub:
    # The stub's __new__ overloads pick the async stub for an aio channel; without
    # grpc's type stubs mypy cannot tell the channels apart.
    return authsvc_pb2_grpc.AuthServiceStub(channel)  # type: ignore[return-value, unused-ignore]


class AuthsvcClient:
    """An authsvc connection: ``async with AuthsvcClient("authsvc:50051") as authsvc: ...``.

    Cheap to build anywhere; the channel opens on the first call and lives
    until :meth:`close` (one client per process is the usual shape).

    ``credentials`` selects TLS (``grpc.ssl_channel_credentials(...)``);
    without it the channel is plaintext. ``attempts`` bounds the tries of a
    read call (1 disables retries). ``balance`` (default: :func:`balanced`
    of the target) spreads calls ``round_robin`` over the healthy servers.
    ``key`` is this service's caller key, sent as ``x-authsvc-key`` metadata
    on every call when the server lists its callers (``AUTHSVC_CALLERS_FILE``).
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        attempts: int = DEFAULT_ATTEMPTS,
        balance: bool | None = None,
        key: str | None = None,
    ) -> None:
        self._target = target
        self._metadata: tuple[tuple[str, str], ...] = ((KEY_METADATA, key),) if key else ()
        self._credentials = credentials
        balance = balanced(target) if balance is None else balance
        self._options: list[tuple[str, str | int]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(attempts, balance=balance)),
        ]
        if balance:
            self._options += BALANCED_OPTIONS
        self._channel: grpc.aio.Channel | None = None
        self._stub_: authsvc_pb2_grpc.AuthServiceAsyncStub | None = None
        self.timeout_s = timeout_s

    @property
    def _stub(self) -> authsvc_pb2_grpc.AuthServiceAsyncStub:
        # The channel is opened on first use, inside the running event loop: a
        # client may be built at import time (an aiohttp app built before run_app).
        if self._stub_ is None:
            channel: grpc.aio.Channel
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self._target, options=self._options)
            else:
                channel = grpc.aio.secure_channel(self._target, self._credentials, options=self._options)
            self._channel, self._stub_ = channel, _async_stub(channel)
        return self._stub_

    async def __aenter__(self) -> AuthsvcClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub_ = None, None

    async def verify(self, token: str, min_role: Role | None = None, *, timeout_s: float | None = None) -> Identity:
        """Who holds ``token``; with ``min_role``, also require a synced user of at least that role.

        Raises :class:`Unauthenticated` (bad token), :class:`PermissionDenied`
        (inactive, not synced, role too low), :class:`Unavailable`, :class:`DeadlineExceeded`.
        """
        request = authsvc_pb2.VerifyTokenRequest(token=token, min_role=int(min_role) if min_role else 0)  # type: ignore[arg-type]
        try:
            reply = await self._stub.VerifyToken(
                request, timeout=timeout_s or self.timeout_s, metadata=with_trace_context(self._metadata)
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return Identity.from_proto(reply)

    async def get_user(self, external_id: str, *, timeout_s: float | None = None) -> User:
        """The user ``external_id`` (``is_active`` false once deleted); :class:`NotFound` when unknown."""
        try:
            reply = await self._stub.GetUser(
                authsvc_pb2.GetUserRequest(external_id=external_id),
                timeout=timeout_s or self.timeout_s,
                metadata=with_trace_context(self._metadata),
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return User.from_proto(reply)

    async def set_role(
        self, caller_token: str, external_id: str, role: Role, *, timeout_s: float | None = None
    ) -> User:
        """Give ``external_id`` the role ``role``; the holder of ``caller_token`` must be an active superadmin.

        Never retried. Raises :class:`PermissionDenied` (``CALLER_NOT_SUPERADMIN``),
        :class:`FailedPrecondition` (``LAST_SUPERADMIN``, inactive target), :class:`NotFound`, ...
        """
        request = authsvc_pb2.SetRoleRequest(external_id=external_id, role=int(role))  # type: ignore[arg-type]
        try:
            reply = await self._stub.SetRole(
                request,
                timeout=timeout_s or self.timeout_s,
                metadata=with_trace_context((*self._metadata, ("authorization", f"Bearer {caller_token}"))),
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None
        return User.from_proto(reply)
