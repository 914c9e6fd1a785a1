"""Faults an operator meets: SIGTERM with calls in flight, the JWKS down at startup, broken startup settings.

The drain test runs ``authsvc grpc`` as production does (a child process,
real signal); the others use the in-process service or the console script.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2

from authsvc.dev.procs import ServerProcess, child_env, free_port, grpc_serving, health_check, printed, run
from authsvc_client.v1 import authsvc_pb2, authsvc_pb2_grpc
from service.embedded import EmbeddedMongo, EmbeddedUnavailable
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import FRONTEND, reason_of, serve
from tests.issuer import LocalIssuer

AUTHSVC = str(Path(sys.executable).with_name("authsvc"))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel) -> int:
    response = await health_check(channel)(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(response.status)


async def until_health(channel: grpc.aio.Channel, status: int, timeout_s: float = 30.0) -> None:
    """Poll Health until it reports ``status`` (bounded; a liveness bound, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            if await health_of(channel) == status:
                return
        except grpc.aio.AioRpcError:
            pass
        assert loop.time() < deadline, f"health never became {status}"
        await asyncio.sleep(0.05)


# --- defect 9: a rolling restart drops no call ---------------------------------------
def grpc_process(settings: Settings, issuer: LocalIssuer, logfile: Path, **env: str) -> tuple[ServerProcess, int]:
    """``authsvc grpc`` as production runs it, over the test's database and issuer."""
    port = free_port()
    assert settings.mongodb_uri is not None
    child = child_env(
        MONGODB_URI=settings.mongodb_uri,
        MONGODB_DB=settings.mongodb_db,
        CLERK_FRONTEND_API_URL=issuer.url,
        CLERK_AUTHORIZED_PARTIES=FRONTEND,
        AUTHSVC_GRPC_ADDR=f"127.0.0.1:{port}",
        **env,
    )
    return ServerProcess("authsvc grpc", [AUTHSVC, "grpc"], env=child, logfile=logfile), port


async def test_sigterm_with_calls_in_flight_completes_every_call(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    server, port = grpc_process(settings, issuer, tmp_path / "grpc.log", AUTHSVC_DRAIN_S="1.5")
    await server.start_ready(grpc_serving(f"127.0.0.1:{port}"))
    try:
        await drain_with_calls_in_flight(server, port, issuer)
    finally:
        server.stop()


async def drain_with_calls_in_flight(server: ServerProcess, port: int, issuer: LocalIssuer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = authsvc_pb2_grpc.AuthServiceStub(channel)
        cached = issuer.mint("user_cached", azp=FRONTEND)
        assert (await stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=cached))).subject == "user_cached"

        # A new signing key, served slowly: every call below waits in the server on one JWKS fetch,
        # longer than the drain window, so they are still in their handlers when the server stops.
        issuer.rotate()
        issuer.delay_s = 2.5  # under the verifier's 3 s fetch timeout
        before = issuer.fetches
        calls = [
            asyncio.ensure_future(
                stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=issuer.mint(f"user_{i}", azp=FRONTEND)))
            )
            for i in range(32)
        ]
        while issuer.fetches == before:  # the server holds calls now
            await asyncio.sleep(0.001)
        os.kill(server.pid, signal.SIGTERM)

        await until_health(channel, NOT_SERVING, timeout_s=10)
        # Draining: still serving for AUTHSVC_DRAIN_S, for calls that arrive before the balancer notices.
        assert (await stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=cached))).subject == "user_cached"

        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, [(f.code(), f.details()) for f in failures if isinstance(f, grpc.aio.AioRpcError)]
        assert sorted(r.subject for r in results if not isinstance(r, BaseException)) == sorted(
            f"user_{i}" for i in range(32)
        )

        assert server.proc is not None
        assert await asyncio.to_thread(server.proc.wait, 30) == 0
        output = server.output()
        assert "Traceback" not in output
        assert '"draining"' in output


