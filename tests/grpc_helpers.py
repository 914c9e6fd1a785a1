"""Helpers for tests of the gRPC service: real servers on loopback, nothing mocked.

``serve(...)`` starts a TokenVerifier against a LocalIssuer, the gRPC server
on port 0 and an aio channel; with a :class:`tests.fakeclerk.FakeClerk`, role
write-through and just-in-time sync go to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from authsvc.dev.pki import Pki as Pki  # re-exported: tests take the PKI from here
from authsvc.dev.pki import make_pki as make_pki
from authsvc_client.v1 import authsvc_pb2_grpc
from service.app import GrpcService, grpc_service
from service.callerfile import RELOAD_S
from service.clerkapi import ClerkBackend
from service.clerkuser import profile_of
from service.roles import Role
from service.settings import Settings
from service.tokens import TokenVerifier
from service.users import UserProfile, UserStore
from tests.fakeclerk import SECRET, FakeClerk
from tests.issuer import LocalIssuer

FRONTEND = "http://localhost:3000"
CLERK_SECRET = SECRET


@dataclass
class Harness:
    settings: Settings
    store: UserStore
    issuer: LocalIssuer
    service: GrpcService
    channel: grpc.aio.Channel
    stub: authsvc_pb2_grpc.AuthServiceAsyncStub
    fake_clerk: FakeClerk | None = None

    async def seed(
        self, external_id: str, role: Role = Role.STAFF, *, active: bool = True, name: str = "Test User"
    ) -> None:
        """A synced user in MongoDB, and in the fake Clerk when there is one (mirrored from it, ``updated_at`` too)."""
        if self.fake_clerk is None:
            await seed(self.store, external_id, role, active=active, name=name)
            return
        user = self.fake_clerk.add_user(
            external_id,
            first_name=name,
            last_name=None,
            email=f"{external_id}@example.com",
            role=role.wire,
            banned=not active,
        )
        await self.store.upsert_from_clerk(profile_of(user))

    @property
    def verifier(self) -> TokenVerifier:
        return self.service.verifier

    @property
    def clerk(self) -> ClerkBackend | None:
        return self.service.clerk

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    def token(self, subject: str, **kw: Any) -> str:
        return self.issuer.mint(subject, **kw)

    def bearer(self, subject: str, **kw: Any) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(subject, **kw)}"),)


def issuer_settings(settings: Settings, issuer: LocalIssuer, **changes: Any) -> Settings:
    """``settings`` trusting ``issuer`` and the test frontend origin."""
    return settings.model_copy(update=dict(frontend_api_url=issuer.url, authorized_parties=(FRONTEND,), **changes))


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    store: UserStore,
    issuer: LocalIssuer,
    *,
    clerk: FakeClerk | None = None,
    health_interval_s: float = 2.0,
    callers_reload_s: float = RELOAD_S,
    gauge_interval_s: float = 1.0,
    **changes: Any,
) -> AsyncIterator[Harness]:
    """A running gRPC service (and channel) trusting ``issuer``; with ``clerk``, role write-through to it.

    ``callers_reload_s``: how often ``AUTHSVC_CALLERS_FILE`` is re-read; ``gauge_interval_s``: the age gauges'.
    """
    if clerk is not None:
        changes.update(clerk_api_url=clerk.url, clerk_secret_key=CLERK_SECRET)
    settings = issuer_settings(settings, issuer, **changes)
    async with (
        grpc_service(
            settings,
            store,
            health_interval_s=health_interval_s,
            grace_s=0.5,
            callers_reload_s=callers_reload_s,
            gauge_interval_s=gauge_interval_s,
        ) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield Harness(settings, store, issuer, service, channel, authsvc_pb2_grpc.AuthServiceStub(channel), clerk)


async def seed(
    store: UserStore,
    external_id: str,
    role: Role = Role.STAFF,
    *,
    active: bool = True,
    name: str = "Test User",
) -> None:
    """A synced user, as a ``user.created`` event would leave it."""
    await store.upsert_from_clerk(
        UserProfile(
            external_id=external_id,
            name=name,
            email=f"{external_id}@example.com",
            role=role,
            is_active=active,
            clerk_updated_at=datetime.now(UTC),
        )
    )


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ``google.rpc.ErrorInfo`` detail of a failed call."""
    # AioRpcError has the code() and trailing_metadata() that from_call reads; the stub asks for a grpc.Call.
    status = rpc_status.from_call(cast(grpc.Call, err))
    assert status is not None, f"no rich status in {err.code()} {err.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def reason_of(err: grpc.aio.AioRpcError) -> str:
    info = error_info(err)
    assert info.domain == "authsvc"
    return str(info.reason)
