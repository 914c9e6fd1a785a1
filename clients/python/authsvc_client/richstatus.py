"""``google.rpc.Status`` with an ``ErrorInfo`` detail, without googleapis-common-protos.

The rich status travels in the ``grpc-status-details-bin`` trailer. The
messages are declared here in a *private* descriptor pool: registering a
second ``google/rpc/status.proto`` in the default pool would clash with
googleapis-common-protos in any process that also loads it (the authsvc server
does, through grpcio-status). Decoding never raises: a trailer that is absent
or does not parse gives no reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message, message_factory

DETAILS_KEY = "grpc-status-details-bin"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"

_F = descriptor_pb2.FieldDescriptorProto


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(any_pb2.DESCRIPTOR.serialized_pb))
    rpc = descriptor_pb2.FileDescriptorProto(
        name="authsvc_client/google_rpc.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    status = rpc.message_type.add(name="Status")
    status.field.add(name="code", number=1, type=_F.TYPE_INT32, label=_F.LABEL_OPTIONAL)
    status.field.add(name="message", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    status.field.add(
        name="details", number=3, type=_F.TYPE_MESSAGE, label=_F.LABEL_REPEATED, type_name=".google.protobuf.Any"
    )
    info = rpc.message_type.add(name="ErrorInfo")
    info.field.add(name="reason", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    info.field.add(name="domain", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    entry = info.nested_type.add(name="MetadataEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    info.field.add(
        name="metadata",
        number=3,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_REPEATED,
        type_name=".google.rpc.ErrorInfo.MetadataEntry",
    )
    pool.Add(rpc)
    return pool


_POOL = _pool()
_Status: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("google.rpc.Status"))
_ErrorInfo: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("google.rpc.ErrorInfo"))


@dataclass(frozen=True)
class ErrorInfo:
    """The ``google.rpc.ErrorInfo`` detail of a failed call."""

    reason: str
    domain: str
    metadata: dict[str, str] = field(default_factory=dict)


def encode(code: int, text: str, info: ErrorInfo) -> bytes:
    """The ``grpc-status-details-bin`` value of status ``code`` with one ErrorInfo detail."""
    status = _Status(code=code, message=text)
    detail = _ErrorInfo(reason=info.reason, domain=info.domain, metadata=info.metadata)
    status.details.add(type_url=ERROR_INFO_TYPE, value=detail.SerializeToString())
    return bytes(status.SerializeToString())


def decode(details: bytes) -> ErrorInfo | None:
    """The first ErrorInfo in a serialized ``google.rpc.Status``; None when there is none or it does not parse."""
    try:
        status = _Status.FromString(details)
        for detail in status.details:
            if detail.type_url == ERROR_INFO_TYPE:
                info = _ErrorInfo.FromString(detail.value)
                return ErrorInfo(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
    except message.DecodeError:
        return None
    return None


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> ErrorInfo | None:
    """The ErrorInfo carried in trailing metadata (``grpc-status-details-bin``), if any."""
    for key, value in metadata or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            return decode(value)
    return None
