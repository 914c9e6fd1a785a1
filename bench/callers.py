"""``python -m bench callers``: the CPU the caller check (``AUTHSVC_CALLERS_FILE``) adds to one call.

A real grpc.aio server on loopback; inside one real call, the handler runs
the check that :class:`service.calls.CallGuard` runs before every call
(:class:`service.calls.CallerGate`: the ``x-authsvc-key`` metadata read from
the call's context, its SHA-256, a constant-time comparison with every listed
digest, the method looked up; or the client certificate's SANs read from the
TLS auth context) many times over, timed in CPU seconds of this process
(``time.process_time``), median of interleaved passes. The policy lists 10
keys and 10 certificate names, and the caller found is the last one listed;
the refused case presents an unknown key and an unlisted certificate (the
worst case: every digest compared, then the certificate read).
Without ``AUTHSVC_CALLERS_FILE`` there is no check at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from authsvc.dev.pki import make_pki
from service.callerfile import CallersFile
from service.calls import CallerGate
from service.rpclog import RpcLog

METHOD = "/authsvc.v1.AuthService/VerifyToken"
ENTRIES = 10
KEY = f"key-{ENTRIES - 1}-0123456789abcdef"
SAN = f"spiffe://bench.example/ns/prod/sa/caller-{ENTRIES - 1}"


def _policy_text() -> str:
    entries = []
    for i in range(ENTRIES):
        digest = hashlib.sha256(f"key-{i}-0123456789abcdef".encode()).hexdigest()
        entries.append(f'[[caller]]\nname = "k{i}"\nkey_sha256 = "{digest}"\nmethods = ["VerifyToken"]\n')
        san = f"spiffe://bench.example/ns/prod/sa/caller-{i}"
        entries.append(f'[[caller]]\nname = "s{i}"\ntls_san = "{san}"\nmethods = ["VerifyToken"]\n')
    return "\n".join(entries)


def _time_checks(gate: CallerGate, context: Any, count: int) -> float:
    """CPU microseconds per check; the check must admit (or, for ``refused``, refuse) every time."""
    began = time.process_time()
    for _ in range(count):
        gate.refusal(context)
    return (time.process_time() - began) / count * 1e6


async def run(*, checks: int = 20_000, passes: int = 5) -> list[str]:
    """The per-check costs, as printable lines."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        pki = make_pki(
            directory / "pki",
            clients={
                "caller": [x509.UniformResourceIdentifier(SAN)],
                "stranger": [x509.UniformResourceIdentifier("spiffe://bench.example/ns/prod/sa/stranger")],
            },
        )
        (directory / "callers.toml").write_text(_policy_text())
        callers = CallersFile(directory / "callers.toml", mtls=True)
        await callers.start()
        gate = CallerGate(METHOD, callers, None, RpcLog())
        found: dict[str, list[float]] = {"key": [], "unknown key": [], "san": []}
        now = {"case": ""}

        async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            case = now["case"]
            refused = gate.refusal(context) is not None
            assert refused == (case == "unknown key"), case
            found[case].append(_time_checks(gate, context, checks))
            return b""

        server = grpc.aio.server()
        methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "VerifyToken": grpc.unary_unary_rpc_method_handler(handler)
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("authsvc.v1.AuthService", methods),))
        credentials = grpc.ssl_server_credentials(
            [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
            root_certificates=pki.ca.read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()

        def channel(stem: str) -> grpc.aio.Channel:
            credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(), **pki.client(stem))
            return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)

        try:
            async with channel("caller") as known, channel("stranger") as stranger:
                for _ in range(passes):
                    for case, through, metadata in (
                        ("key", known, (("x-authsvc-key", KEY),)),
                        ("unknown key", stranger, (("x-authsvc-key", "a-guess"),)),
                        ("san", known, ()),
                    ):
                        now["case"] = case
                        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = through.unary_unary(METHOD)
                        await call(b"", metadata=metadata, timeout=60)
        finally:
            await server.stop(None)
            await callers.close()

    med = {name: statistics.median(values) for name, values in found.items()}
    rows = [
        (f"key (x-authsvc-key, SHA-256, {ENTRIES} digests compared)", f"{med['key']:.1f} us"),
        ("unknown key and certificate (refused; no abort)", f"{med['unknown key']:.1f} us"),
        ("client certificate URI SAN (mTLS, no key)", f"{med['san']:.1f} us"),
        ("no AUTHSVC_CALLERS_FILE", "no check"),
    ]
    width = max(len(label) for label, _ in rows)
    return [
        f"callers: the caller check on a real call's context, {ENTRIES} keys + {ENTRIES} certificate names, "
        f"{checks:,} checks x {passes} passes, medians (CPU per call)",
        *(f"  {label:<{width}}  {figure:>8}" for label, figure in rows),
    ]


if __name__ == "__main__":
    print("\n".join(asyncio.run(run())))
