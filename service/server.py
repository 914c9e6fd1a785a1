"""Building and starting the grpc.aio server from a servicer and settings: health, reflection, optional (m)TLS."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from authsvc_client.v1 import authsvc_pb2
from service.callerfile import CallersFile
from service.calls import Answer, CallGuard
from service.grpcmetrics import MetricsInterceptor
from service.logs import fields
from service.reflection import enable_reflection
from service.rpclog import RpcLog
from service.servicer import AuthServicer
from service.settings import Settings

log = logging.getLogger(__name__)


Readiness = Callable[[], Awaitable[bool]]

SERVICE_NAME: str = authsvc_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
HEALTH_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVER_OPTIONS = [
    # Requests are a token (at most 8 KiB) and an id: refuse anything far larger.
    ("grpc.max_receive_message_length", 256 * 1024),
]


class ExtraService(Protocol):
    """A further servicer on the same server (Envoy's Authorization): named for reflection, added by itself.

    ``answers``: per full method name, the response a refused caller gets instead of a failed call.
    """

    def add_to(self, server: grpc.aio.Server) -> None: ...

    @property
    def answers(self) -> Mapping[str, Answer]: ...


def server_options(reuse_port: bool) -> list[tuple[str, int]]:
    """grpc server options. ``SO_REUSEPORT`` only for the workers of one ``authsvc grpc``
    (service/workers.py checks the address is free first): otherwise a second server could
    bind the same port on Linux and share its traffic, where an address in use must be an error."""
    return [("grpc.so_reuseport", 1 if reuse_port else 0), *SERVER_OPTIONS]


def connection_age_options(settings: Settings) -> list[tuple[str, int]]:
    """``AUTHSVC_MAX_CONNECTION_AGE_S``: end each connection gracefully after about that long (grpc adds
    +/-10% jitter), so clients behind one virtual IP spread over new replicas. GOAWAY first; its calls
    then have ``AUTHSVC_DRAIN_S`` + 5 s, as in a drain. 0: never."""
    if settings.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int((settings.drain_s + 5.0) * 1000)),
    ]


def _reply_bytes(reply: Any) -> bytes:
    """VerifyToken's serializer: the servicer answers with bytes it serialized once and reuses."""
    if type(reply) is bytes:
        return reply
    data: bytes = reply.SerializeToString()
    return data


def add_auth_service(servicer: AuthServicer, server: grpc.aio.Server) -> None:
    """``authsvc_pb2_grpc.add_AuthServiceServicer_to_server``, with VerifyToken's replies sent as the bytes given."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "VerifyToken": grpc.unary_unary_rpc_method_handler(
            servicer.VerifyToken,
            request_deserializer=authsvc_pb2.VerifyTokenRequest.FromString,
            response_serializer=_reply_bytes,
        ),
        "GetUser": grpc.unary_unary_rpc_method_handler(
            servicer.GetUser,
            request_deserializer=authsvc_pb2.GetUserRequest.FromString,
            response_serializer=authsvc_pb2.User.SerializeToString,
        ),
        "SetRole": grpc.unary_unary_rpc_method_handler(
            servicer.SetRole,
            request_deserializer=authsvc_pb2.SetRoleRequest.FromString,
            response_serializer=authsvc_pb2.User.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class GrpcBindError(OSError):
    """The gRPC address cannot be listened on; ``str()`` is one line for the operator."""


@dataclass
class GrpcServer:
    """A started gRPC server and the task that keeps its health status current."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer = field(repr=False)
    health_task: asyncio.Task[None] | None = field(default=None, repr=False)
    stopping: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    calls: CallGuard = field(default_factory=CallGuard, repr=False)
    stopped: bool = field(default=False, repr=False)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, let calls in flight finish for ``grace_s``, stop the health checks (once)."""
        if self.stopped:
            return
        self.stopped = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self.stopping.set()
        if self.health_task is not None:
            # Let a ping in flight finish (bounded by the driver's server-selection
            # timeout): cancelling the driver mid-connect can leak its socket.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.health_task), timeout=5.0)
            self.health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.health_task
            self.health_task = None


async def _set_health(health: health_aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health.set(name, status)


async def _watch(
    health: health_aio.HealthServicer, ready: Readiness, interval_s: float, serving: bool, stopping: asyncio.Event
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=interval_s)
        if stopping.is_set():
            return
        try:
            now = await ready()
        except Exception:
            # The watcher must outlive any surprise: report it and count it as down.
            log.exception("health check failed")
            now = False
        if now != serving:
            (log.info if now else log.warning)(
                "health changed", extra=fields(status="SERVING" if now else "NOT_SERVING")
            )
            serving = now
        await _set_health(health, serving)


async def drain(server: GrpcServer, drain_s: float, grace_s: float = 5.0, *, quiet_s: float = 0.2) -> None:
    """Stop one process for a rolling restart without failing a call it accepted.

    Health turns NOT_SERVING at once (load balancers and health-checking
    clients move away) while calls keep being served for ``drain_s``. Then it
    waits for a quiet spell of ``quiet_s`` with no call reaching a handler
    (bounded by ``grace_s``): ``grpc.aio``'s ``stop()`` cancels calls the core
    accepted but had not yet handed to a handler, so none may be left. Finally
    ``stop(grace_s)``: calls in handlers get ``grace_s`` to finish. Each worker
    process of a multi-worker server runs this on its own server.
    """
    log.info("draining", extra=fields(drain_s=drain_s, grace_s=grace_s, active=server.calls.active))
    await server.health.enter_graceful_shutdown()
    await asyncio.sleep(drain_s)
    settled = await server.calls.settled(quiet_s, grace_s)
    log.info("drained; stopping", extra=fields(active=server.calls.active, settled=settled))
    await server.stop(grace_s)


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = (settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


async def start_server(
    settings: Settings,
    servicer: AuthServicer,
    ready: Readiness,
    *,
    health_interval_s: float = 2.0,
    extra: Sequence[tuple[str, ExtraService]] = (),
    reuse_port: bool = False,
    callers: CallersFile | None = None,
    tracing: grpc.aio.ServerInterceptor | None = None,
) -> GrpcServer:
    """Serve ``servicer``, Health and reflection on ``settings.grpc_addr``; return the server and bound port.

    TLS when ``tls_cert``/``tls_key`` are set; with ``tls_client_ca`` clients
    must present a certificate it signed. Health reports SERVING (overall and
    for AuthService) only while ``ready()`` is true, re-checked every
    ``health_interval_s``. ``extra`` adds further services, as
    ``(full service name, servicer)``, listed by reflection too. Request bytes
    that do not decode are answered ``INVALID_ARGUMENT`` on every method
    (:class:`service.calls.CallGuard`). With ``callers`` (``AUTHSVC_CALLERS_FILE``),
    every call but health must come from a caller it lists; reflection only
    with ``settings.reflection``.
    Every RPC is counted and timed (``grpc_server_*``) and logged (``AUTHSVC_LOG_RPCS``); with
    ``tracing`` (:class:`service.grpctracing.TracingInterceptor`) each is a span.
    ``reuse_port`` is for worker processes.
    Raises :class:`GrpcBindError` if the address cannot be bound.
    """
    answers = {method: answer for _, servicer_ in extra for method, answer in servicer_.answers.items()}
    calls = CallGuard(callers, answers, RpcLog(settings.log_rpcs))
    # The metrics interceptor before the guard: it sees every call as the client does, the guard's refusals
    # included; the tracing one before both, so that the span covers all of the call and its log line.
    interceptors = (*([tracing] if tracing is not None else []), MetricsInterceptor(), calls)
    options = [*server_options(reuse_port), *connection_age_options(settings)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    add_auth_service(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for _, servicer_ in extra:
        servicer_.add_to(server)
    if settings.reflection:
        enable_reflection(server, (SERVICE_NAME, *(name for name, _ in extra), HEALTH_NAME))

    credentials = _credentials(settings)
    try:
        if credentials is None:
            port: int = server.add_insecure_port(settings.grpc_addr)
        else:
            port = server.add_secure_port(settings.grpc_addr, credentials)
    except RuntimeError as exc:
        raise GrpcBindError(f"cannot listen on {settings.grpc_addr}: the address is in use or not local") from exc

    serving = await ready()
    await _set_health(health, serving)
    await server.start()
    stopping = asyncio.Event()
    task = asyncio.create_task(_watch(health, ready, health_interval_s, serving, stopping), name="grpc-health")
    log.info(
        "grpc serving",
        extra=fields(
            addr=settings.grpc_addr,
            port=port,
            tls=credentials is not None,
            mtls=settings.tls_client_ca is not None,
            callers=None if callers is None else len(callers.policy),
            reflection=settings.reflection,
            ready=serving,
        ),
    )
    return GrpcServer(server=server, port=port, health=health, health_task=task, stopping=stopping, calls=calls)
