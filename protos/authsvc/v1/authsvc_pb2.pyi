import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_STAFF: _ClassVar[Role]
    ROLE_ADMIN: _ClassVar[Role]
    ROLE_SUPERADMIN: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_STAFF: Role
ROLE_ADMIN: Role
ROLE_SUPERADMIN: Role

class User(_message.Message):
    __slots__ = ("external_id", "name", "email", "role", "is_active", "created_at", "updated_at", "last_login_at")
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EMAIL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    IS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_LOGIN_AT_FIELD_NUMBER: _ClassVar[int]
    external_id: str
    name: str
    email: str
    role: Role
    is_active: bool
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    last_login_at: _timestamp_pb2.Timestamp
    def __init__(self, external_id: _Optional[str] = ..., name: _Optional[str] = ..., email: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., is_active: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_login_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class VerifyTokenRequest(_message.Message):
    __slots__ = ("token", "min_role")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MIN_ROLE_FIELD_NUMBER: _ClassVar[int]
    token: str
    min_role: Role
    def __init__(self, token: _Optional[str] = ..., min_role: _Optional[_Union[Role, str]] = ...) -> None: ...

class VerifyTokenResponse(_message.Message):
    __slots__ = ("subject", "session_id", "authorized_party", "expires_at", "user", "claims")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZED_PARTY_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    subject: str
    session_id: str
    authorized_party: str
    expires_at: _timestamp_pb2.Timestamp
    user: User
    claims: _struct_pb2.Struct
    def __init__(self, subject: _Optional[str] = ..., session_id: _Optional[str] = ..., authorized_party: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., user: _Optional[_Union[User, _Mapping]] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GetUserRequest(_message.Message):
    __slots__ = ("external_id",)
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    external_id: str
    def __init__(self, external_id: _Optional[str] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("external_id", "role")
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    external_id: str
    role: Role
    def __init__(self, external_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...
