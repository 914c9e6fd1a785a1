"""Server reflection that also describes methods: ``grpcurl describe authsvc.v1.AuthService.VerifyToken``.

grpcio-reflection looks symbols up with ``DescriptorPool.FindFileContainingSymbol``,
which knows messages, enums and services but not methods (grpc/grpc#34743),
so describing a method answers NOT_FOUND. The Go and C++ servers answer with
the file of the method's service; this servicer asks grpcio-reflection for
that file instead, and otherwise is grpcio-reflection's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

Request = reflection_pb2.ServerReflectionRequest
Response = reflection_pb2.ServerReflectionResponse


def _service_of_method(symbol: str) -> str | None:
    """The full name of the service whose method is ``symbol``, or None when ``symbol`` is not a method."""
    try:
        return str(descriptor_pool.Default().FindMethodByName(symbol).containing_service.full_name)
    except KeyError:
        return None


async def _one(request: Request) -> AsyncIterator[Request]:
    yield request


class MethodAwareReflection(reflection.aio.ReflectionServicer):
    """grpcio-reflection's aio servicer, resolving ``package.Service.Method`` to its service's file."""

    # types-grpcio-reflection declares this a coroutine; grpcio-reflection's is an async generator, as here.
    async def ServerReflectionInfo(  # type: ignore[override]
        self, request_iterator: AsyncIterable[Request], unused_context: Any
    ) -> AsyncIterator[Response]:
        for_base = cast(Callable[..., AsyncIterable[Response]], super().ServerReflectionInfo)
        async for request in request_iterator:
            asked = request
            service = _service_of_method(request.file_containing_symbol) if request.file_containing_symbol else None
            if service is not None:
                asked = Request(host=request.host, file_containing_symbol=service)
            async for response in for_base(_one(asked), unused_context):
                response.original_request.CopyFrom(request)
                yield response


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for ``service_names`` (and for reflection itself) on ``server``."""
    servicer = MethodAwareReflection((*service_names, reflection.SERVICE_NAME))
    # The stub leaves this generated function untyped.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
