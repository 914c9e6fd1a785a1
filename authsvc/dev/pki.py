"""A throwaway certificate authority for TLS and mutual TLS on loopback (tests and benchmarks)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


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