# --- defect 10: the JWKS down at startup, then back ------------------------------------------
async def test_jwks_down_at_startup_is_not_serving_then_recovers_without_calls(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    issuer.down = True
    async with serve(settings, store, issuer, health_interval_s=0.05) as h:
        assert await health_of(h.channel) == NOT_SERVING  # no signing key at all: nothing verifies
        first = issuer.fetches
        # Retried in the background with a short backoff, with no call asking for it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while issuer.fetches < first + 2:
            assert loop.time() < deadline, "a failed JWKS fetch was not retried"
            await asyncio.sleep(0.05)
        assert await health_of(h.channel) == NOT_SERVING

        issuer.down = False
        await until_health(h.channel, SERVING, timeout_s=30)
        response = await h.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=h.token("user_1")))
        assert response.subject == "user_1"


async def test_jwks_down_at_startup_answers_jwks_unavailable(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    issuer.down = True
    async with serve(settings, store, issuer) as h:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await h.stub.VerifyToken(authsvc_pb2.VerifyTokenRequest(token=h.token("user_1")))
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert reason_of(info.value) == "JWKS_UNAVAILABLE"


# --- defect 11: startup problems are one line, exit 2 ----------------------------------------
async def run_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    code, _, err = await run(AUTHSVC, *args, env=env, cwd=cwd)
    return code, err


def ec_public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"MONGODB_URI": "mongodb://authsvc:hunter22@db.example:99999/", "CLERK_FRONTEND_API_URL": "https://c.dev"},
            ["MONGODB_URI is malformed", "Port"],
        ),
        (
            {"MONGODB_URI": "mongo://authsvc:hunter22@db.example/", "CLERK_FRONTEND_API_URL": "https://c.dev"},
            ["MONGODB_URI is malformed", "scheme"],
        ),
        ({"CLERK_JWT_KEY": "-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----"}, ["CLERK_JWT_KEY"]),
        ({"CLERK_JWT_KEY": "EC"}, ["CLERK_JWT_KEY", "RSA"]),
        ({"AUTHSVC_ENV": "prod", "CLERK_FRONTEND_API_URL": "https://c.dev"}, ["AUTHSVC_ENV", "'production'", "'prod'"]),
    ],
    ids=["bad-port", "bad-scheme", "garbage-pem", "ec-key", "env-prod"],
)
async def test_grpc_startup_problem_is_one_line_exit_2(
    tmp_path: Path, env: dict[str, str], expected: list[str]
) -> None:
    port = str(free_port())
    values = {k: ec_public_pem() if v == "EC" else v.replace("{port}", port) for k, v in env.items()}
    code, err = await run_cli("grpc", env=child_env(**values), cwd=tmp_path)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("authsvc: "), err
    for part in expected:
        assert part.replace("{port}", port) in lines[0], err
    assert "hunter22" not in err
    assert "Traceback" not in err


async def test_every_missing_webhook_setting_is_reported_at_once(tmp_path: Path) -> None:
    code, err = await run_cli("webhook", env=child_env(AUTHSVC_ENV="production"), cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert any("CLERK_WEBHOOK_SECRET" in line for line in lines)
    assert any("MONGODB_URI" in line for line in lines)


async def test_second_embedded_database_on_one_directory_is_refused(tmp_path: Path) -> None:
    first = EmbeddedMongo(tmp_path / "mongo")
    await first.start()
    try:
        with pytest.raises(EmbeddedUnavailable, match="another process holds"):
            await EmbeddedMongo(tmp_path / "mongo").start()
    finally:
        first.stop()
    again = EmbeddedMongo(tmp_path / "mongo")  # released on stop
    await again.start()
    again.stop()


def dev_process(cwd: Path, name: str) -> ServerProcess:
    env = child_env(
        AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{free_port()}",
        AUTHSVC_GRPC_ADDR=f"127.0.0.1:{free_port()}",
    )
    return ServerProcess(name, [AUTHSVC, "dev"], env=env, logfile=cwd / f"{name}.log", cwd=cwd)


async def test_second_authsvc_dev_on_one_data_directory_says_so(tmp_path: Path) -> None:
    first = dev_process(tmp_path, "dev-1")
    await first.start_ready(printed("Ctrl-C stops it"), timeout_s=90)
    try:
        second = dev_process(tmp_path, "dev-2")
        code, err = await run_cli("dev", env=second.env, cwd=tmp_path)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "another process holds the embedded database" in lines[0], err
    finally:
        first.stop()
