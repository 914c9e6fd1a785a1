"""The grpc.aio server interceptor inside a real test service, verifying through a real authsvc."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from authsvc_client import AuthsvcClient, Role, current_identity
from authsvc_client.interceptor import AuthInterceptor
from service.settings import Settings
from service.users import UserStore
from tests.grpc_helpers import Harness, reason_of, seed, serve
from tests.issuer import LocalIssuer

SERVICE = "demo.v1.Shop"
WHOAMI, REFUND, STREAM = f"/{SERVICE}/WhoAmI", f"/{SERVICE}/Refund", f"/{SERVICE}/Watch"


def _whoami() -> bytes:
    identity = current_identity()
    role = identity.role.wire if identity.role else None
    return json.dumps({"sub": identity.subject, "role": role}).encode()


async def whoami(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return _whoami()


def refund(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:  # a plain function handler works too
    return b"refunded " + request


async def watch(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield _whoami()


def shop_handler() -> grpc.GenericRpcHandler:
    same = {"request_deserializer": None, "response_serializer": None}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "WhoAmI": grpc.unary_unary_rpc_method_handler(whoami, **same),
            "Refund": grpc.unary_unary_rpc_method_handler(refund, **same),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, **same),
        },
    )


@dataclass
class Shop:
    h: Harness
    channel: grpc.aio.Channel

    async def call(self, method: str, token: str | None = None, header: str | None = None) -> bytes:
        metadata = (("authorization", header or f"Bearer {token}"),) if token or header else ()
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(method)
        reply: bytes = await call(b"order_1", metadata=metadata, timeout=10)
        return reply

    async def denied(self, method: str, token: str | None = None, header: str | None = None) -> tuple[str, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.call(method, token, header)
        return info.value.code().name, reason_of(info.value)


@pytest.fixture
async def shop(settings: Settings, store: UserStore, issuer: LocalIssuer) -> AsyncIterator[Shop]:
    async with serve(settings, store, issuer) as h, AuthsvcClient(h.target) as authsvc:
        interceptor = AuthInterceptor(authsvc, min_roles={REFUND: Role.ADMIN}, default=Role.STAFF)
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers((shop_handler(),))
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Shop(h, channel)
        finally:
            await server.stop(None)


async def test_an_allowed_call_sees_the_callers_identity(shop: Shop) -> None:
    await seed(shop.h.store, "user_admin", Role.ADMIN)
    token = shop.h.token("user_admin")
    assert json.loads(await shop.call(WHOAMI, token)) == {"sub": "user_admin", "role": "admin"}
    assert await shop.call(REFUND, token) == b"refunded order_1"


async def test_a_streaming_handler_sees_the_identity_too(shop: Shop) -> None:
    await seed(shop.h.store, "user_staff")
    metadata = (("authorization", f"Bearer {shop.h.token('user_staff')}"),)
    call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = shop.channel.unary_stream(STREAM)
    replies = [json.loads(reply) async for reply in call(b"", metadata=metadata, timeout=10)]
    assert replies == [{"sub": "user_staff", "role": "staff"}] * 2


async def test_each_denial_is_answered_by_the_interceptor_with_its_reason(shop: Shop) -> None:
    h = shop.h
    await seed(h.store, "user_staff")
    await seed(h.store, "user_banned", Role.ADMIN, active=False)
    assert await shop.denied(WHOAMI) == ("UNAUTHENTICATED", "TOKEN_MISSING")
    assert await shop.denied(WHOAMI, header="Basic dXNlcg==") == ("UNAUTHENTICATED", "TOKEN_MALFORMED")
    assert await shop.denied(WHOAMI, h.token("user_staff", ttl_s=-60)) == ("UNAUTHENTICATED", "TOKEN_EXPIRED")
    assert await shop.denied(REFUND, h.token("user_staff")) == ("PERMISSION_DENIED", "ROLE_TOO_LOW")
    assert await shop.denied(WHOAMI, h.token("user_banned")) == ("PERMISSION_DENIED", "USER_INACTIVE")
    assert await shop.denied(WHOAMI, h.token("user_new")) == ("PERMISSION_DENIED", "USER_NOT_SYNCED")


async def test_health_is_public(shop: Shop) -> None:
    check: grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse] = (
        shop.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
    )
    reply = await check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def denied_within_a_second(shop: Shop, method: str, token: str) -> str:
    """Call ``method`` until it is denied; its reason. Fails the test if it is still allowed after 1 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    while True:
        try:
            await shop.call(method, token)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            return reason_of(err)
        assert loop.time() < deadline, "the change did not reach the calling service within 1 s"
        await asyncio.sleep(0.02)


async def test_a_role_change_and_a_delete_are_seen_within_a_second(shop: Shop) -> None:
    await seed(shop.h.store, "user_admin", Role.ADMIN)
    token = shop.h.token("user_admin")
    for _ in range(3):
        assert await shop.call(REFUND, token) == b"refunded order_1"
    await seed(shop.h.store, "user_admin", Role.STAFF)
    assert await denied_within_a_second(shop, REFUND, token) == "ROLE_TOO_LOW"
    assert json.loads(await shop.call(WHOAMI, token))["role"] == "staff"
    await shop.h.store.delete("user_admin")
    assert await denied_within_a_second(shop, WHOAMI, token) == "USER_INACTIVE"


async def test_authsvc_down_is_unavailable(shop: Shop) -> None:
    await seed(shop.h.store, "user_staff")
    token = shop.h.token("user_staff")
    await shop.h.service.server.server.stop(None)
    code, _ = await shop.denied(WHOAMI, token)
    assert code == "UNAVAILABLE"


@dataclass(frozen=True)
class CallDetails:
    """What grpc.aio hands an interceptor about a call (``grpc.HandlerCallDetails``)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


@pytest.mark.parametrize(
    ("entry", "method", "public"),
    [
        ("/grpc.health.v1.Health", "/grpc.health.v1.Health/Check", True),
        ("/grpc.health.v1.Health/", "/grpc.health.v1.Health/Watch", True),
        ("/grpc.health.v1.Health", "/grpc.health.v1.HealthAdmin/Drop", False),
        ("/shop.v1.Shop/List", "/shop.v1.Shop/ListAll", False),
        ("/shop.v1.Shop/List", "/shop.v1.Shop/List", True),
    ],
)
async def test_public_entries_match_whole_segments_of_the_method(entry: str, method: str, public: bool) -> None:
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(lambda request, context: request)

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
        return handler

    details = cast(grpc.HandlerCallDetails, CallDetails(method))
    async with AuthsvcClient("127.0.0.1:9") as authsvc:
        interceptor = AuthInterceptor(authsvc, public=(entry,))
        assert (await interceptor.intercept_service(continuation, details) is handler) is public
