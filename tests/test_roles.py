"""Role order and parsing: pure."""

from __future__ import annotations

import pytest

from authsvc_client.v1 import authsvc_pb2
from service.roles import DEFAULT_ROLE, Role


def test_superadmin_outranks_admin_outranks_staff() -> None:
    assert Role.SUPERADMIN > Role.ADMIN > Role.STAFF
    assert Role.ADMIN.at_least(Role.STAFF) and Role.ADMIN.at_least(Role.ADMIN)
    assert not Role.STAFF.at_least(Role.ADMIN)


@pytest.mark.parametrize(
    ("raw", "role"),
    [
        ("superadmin", Role.SUPERADMIN),
        ("Admin", Role.ADMIN),
        (" staff ", Role.STAFF),
        ("owner", None),
        (3, None),
        (None, None),
        ("", None),
    ],
)
def test_parse_only_known_names(raw: object, role: Role | None) -> None:
    assert Role.parse(raw) is role


def test_default_is_the_lowest_role() -> None:
    assert DEFAULT_ROLE is min(Role)


def test_numbers_match_the_proto_enum() -> None:
    for role in Role:
        assert authsvc_pb2.Role.Value(f"ROLE_{role.name}") == role.value
    assert role.wire == role.name.lower()
