"""Clerk payload mapping: pure."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from service.clerkuser import profile_of
from service.errors import InvalidEvent
from service.roles import Role
from tests.sidecar import fixture
from webhook.events import login_from_event, parse_event, profile_from_event


def event_of(name: str, **data: object):  # type: ignore[no-untyped-def]
    return parse_event(json.dumps(fixture(name, **data)).encode())


def test_user_created_fixture_maps_to_profile() -> None:
    profile = profile_from_event(event_of("user.created"))
    assert profile.external_id == "user_2pQm7sX9aLkT4vB1nR8cYe3Hd0F"
    assert profile.name == "Ada Lovelace"
    assert profile.email == "ada@analytical.example"
    assert profile.role is Role.ADMIN
    assert profile.is_active is True
    assert profile.clerk_updated_at == datetime.fromtimestamp(1764062100, tz=UTC)


def test_primary_email_missing_falls_back_to_first() -> None:
    profile = profile_from_event(event_of("user.created", primary_email_address_id="idn_gone"))
    assert profile.email == "ada@old.example"


def test_clerk_external_id_is_not_ours() -> None:
    profile = profile_from_event(event_of("user.created", external_id="legacy-42"))
    assert profile.external_id == "user_2pQm7sX9aLkT4vB1nR8cYe3Hd0F"


def test_unknown_role_is_staff_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    profile = profile_from_event(event_of("user.created", public_metadata={"role": "root"}))
    assert profile.role is Role.STAFF
    assert any("unknown role" in r.getMessage() for r in caplog.records)


def test_session_login_time_prefers_created_at_then_envelope() -> None:
    user_id, at = login_from_event(event_of("session.created"))
    assert user_id == "user_2pQm7sX9aLkT4vB1nR8cYe3Hd0F"
    assert at == datetime.fromtimestamp(1764063400, tz=UTC)
    body = fixture("session.created")
    del body["data"]["created_at"]
    _, at2 = login_from_event(parse_event(json.dumps(body).encode()))
    assert at2 == datetime.fromtimestamp(1764063400.3, tz=UTC)


@pytest.mark.parametrize(
    "data",
    [
        {"banned": "yes"},
        {"first_name": 7},
        {"public_metadata": "admin"},
        {"updated_at": -5},
        {"updated_at": True},
        {"id": ""},
    ],
)
def test_wrong_types_are_invalid_events(data: dict[str, object]) -> None:
    with pytest.raises(InvalidEvent):
        profile_from_event(event_of("user.created", **data))


def test_non_utf8_body_is_invalid() -> None:
    with pytest.raises(InvalidEvent):
        parse_event(b"\xff\xfe{}")


def test_a_deeply_nested_body_parses_and_is_judged_by_its_shape() -> None:
    with pytest.raises(InvalidEvent, match="must be a JSON object"):
        parse_event(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(InvalidEvent, match="not JSON"):
        parse_event(b"[" * 100_000 + b"]" * 99_999)


def test_an_integer_past_the_parser_limit_in_a_field_authsvc_reads_is_invalid() -> None:
    body = b'{"type": "user.created", "data": {"id": "user_1", "updated_at": ' + b"9" * 5000 + b"}}"
    with pytest.raises(InvalidEvent, match=r"data\.updated_at must be a Unix time"):
        profile_from_event(parse_event(body))


def test_a_role_of_any_shape_maps_to_staff_without_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    deep: list[object] = []
    for _ in range(5000):  # deeper than repr() goes
        deep = [deep]
    for raw in (deep, {"a": deep}, 10**60, 1.5, True, "x" * 100_000):
        data = fixture("user.created", public_metadata={"role": raw})["data"]
        assert profile_of(data).role is Role.STAFF
    logged = [r.fields["role"] for r in caplog.records if "unknown role" in r.getMessage()]  # type: ignore[attr-defined]
    assert len(logged) == 6 and all(isinstance(role, str) and len(role) <= 80 for role in logged), logged
