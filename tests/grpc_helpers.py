"""Helpers for tests of the gRPC service: real servers on loopback, nothing mocked.

``serve(...)`` starts a TokenVerifier against a LocalIssuer, the gRPC server
on port 0 and an aio channel; with a :class:`tests.fakeclerk.FakeClerk`, role
write-through and just-in-time sync go to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from authsvc_client.v1 import authsvc_pb2_grpc
from service.app import GrpcService, grpc_service
from service.callerfile import RELOAD_S
from service.clerkapi import ClerkBackend
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
        """A synced user in MongoDB, and in the fake Clerk when there is one."""
        await seed(self.store, external_id, role, active=active, name=name)
        if self.fake_clerk is not None:
            self.fake_clerk.add_user(external_id, first_name=name, last_name=None, role=role.wire, banned=not active)

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
    **changes: Any,
) -> AsyncIterator[Harness]:
    """A running gRPC service (and channel) trusting ``issuer``; with ``clerk``, role write-through to it.

    ``callers_reload_s``: how often ``AUTHSVC_CALLERS_FILE`` is re-read.
    """
    if clerk is not None:
        changes.update(clerk_api_url=clerk.url, clerk_secret_key=CLERK_SECRET)
    settings = issuer_settings(settings, issuer, **changes)
    async with (
        grpc_service(
            settings, store, health_interval_s=health_interval_s, grace_s=0.5, callers_reload_s=callers_reload_s
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


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client(self, stem: str) -> dict[str, bytes]:
        """``grpc.ssl_channel_credentials`` keywords presenting the client certificate ``stem``."""
        directory = self.ca.parent
        return {
            "private_key": (directory / f"{stem}.key").read_bytes(),
            "certificate_chain": (directory / f"{stem}.pem").read_bytes(),
        }


def make_pki(directory: Path, clients: Mapping[str, Sequence[x509.GeneralName]] | None = None) -> Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and a client certificate.

    ``clients`` issues further client certificates, ``{stem}.pem``/``{stem}.key``, carrying the given SANs.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        issuer: str,
        *,
        ca: bool = False,
        sans: Sequence[x509.GeneralName] = (),
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (directory / f"{stem}.key").write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    write("ca", issue("authsvc test CA", ca_key, ca_key, "authsvc test CA", ca=True), None)
    local = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", issue("localhost", server_key, ca_key, "authsvc test CA", sans=local), server_key)
    write("client", issue("internal-client", client_key, ca_key, "authsvc test CA"), client_key)
    for stem, sans in (clients or {}).items():
        key = ec.generate_private_key(ec.SECP256R1())
        write(stem, issue(stem, key, ca_key, "authsvc test CA", sans=sans), key)
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )
