"""Metrics of one process: every kind of RPC counted with its code, the caches, the JWKS fetches.

The registry is the process's own (no worker directory), shared by every test
of this run, so each test compares the rendered text before and after its calls.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from authsvc.dev.procs import health_check
from authsvc_client.v1 import authsvc_pb2 as pb
from service import exposition
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import seed, serve
from tests.issuer import LocalIssuer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples() -> Samples:
    text = exposition.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    def total(found: Samples) -> float:
        return sum(v for (n, ls), v in found.items() if n == name and labels.items() <= dict(ls).items())

    return total(after) - total(before)


async def test_every_rpc_kind_is_counted_with_its_code(
    settings: Settings, store: UserStore, issuer: LocalIssuer
) -> None:
    async with serve(settings, store, issuer) as h:
        await seed(store, "user_m1")
        before = samples()
        token = h.token("user_m1")
        for _ in range(3):
            await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token))
        with pytest.raises(grpc.aio.AioRpcError):
            await h.stub.VerifyToken(pb.VerifyTokenRequest(token=token, min_role=pb.ROLE_SUPERADMIN))
        with pytest.raises(grpc.aio.AioRpcError):
            await h.stub.GetUser(pb.GetUserRequest(external_id=""))
        await health_check(h.channel)(health_pb2.HealthCheckRequest())
        watch = h.channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )(health_pb2.HealthCheckRequest())
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        channel: Any = h.channel  # the reflection stub is typed for a sync channel only
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        reflect = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert [r async for r in reflect]
        await asyncio.sleep(0.2)  # the cancelled Watch finishes on the server
        after = samples()

    handled = "grpc_server_handled_total"
    assert grew(before, after, handled, grpc_method="VerifyToken", grpc_code="OK", grpc_type="unary") == 3
    assert grew(before, after, handled, grpc_method="VerifyToken", grpc_code="PERMISSION_DENIED") == 1
    assert grew(before, after, handled, grpc_method="GetUser", grpc_code="INVALID_ARGUMENT") == 1
    assert grew(before, after, handled, grpc_method="Check", grpc_code="OK") == 1
    assert grew(before, after, handled, grpc_method="Watch", grpc_type="server_stream", grpc_code="CANCELLED") == 1
    assert grew(before, after, handled, grpc_method="ServerReflectionInfo", grpc_type="bidi_stream") == 1
    assert grew(before, after, "grpc_server_started_total", grpc_service="authsvc.v1.AuthService") == 5
    assert grew(before, after, "grpc_server_handling_seconds_count", grpc_method="VerifyToken") == 4
    assert grew(before, after, "authsvc_denials_total", method="VerifyToken", reason="ROLE_TOO_LOW") == 1
    assert grew(before, after, "authsvc_denials_total", method="GetUser", reason="INVALID_ARGUMENT") == 1
    # One verification, then the result cache; the user cache counts every read.
    assert grew(before, after, "authsvc_token_cache_total", result="miss") == 1
    assert grew(before, after, "authsvc_token_cache_total", result="hit") == 3
    assert grew(before, after, "authsvc_user_cache_total") == 4


async def test_jwks_fetches_are_counted_by_outcome(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    before = samples()
    async with serve(settings, store, issuer) as h:
        issuer.down = True
        with pytest.raises(grpc.aio.AioRpcError):  # an unknown kid: one refetch, which fails
            await h.stub.VerifyToken(pb.VerifyTokenRequest(token=h.token("user_m2", headers={"kid": "other"})))
    after = samples()
    assert grew(before, after, "authsvc_jwks_fetches_total", outcome="ok") == 1
    assert grew(before, after, "authsvc_jwks_fetches_total", outcome="error") == 1
