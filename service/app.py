"""The gRPC process's composition root: every resource built here, in one ``AsyncExitStack``.

:func:`grpc_service` builds the token verifier, the optional Clerk client,
the user cache (with just-in-time sync around it), the revoked sessions and
the session rules, the role rules, the servicer and the server over a store
the caller owns, and closes them in reverse order. ``authsvc grpc`` wraps it in
:func:`run_grpc`, over a database it does not wait for (:func:`service.startup.served_database`);
``authsvc dev`` and the tests use it directly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from service.access import RoleAdmin, UserReader
from service.callerfile import RELOAD_S, CallersFile
from service.callers import CallersFileError
from service.clerkapi import ClerkBackend
from service.database import GRPC_DEFAULTS
from service.dbmonitor import DatabaseMonitor
from service.exposition import metrics_server
from service.gauges import GaugeTicker
from service.jit import JitUsers
from service.metrics import jwks_age
from service.revocations import RevokedSessions
from service.rpclog import RpcLog
from service.server import ExtraService, GrpcBindError, GrpcServer, drain, start_server
from service.servicer import AuthServicer
from service.sessions import SessionRules
from service.settings import Settings
from service.startup import StartupError, served_database, until_signalled
from service.tokens import TokenVerifier
from service.tracing import Tracing, traced
from service.usercache import UserCache
from service.users import UserStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpcService:
    """A running gRPC service and the parts it was built from (tests reach into them)."""

    server: GrpcServer
    verifier: TokenVerifier
    users: UserCache
    clerk: ClerkBackend | None
    reader: UserReader  # what token-checking paths read users through: the cache, with JIT sync around it
    monitor: DatabaseMonitor  # whether the database answers this process
    revoked: RevokedSessions

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.asynccontextmanager
async def grpc_service(
    settings: Settings,
    store: UserStore,
    *,
    monitor: DatabaseMonitor | None = None,
    health_interval_s: float = 0.5,
    grace_s: float = 5.0,
    reuse_port: bool = False,
    callers_reload_s: float = RELOAD_S,
    tracing: Tracing | None = None,
    gauge_interval_s: float = 1.0,
) -> AsyncIterator[GrpcService]:
    """Serve AuthService over ``store`` on ``settings.grpc_addr`` until the block exits.

    ``monitor`` says whether the database answers (the caller's, started once
    it has); without one, the database is taken as reachable now and watched here.
    ``AUTHSVC_CALLERS_FILE`` is re-read every ``callers_reload_s``; with
    ``tracing`` every call is a span; the age gauges are set every ``gauge_interval_s``.
    """
    async with contextlib.AsyncExitStack() as stack:
        if monitor is None:
            monitor = DatabaseMonitor(store.users.database)
            monitor.start()
            stack.push_async_callback(monitor.close)
        callers = None
        if settings.callers_file is not None:
            callers = CallersFile(
                settings.callers_file, mtls=settings.tls_client_ca is not None, reload_s=callers_reload_s
            )
            try:
                await callers.start()
            except CallersFileError as exc:
                raise StartupError(f"AUTHSVC_CALLERS_FILE {exc}") from exc
            stack.push_async_callback(callers.close)
        verifier = TokenVerifier(settings)
        stack.push_async_callback(verifier.close)
        await verifier.start()
        gauges = GaugeTicker([(jwks_age(), verifier.jwks_age_s)], gauge_interval_s)
        await gauges.start()
        stack.push_async_callback(gauges.close)
        clerk = None
        if settings.clerk_secret_key:
            clerk = ClerkBackend.for_calls(settings.clerk_api_url, settings.clerk_secret_key)
            stack.push_async_callback(clerk.close)
        users = UserCache(store, monitor, stale_s=settings.stale_s)
        stack.push_async_callback(users.close)
        await users.start()
        reader: UserReader = users
        if clerk is not None and settings.jit_sync:
            jit = JitUsers(users, store, clerk)
            stack.push_async_callback(jit.close)
            reader = jit
        revoked = RevokedSessions(store.revoked_sessions)
        stack.push_async_callback(revoked.close)
        await revoked.start()  # loaded before the first call, unless the database cannot be read yet
        sessions = SessionRules(
            revoked,
            accept_pending=settings.accept_pending_sessions,
            max_factor_age_min=settings.setrole_max_factor_age_min,
        )
        roles = RoleAdmin(store, verifier, clerk, sessions)
        stack.push_async_callback(roles.close)  # before the Clerk client and the store close
        servicer = AuthServicer(users, verifier, reader, roles, sessions, RpcLog(settings.log_rpcs))
        extra = [_ext_authz(verifier, reader, sessions, servicer)] if settings.ext_authz else []
        watched = monitor

        async def ready() -> bool:
            # No signing key at all (a cold start with the JWKS down): no token can be verified; revoked
            # sessions not read yet: no token with a sid can be judged. A database outage within
            # AUTHSVC_STALE_S keeps SERVING: every replica sees it, turning all away is an outage.
            return verifier.ready and revoked.loaded and watched.started and (watched.up or users.within_bound())

        try:
            server = await start_server(
                settings,
                servicer,
                ready,
                health_interval_s=health_interval_s,
                extra=extra,
                reuse_port=reuse_port,
                callers=callers,
                tracing=tracing.server_interceptor() if tracing is not None else None,
            )
        except GrpcBindError as exc:
            raise StartupError(str(exc)) from exc
        stack.push_async_callback(server.stop, grace_s)
        if not settings.authorized_parties:
            log.warning("CLERK_AUTHORIZED_PARTIES is unset: the azp claim is not checked")
        if not settings.clerk_secret_key:
            log.warning("CLERK_SECRET_KEY is unset: SetRole writes MongoDB only; the next Clerk event wins")
        if callers is None:
            log.warning("AUTHSVC_CALLERS_FILE is unset: any caller may call any method")
        yield GrpcService(
            server=server, verifier=verifier, users=users, clerk=clerk, reader=reader, monitor=monitor, revoked=revoked
        )


def _ext_authz(
    verifier: TokenVerifier, users: UserReader, sessions: SessionRules, servicer: AuthServicer
) -> tuple[str, ExtraService]:
    """Envoy's Check over the same verifier and user reader as VerifyToken (AUTHSVC_EXT_AUTHZ=on)."""
    try:
        from service.extauthz import SERVICE_NAME, ExtAuthzServicer
    except ImportError as exc:
        raise StartupError("AUTHSVC_EXT_AUTHZ=on needs the Envoy stubs: pip install 'authsvc[envoy]'") from exc
    return SERVICE_NAME, ExtAuthzServicer(verifier, users, sessions, servicer.serve)


