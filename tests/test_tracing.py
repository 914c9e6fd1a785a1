"""Tracing: authsvc run as production runs it, exporting to a real OTLP receiver (OpenTelemetry's own protos).

The servers are child processes (the SDK's instrumentations patch a whole
process); the receiver (:class:`authsvc.dev.otlp.OtlpReceiver`) serves
``TraceService/Export`` over gRPC and ``POST /v1/traces`` over HTTP on
loopback, and keeps every request's bytes, so the tests can search them for
tokens, keys, secrets and emails. ``OTEL_BSP_SCHEDULE_DELAY`` is short.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from authsvc.dev.events import signed_headers
from authsvc.dev.otlp import OtlpReceiver, Span
from authsvc.dev.procs import ServerProcess, child_env, free_port, grpc_serving, http_ok, run
from authsvc_client import AuthsvcClient
from authsvc_client.v1 import authsvc_pb2 as pb
from authsvc_client.v1 import authsvc_pb2_grpc
from service import exposition, tracing
from service.access import RoleAdmin
from service.errors import KeyNotFound
from service.gauges import GaugeTicker
from service.logs import request_id
from service.metrics import jwks_age
from service.otel import FLUSH_S
from service.revocations import RevokedSessions
from service.roles import Role
from service.rpclog import RpcLog
from service.server import start_server
from service.servicer import AuthServicer
from service.sessions import SessionRules
from service.settings import Settings
from service.tokens import TokenVerifier
from service.users import UserStore
from tests.conftest import WEBHOOK_SECRET
from tests.fakeclerk import SECRET, FakeClerk
from tests.grpc_helpers import FRONTEND, issuer_settings, reason_of, seed, serve
from tests.issuer import LocalIssuer
from tests.raw_grpc import unary
from tests.sidecar import fixture

SERVICE = "authsvc.v1.AuthService"
CALLER_KEY = "caller-key-for-tracing-0123456789abcdef"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


def traceparent() -> tuple[str, str]:
    """A sampled W3C ``traceparent`` of a fresh trace, and that trace's id."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id


