"""The one Backend API client against the fake Clerk on loopback: policy, mapping, quoting, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from prometheus_client import REGISTRY

from service.clerkapi import ClerkBackend, retry_after_seconds
from service.errors import ClerkKeyRefused, ClerkRejected, ClerkUnavailable, ClerkUserNotFound
from service.roles import Role
from tests.fakeclerk import SECRET, FakeClerk


@pytest.fixture
async def client(fake_clerk: FakeClerk) -> AsyncIterator[ClerkBackend]:
    backend = ClerkBackend(fake_clerk.url, SECRET, attempts=3, backoff_s=0.01, max_backoff_s=0.02)
    yield backend
    await backend.close()


def counted(op: str, status: str) -> float:
    return REGISTRY.get_sample_value("authsvc_clerk_requests_total", {"op": op, "status": status}) or 0.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [(None, 1.0), ("3", 3.0), ("0", 0.0), ("soon", 1.0), ("100000", 60.0), ("", 1.0)],
)
def test_retry_after_is_seconds_with_one_second_when_absent(header: str | None, seconds: float) -> None:
    assert retry_after_seconds(header, cap_s=60.0) == seconds


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25.0 <= retry_after_seconds(when, cap_s=60.0) <= 30.0


async def test_get_user_quotes_the_id_as_one_path_segment(fake_clerk: FakeClerk, client: ClerkBackend) -> None:
    odd = "user_a/../count?x=1"
    fake_clerk.add_user(odd, first_name="Odd")
    user = await client.get_user(odd)
    assert (user["id"], user["first_name"]) == (odd, "Odd")


async def test_answers_are_mapped_once(fake_clerk: FakeClerk, client: ClerkBackend) -> None:
    fake_clerk.add_user("user_1")
    with pytest.raises(ClerkUserNotFound):
        await client.get_user("user_nobody")
    fake_clerk.answer_next = [422]
    with pytest.raises(ClerkRejected, match="HTTP 422: form_param_value_invalid"):
        await client.set_role("user_1", Role.ADMIN)
    fake_clerk.answer_next = [404]  # a 404 on a listing is a wrong URL, not a missing user
    with pytest.raises(ClerkRejected):
        await client.count_users()
    fake_clerk.secret = "sk_test_rotated"
    with pytest.raises(ClerkKeyRefused, match=r"HTTP 401"):
        await client.list_users(offset=0)
    assert len(fake_clerk.seen) == 4  # none of these is retried


async def test_5xx_backs_off_a_bounded_number_of_times(fake_clerk: FakeClerk, client: ClerkBackend) -> None:
    before = counted("count_users", "503")
    fake_clerk.answer_next = [503, 503]
    assert await client.count_users() == 0  # the third attempt answers
    fake_clerk.answer_next = [503, 503, 503, 503]
    with pytest.raises(ClerkUnavailable, match=r"count_users \(HTTP 503\)"):
        await client.count_users()
    assert len(fake_clerk.requests("/v1/users/count")) == 6
    assert counted("count_users", "503") - before == 5


async def test_a_connection_refused_is_unavailable_and_counted(client: ClerkBackend) -> None:
    dead = ClerkBackend("http://127.0.0.1:9", SECRET, attempts=2, backoff_s=0.01)
    before = counted("get_user", "error")
    try:
        with pytest.raises(ClerkUnavailable, match="ClientConnectorError"):
            await dead.get_user("user_1")
    finally:
        await dead.close()
    assert counted("get_user", "error") - before == 2


async def test_set_role_merges_public_metadata(fake_clerk: FakeClerk, client: ClerkBackend) -> None:
    fake_clerk.add_user("user_1", role="staff")
    fake_clerk.users["user_1"]["public_metadata"]["team"] = "blue"
    answer = await client.set_role("user_1", Role.SUPERADMIN)
    assert fake_clerk.users["user_1"]["public_metadata"] == {"role": "superadmin", "team": "blue"}
    assert answer == fake_clerk.users["user_1"]  # the user as Clerk now holds it, its new updated_at included
    assert fake_clerk.metadata_patches == [("user_1", {"public_metadata": {"role": "superadmin"}}, f"Bearer {SECRET}")]


async def test_a_closed_client_opens_no_new_session(fake_clerk: FakeClerk) -> None:
    backend = ClerkBackend(fake_clerk.url, SECRET)
    assert await backend.count_users() == 0
    await backend.close()
    with pytest.raises(ClerkUnavailable, match="closed"):
        await backend.count_users()
    assert backend._session is None