async def run_grpc(
    settings: Settings, *, grace_s: float = 5.0, worker: bool = False, on_ready: Callable[[], None] | None = None
) -> None:
    """``authsvc grpc``: serve until SIGTERM/SIGINT, then drain (``AUTHSVC_DRAIN_S``) and stop.

    ``GET /metrics`` on ``AUTHSVC_METRICS_ADDR``, unless ``worker``: one of
    several workers (:mod:`service.workers`) sharing the address with
    ``SO_REUSEPORT``, whose parent serves ``/metrics``. ``on_ready`` is called once serving.
    Traces when OpenTelemetry's variables say so (:func:`service.tracing.traced`; first, so
    that the database client is instrumented).
    """
    async with contextlib.AsyncExitStack() as stack:
        tracing = await stack.enter_async_context(traced("authsvc-grpc"))
        if not worker:
            await stack.enter_async_context(metrics_server(settings.metrics_addr))
        database = await stack.enter_async_context(served_database(settings, **GRPC_DEFAULTS))
        service = await stack.enter_async_context(
            grpc_service(
                settings, database.store, monitor=database.monitor, grace_s=grace_s, reuse_port=worker, tracing=tracing
            )
        )
        if on_ready is not None:
            on_ready()
        await until_signalled(database)
        await drain(service.server, settings.drain_s, grace_s)