def log_lines(process: ServerProcess, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in process.output().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def in_trace(spans: Sequence[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def server_span(spans: Sequence[Span], trace_id: str) -> Span:
    [found] = [s for s in in_trace(spans, trace_id) if s.kind == Span.SERVER]
    return found


def children(spans: Sequence[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def assert_nothing_secret(receiver: OtlpReceiver, secrets: Sequence[str]) -> None:
    exported = b"".join(receiver.raw)
    assert exported, "nothing was exported"
    leaked = [secret for secret in secrets if secret.encode() in exported]
    assert not leaked, f"exported spans contain {leaked}"


async def metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    async with OtlpReceiver() as found:
        yield found


async def start_grpc(
    name: str, settings: Settings, issuer: LocalIssuer, tmp_path: Path, argv: Sequence[str] = (), **env: str
) -> tuple[ServerProcess, str, int]:
    """``authsvc grpc`` (or ``argv``) as a child process trusting ``issuer``: the process, its target, metrics port."""
    port, metrics_port = free_port(), free_port()
    assert settings.mongodb_uri is not None
    process = ServerProcess(
        name,
        list(argv) or [sys.executable, "-m", "authsvc", "grpc"],
        env=child_env(
            MONGODB_URI=settings.mongodb_uri,
            MONGODB_DB=settings.mongodb_db,
            CLERK_FRONTEND_API_URL=issuer.url,
            CLERK_AUTHORIZED_PARTIES=FRONTEND,
            AUTHSVC_GRPC_ADDR=f"127.0.0.1:{port}",
            AUTHSVC_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
            AUTHSVC_DRAIN_S="0",
            **env,
        ),
        logfile=tmp_path / f"{name}.log",
    )
    target = f"127.0.0.1:{port}"
    await process.start_ready(grpc_serving(target))
    return process, target, metrics_port


async def test_grpc_calls_are_spans_under_the_callers_trace_with_database_clerk_and_jwks_children(
    settings: Settings,
    store: UserStore,
    issuer: LocalIssuer,
    fake_clerk: FakeClerk,
    receiver: OtlpReceiver,
    tmp_path: Path,
) -> None:
    callers = tmp_path / "callers.toml"
    digest = hashlib.sha256(CALLER_KEY.encode()).hexdigest()
    callers.write_text(f'[[caller]]\nname = "billing"\nkey_sha256 = "{digest}"\nmethods = ["*"]\n')
    await seed(store, "user_staff", Role.STAFF)
    await seed(store, "user_root", Role.SUPERADMIN)
    await seed(store, "user_t", Role.STAFF)
    fake_clerk.add_user("user_t")
    fake_clerk.add_user("user_jit")
    process, target, metrics_port = await start_grpc(
        "grpc-traced",
        settings,
        issuer,
        tmp_path,
        CLERK_SECRET_KEY=SECRET,
        CLERK_API_URL=fake_clerk.url,
        AUTHSVC_CALLERS_FILE=str(callers),
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.grpc_endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
        **FAST_EXPORT,
    )
    tokens = [issuer.mint(s, azp=FRONTEND) for s in ("user_staff", "user_jit", "user_root")]
    staff, jit, root = tokens
    key = ("x-authsvc-key", CALLER_KEY)
    traces: dict[str, str] = {}
    try:
        # The client package propagates the caller's current span (here the test's own SDK span).
        caller = TracerProvider(shutdown_on_exit=False).get_tracer("a calling service")
        with caller.start_as_current_span("handle request") as outer:
            async with AuthsvcClient(target, key=CALLER_KEY) as client:
                assert (await client.verify(staff)).subject == "user_staff"
        traces["client"] = format(outer.get_span_context().trace_id, "032x")
        async with grpc.aio.insecure_channel(target) as channel:
            stub = authsvc_pb2_grpc.AuthServiceStub(channel)

            async def call(name: str, method: Any, request: Any, *metadata: tuple[str, str]) -> grpc.StatusCode:
                header, traces[name] = traceparent()
                try:
                    await method(request, metadata=(("traceparent", header), *metadata))
                except grpc.aio.AioRpcError as err:
                    if name == "denied":
                        assert reason_of(err) == "ROLE_TOO_LOW"
                    return err.code()
                return grpc.StatusCode.OK

            too_low = pb.VerifyTokenRequest(token=staff, min_role=pb.ROLE_SUPERADMIN)
            assert await call("denied", stub.VerifyToken, too_low, key) == grpc.StatusCode.PERMISSION_DENIED
            assert await call("jit", stub.VerifyToken, pb.VerifyTokenRequest(token=jit), key) == grpc.StatusCode.OK
            issuer.rotate()  # a token signed by a key the process has not fetched yet: one JWKS fetch in the call
            rotated = issuer.mint("user_staff", azp=FRONTEND)
            tokens.append(rotated)
            assert await call("jwks", stub.VerifyToken, pb.VerifyTokenRequest(token=rotated), key) == (
                grpc.StatusCode.OK
            )
            set_role = pb.SetRoleRequest(external_id="user_t", role=pb.ROLE_ADMIN)
            bearer = ("authorization", f"Bearer {root}")
            request_id = ("x-request-id", "req-trace-1")
            assert await call("setrole", stub.SetRole, set_role, key, bearer, request_id) == grpc.StatusCode.OK
            stranger = ("x-authsvc-key", "not-a-known-key")
            assert await call("stranger", stub.VerifyToken, pb.VerifyTokenRequest(token=staff), stranger) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
        spans = await receiver.wait_for(
            lambda found: (
                all(any(s.kind == Span.SERVER for s in in_trace(found, t)) for t in traces.values())
                and any(s.name.startswith("GET") for s in in_trace(found, traces["jwks"]))
                and sum(1 for s in in_trace(found, traces["setrole"]) if s.name.startswith("PATCH")) == 1
            )
        )
        gauges = await metrics(metrics_port)
    finally:
        process.stop()

    # Parentage: the client call's server span is a child of the caller's span, in its trace.
    verify = server_span(spans, traces["client"])
    assert verify.parent_span_id == format(outer.get_span_context().span_id, "016x")
    assert verify.name == f"{SERVICE}/VerifyToken" and verify.service == "authsvc-grpc"
    assert verify.attributes == {
        "rpc.system": "grpc",
        "rpc.service": SERVICE,
        "rpc.method": "VerifyToken",
        "rpc.grpc.status_code": 0,
    }
    # A cold call reads MongoDB: a client span below the call's, without the statement.
    [find] = [s for s in children(spans, verify) if s.attributes.get("db.system") == "mongodb"]
    assert find.kind == Span.CLIENT and find.attributes.get("db.statement", "find") == "find"
    # Denials carry the code the client received (abort_with_status) and the ErrorInfo reason.
    denied = server_span(spans, traces["denied"])
    assert (denied.attributes["rpc.grpc.status_code"], denied.attributes["authsvc.reason"]) == (7, "ROLE_TOO_LOW")
    refused = server_span(spans, traces["stranger"])
    assert (refused.attributes["rpc.grpc.status_code"], refused.attributes["authsvc.reason"]) == (
        16,
        "CALLER_UNAUTHENTICATED",
    )
    assert "authsvc.reason" not in verify.attributes
    # Clerk's Backend API (just-in-time sync, SetRole's write-through) and the JWKS, each below its call.
    for name, method, path in (
        ("jit", "GET", "/v1/users/user_jit"),
        ("setrole", "PATCH", "/v1/users/user_t/metadata"),
        ("jwks", "GET", "/.well-known/jwks.json"),
    ):
        parent = server_span(spans, traces[name])
        [http] = [s for s in children(spans, parent) if s.name == method]
        assert http.kind == Span.CLIENT and str(http.attributes["url.full"]).endswith(path)
    # Background work (health pings, the change stream, the JWKS refresh) makes no trace of its own.
    assert all(s.parent_span_id for s in spans if s.kind == Span.CLIENT)
    assert_nothing_secret(
        receiver,
        [*tokens, SECRET, CALLER_KEY, "user_staff@example.com", "user_jit@example.com", "user_t@example.com"],
    )
    # The per-RPC line is written inside the span: its trace and span ids, and the caller's x-request-id.
    lines = {line["trace_id"]: line for line in log_lines(process, "rpc")}
    assert lines[traces["client"]]["span_id"] == verify.span_id
    assert lines[traces["setrole"]]["request_id"] == "req-trace-1"
    assert lines[traces["stranger"]]["reason"] == "CALLER_UNAUTHENTICATED"
    assert len(lines[traces["denied"]]["request_id"]) == 16  # none given: a random one
    assert 0 <= gauges["authsvc_jwks_age_seconds"] < 30
    assert (gauges["authsvc_database_up"], gauges["authsvc_user_cache_stale_seconds"]) == (1, 0)
    assert "authsvc_sync_last_success_timestamp_seconds" not in gauges


async def test_webhook_deliveries_are_spans_with_type_outcome_and_database_children(
    settings: Settings, fake_clerk: FakeClerk, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    assert settings.mongodb_uri is not None
    fake_clerk.add_user("user_synced", email="synced@example.org")
    port = free_port()
    process = ServerProcess(
        "sidecar-traced",
        [sys.executable, "-m", "authsvc", "webhook"],
        env=child_env(
            MONGODB_URI=settings.mongodb_uri,
            MONGODB_DB=settings.mongodb_db,
            CLERK_WEBHOOK_SECRET=WEBHOOK_SECRET,
            CLERK_SECRET_KEY=SECRET,
            CLERK_API_URL=fake_clerk.url,
            AUTHSVC_SYNC_INTERVAL_S="3600",  # one periodic repair, at start
            AUTHSVC_WEBHOOK_ADDR=f"127.0.0.1:{port}",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.http_endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            **FAST_EXPORT,
        ),
        logfile=tmp_path / "sidecar.log",
    )
    base = f"http://127.0.0.1:{port}"
    await process.start_ready(http_ok(f"{base}/healthz"))
    event = fixture("user.created")
    body = json.dumps(event)
    traces: dict[str, str] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for name, headers in (
                ("applied", signed_headers(WEBHOOK_SECRET, body)),
                ("forged", {**signed_headers(WEBHOOK_SECRET, body), "svix-signature": "v1,Zm9yZ2Vk"}),
            ):
                header, traces[name] = traceparent()
                extra = {"traceparent": header, "x-request-id": f"delivery-{name}"}
                async with session.post(f"{base}/clerk-users-webhook", data=body, headers={**headers, **extra}) as r:
                    assert r.status == (200 if name == "applied" else 401)
            async with session.get(f"{base}/healthz") as r:
                assert r.status == 200
        spans = await receiver.wait_for(lambda found: all(in_trace(found, t) for t in traces.values()))
        deadline = time.monotonic() + 30
        while "authsvc_sync_last_success_timestamp_seconds" not in (gauges := await metrics(port)):
            assert time.monotonic() < deadline, "no periodic repair completed"
            await asyncio.sleep(0.2)
    finally:
        process.stop()

    applied, forged = server_span(spans, traces["applied"]), server_span(spans, traces["forged"])
    assert applied.service == "authsvc-webhook" and applied.name == "POST /clerk-users-webhook"
    expected = ((applied, 200, "user.created", "applied"), (forged, 401, "unknown", "rejected"))
    for span, status, kind, outcome in expected:
        assert span.attributes["http.route"] == "/clerk-users-webhook"
        assert span.attributes["http.response.status_code"] == status
        assert (span.attributes["authsvc.webhook.type"], span.attributes["authsvc.webhook.outcome"]) == (kind, outcome)
    writes = [s for s in children(spans, applied) if s.attributes.get("db.system") == "mongodb"]
    assert writes and all(s.kind == Span.CLIENT for s in writes)
    assert not [s for s in spans if s.attributes.get("http.route") == "/healthz"]  # probes are not traced
    emails = [a["email_address"] for a in event["data"]["email_addresses"]] + ["synced@example.org"]
    assert_nothing_secret(receiver, [WEBHOOK_SECRET, WEBHOOK_SECRET.removeprefix("whsec_"), SECRET, *emails])
    lines = {line["trace_id"]: line for line in log_lines(process, "webhook delivery")}
    assert lines[traces["applied"]]["span_id"] == applied.span_id
    assert lines[traces["applied"]]["request_id"] == "delivery-applied"
    assert lines[traces["forged"]]["outcome"] == "rejected"
    assert abs(gauges["authsvc_sync_last_success_timestamp_seconds"] - time.time()) < 60
    assert gauges["authsvc_database_up"] == 1
    assert "authsvc_jwks_age_seconds" not in gauges and "authsvc_user_cache_stale_seconds" not in gauges


async def test_without_an_endpoint_nothing_is_exported_and_lines_carry_no_trace(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    # A receiver on the SDK's default OTLP address: were a tracer installed without an endpoint, it would export here.
    receiver = OtlpReceiver()
    try:
        await receiver.start(grpc_port=4317)
    except RuntimeError:
        pytest.skip("127.0.0.1:4317 (the default OTLP address) is in use")
    await seed(store, "user_quiet")
    try:
        process, target, _ = await start_grpc("grpc-untraced", settings, issuer, tmp_path, OTEL_SERVICE_NAME="x")
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = authsvc_pb2_grpc.AuthServiceStub(channel)
                request = pb.VerifyTokenRequest(token=issuer.mint("user_quiet", azp=FRONTEND))
                await stub.VerifyToken(request, metadata=(("traceparent", traceparent()[0]),))
            await asyncio.sleep(0.5)
        finally:
            process.stop()
        [line] = log_lines(process, "rpc")
        assert "trace_id" not in line and line["code"] == "OK"
        assert receiver.requests == 0
    finally:
        await receiver.close()


def test_an_endpoint_is_ignored_when_the_sdk_is_disabled() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert tracing.wanted(endpoint)
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    assert not tracing.wanted({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert tracing.problems({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}) == [
        "OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, got 'http/json'"
    ]


async def test_without_the_extra_it_serves_and_an_endpoint_is_a_startup_problem(
    settings: Settings, store: UserStore, issuer: LocalIssuer, tmp_path: Path
) -> None:
    without = [sys.executable, "-m", "authsvc.dev.nootel", "grpc"]
    assert settings.mongodb_uri is not None
    env = child_env(
        MONGODB_URI=settings.mongodb_uri,
        CLERK_FRONTEND_API_URL=issuer.url,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317",
        AUTHSVC_CLOCK_SKEW_S="lots",
    )
    code, out, err = await run(*without, env=env)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "authsvc: AUTHSVC_CLOCK_SKEW_S input should be a valid integer, unable to parse string as an integer, "
        "got 'lots'",
        "authsvc: OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (opentelemetry): "
        "pip install 'authsvc[otel]'",
    ]
    await seed(store, "user_plain")
    process, target, _ = await start_grpc("grpc-no-extra", settings, issuer, tmp_path, without)
    try:
        async with AuthsvcClient(target) as client:
            assert (await client.verify(issuer.mint("user_plain", azp=FRONTEND))).subject == "user_plain"
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("mode", "logged"), [("all", ["OK", "PERMISSION_DENIED"]), ("errors", ["PERMISSION_DENIED"]), ("off", [])]
)
async def test_log_rpcs_writes_every_line_only_errors_or_none(
    settings: Settings,
    store: UserStore,
    issuer: LocalIssuer,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    logged: list[str],
) -> None:
    caplog.set_level(logging.INFO)
    async with serve(settings, store, issuer, log_rpcs=mode) as h:
        await h.seed("user_log")
        token = h.token("user_log")
        await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token))
        with pytest.raises(grpc.aio.AioRpcError):
            await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token, min_role=pb.ROLE_ADMIN))
        with pytest.raises(grpc.aio.AioRpcError):  # the call guard's line (undecodable request) obeys it too
            await unary(h.channel, f"/{SERVICE}/GetUser")(b"\xff\xff")
    codes = [r.__dict__["fields"]["code"] for r in caplog.records if r.getMessage() == "rpc"]
    assert sorted(codes) == sorted(logged + (["INVALID_ARGUMENT"] if mode != "off" else []))


async def test_jwks_age_counts_from_the_last_successful_fetch(settings: Settings, issuer: LocalIssuer) -> None:
    def exported() -> float:
        text = exposition.render().decode()
        [value] = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "authsvc_jwks_age_seconds"]  # fmt: skip
        return float(value)

    verifier = TokenVerifier(issuer_settings(settings, issuer), min_refetch_interval_s=0)
    await verifier.start()
    gauges = GaugeTicker([(jwks_age(), verifier.jwks_age_s)], interval_s=0.05)
    await gauges.start()
    try:
        assert exported() < 0.5
        await asyncio.sleep(0.6)
        issuer.down = True
        issuer.rotate()  # an unknown key: a fetch, which fails and leaves the age growing
        with pytest.raises(KeyNotFound):
            await verifier.verify(issuer.mint("user_age", azp=FRONTEND))
        await asyncio.sleep(0.1)
        assert exported() >= 0.6
        issuer.down = False
        await verifier.verify(issuer.mint("user_age", azp=FRONTEND))  # fetched: the age starts again
        await asyncio.sleep(0.1)
        assert exported() < 0.3
    finally:
        await gauges.close()
        await verifier.close()


def test_request_id_is_the_callers_when_printable_ascii_of_at_most_128() -> None:
    assert request_id("req-1 /x:y") == "req-1 /x:y"
    assert request_id("r" * 128) == "r" * 128
    for bad in (None, "", "r" * 129, "caf\u00e9", "a\nb", "a\x7fb"):
        found = request_id(bad)
        assert found != bad and len(found) == 16 and int(found, 16) >= 0


async def test_log_rpcs_off_still_reports_an_internal_failure_with_its_traceback(
    settings: Settings, store: UserStore, issuer: LocalIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    # A verifier that was never started fails with a RuntimeError (a bug, not an AuthError) when it needs keys.
    unstarted = issuer_settings(settings, issuer, log_rpcs="off")
    verifier = TokenVerifier(unstarted)
    sessions = SessionRules(RevokedSessions(store.revoked_sessions))
    roles = RoleAdmin(store, verifier, None, sessions)
    servicer = AuthServicer(store, verifier, store, roles, sessions, RpcLog("off"))
    server = await start_server(unstarted, servicer, store.ping)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = authsvc_pb2_grpc.AuthServiceStub(channel)
            request = pb.VerifyTokenRequest(token=issuer.mint("user_bug"))
            await stub.VerifyToken(request, metadata=(("x-request-id", "r-9"),))
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INTERNAL and err.details() == "internal error (request id r-9)"
    else:
        raise AssertionError("the call did not fail")
    finally:
        await server.stop(grace_s=0)
    [line] = [r for r in caplog.records if r.getMessage() == "rpc"]
    assert line.levelno == logging.ERROR and line.exc_info is not None
    assert line.__dict__["fields"]["request_id"] == "r-9"


async def test_an_unreachable_collector_delays_shutdown_by_at_most_the_flush_bound(
    settings: Settings, issuer: LocalIssuer, tmp_path: Path
) -> None:
    process, target, _ = await start_grpc(
        "grpc-collector-down",
        settings,
        issuer,
        tmp_path,
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        OTEL_EXPORTER_OTLP_TIMEOUT="30",
        OTEL_BSP_SCHEDULE_DELAY="60000",  # the spans are still queued at the signal
    )
    async with grpc.aio.insecure_channel(target) as channel:
        stub = authsvc_pb2_grpc.AuthServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetUser(pb.GetUserRequest(external_id="user_nobody"))
    began = time.monotonic()
    assert process.stop(timeout_s=60) == 0
    assert time.monotonic() - began < FLUSH_S + 3.0, process.tail()


def test_otlp_protos_that_do_not_import_are_named_as_a_broken_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from service import otel

    module = "opentelemetry.proto.common.v1.common_pb2"

    def clobbered(protocol: str) -> type:
        raise ImportError(f"cannot import name 'InstrumentationScope' from '{module}'", name=module)

    monkeypatch.setattr(otel, "exporter_class", clobbered)
    [problem] = tracing.problems({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert "does not import" in problem and "InstrumentationScope" in problem
    assert "pip install --force-reinstall --no-deps opentelemetry-proto" in problem

    def absent(protocol: str) -> type:
        raise ImportError("No module named 'opentelemetry.exporter.nothing'", name="opentelemetry.exporter.nothing")

    monkeypatch.setattr(otel, "exporter_class", absent)
    assert tracing.problems({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == [
        "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
        "(opentelemetry.exporter.nothing): pip install 'authsvc[otel]'"
    ]


def test_the_otlp_protos_on_disk_are_opentelemetry_protos() -> None:
    """xds-protos (the envoy extra) ships an older copy of opentelemetry/proto; opentelemetry-proto's must win.

    Which one a fresh install leaves depends on pip's install order; with
    xds-protos's, the OTLP exporters do not import and tracing cannot start.
    """
    import base64
    import importlib.metadata

    proto = importlib.metadata.distribution("opentelemetry-proto")
    checked = 0
    for record in proto.files or []:
        if record.hash is None or not str(record).endswith("_pb2.py"):
            continue
        digest = hashlib.new(record.hash.mode, Path(str(proto.locate_file(record))).read_bytes()).digest()
        expected = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4))
        assert digest == expected, f"{record} is not opentelemetry-proto's own: reinstall it (make install does)"
        checked += 1
    assert checked >= 10
