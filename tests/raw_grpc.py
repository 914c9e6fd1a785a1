"""Raw-bytes calls to any gRPC method: what a hostile or broken client puts on the wire."""

from __future__ import annotations

import grpc

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def _same(data: bytes) -> bytes:
    return data


def unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(method, request_serializer=_same, response_deserializer=_same)


def unary_stream(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(method, request_serializer=_same, response_deserializer=_same)


def stream_stream(channel: grpc.aio.Channel, method: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
    return channel.stream_stream(method, request_serializer=_same, response_deserializer=_same)
