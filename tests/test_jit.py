"""Just-in-time sync in VerifyToken: a real gRPC server, database, JWKS issuer and fake Clerk on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from authsvc_client.v1 import authsvc_pb2 as pb
from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests.fakeclerk import FakeClerk
from tests.grpc_helpers import Harness, reason_of, serve
from tests.issuer import LocalIssuer

NEW = "user_new"
GET_USER = "/v1/users/{id}"


@pytest.fixture
async def h(settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk) -> AsyncIterator[Harness]:
    async with serve(settings, store, issuer, clerk=fake_clerk) as harness:
        yield harness


async def verify(h: Harness, subject: str, min_role: pb.Role.ValueType = pb.ROLE_UNSPECIFIED) -> pb.VerifyTokenResponse:
    reply: pb.VerifyTokenResponse = await h.stub.VerifyToken(
        pb.VerifyTokenRequest(token=h.token(subject), min_role=min_role)
    )
    return reply


async def denied(h: Harness, subject: str, min_role: pb.Role.ValueType = pb.ROLE_STAFF) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await verify(h, subject, min_role)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return reason_of(info.value)


async def test_an_unsynced_user_is_fetched_written_and_answered(h: Harness, fake_clerk: FakeClerk) -> None:
    fake_clerk.add_user(NEW, first_name="Grace", last_name="Hopper", role="admin")
    reply = await verify(h, NEW, pb.ROLE_ADMIN)
    assert (reply.user.external_id, reply.user.name, reply.user.role) == (NEW, "Grace Hopper", pb.ROLE_ADMIN)
    stored = await h.store.get(NEW)
    assert stored is not None and stored.role is Role.ADMIN and stored.email == "user_new@example.com"
    # Synced now: the next call reads MongoDB and asks Clerk nothing.
    await verify(h, NEW, pb.ROLE_ADMIN)
    assert len(fake_clerk.requests(GET_USER)) == 1


async def test_thirty_concurrent_calls_for_one_user_share_one_fetch(h: Harness, fake_clerk: FakeClerk) -> None:
    fake_clerk.add_user(NEW, role="staff")
    fake_clerk.delay_s = 0.3  # every call arrives while the one fetch is in flight
    replies = await asyncio.gather(*(verify(h, NEW, pb.ROLE_STAFF) for _ in range(30)))
    assert {r.user.external_id for r in replies} == {NEW}
    assert len(fake_clerk.requests(GET_USER)) == 1
    assert await h.store.users.count_documents({"externalId": NEW}) == 1


async def test_a_404_is_remembered(h: Harness, fake_clerk: FakeClerk) -> None:
    assert await denied(h, "user_ghost") == "USER_NOT_SYNCED"
    assert await denied(h, "user_ghost") == "USER_NOT_SYNCED"
    reply = await verify(h, "user_ghost")  # without min_role an unsynced user passes, with no user
    assert not reply.HasField("user")
    assert len(fake_clerk.requests(GET_USER)) == 1


async def test_clerk_silent_past_one_second_is_answered_as_not_synced(h: Harness, fake_clerk: FakeClerk) -> None:
    fake_clerk.add_user(NEW)
    fake_clerk.hang = True  # Clerk never answers while the call is made
    try:
        assert await denied(h, NEW) == "USER_NOT_SYNCED"
        assert await h.store.get(NEW) is None
    finally:
        fake_clerk.release()


async def test_clerk_failing_is_answered_as_not_synced(h: Harness, fake_clerk: FakeClerk) -> None:
    fake_clerk.add_user(NEW)
    fake_clerk.fail = True
    assert await denied(h, NEW) == "USER_NOT_SYNCED"
    fake_clerk.fail = False
    reply = await verify(h, NEW, pb.ROLE_STAFF)  # a failure is not remembered as a 404
    assert reply.user.external_id == NEW


async def test_a_banned_user_fetched_from_clerk_is_denied(h: Harness, fake_clerk: FakeClerk) -> None:
    fake_clerk.add_user(NEW, banned=True)
    assert await denied(h, NEW, pb.ROLE_UNSPECIFIED) == "USER_INACTIVE"


async def test_a_deleted_user_is_not_fetched_again(h: Harness, fake_clerk: FakeClerk) -> None:
    await h.store.delete(NEW)  # a user.deleted before any create: a tombstone
    fake_clerk.add_user(NEW)
    assert await denied(h, NEW, pb.ROLE_UNSPECIFIED) == "USER_INACTIVE"
    assert fake_clerk.requests(GET_USER) == []


async def test_fetches_are_limited_to_twenty_a_second(h: Harness, fake_clerk: FakeClerk) -> None:
    subjects = [f"user_flood_{i}" for i in range(60)]
    for subject in subjects:
        fake_clerk.add_user(subject)
    replies = await asyncio.gather(*(verify(h, s) for s in subjects))
    synced = sum(r.HasField("user") for r in replies)
    arrivals = sorted(seen.at for seen in fake_clerk.requests(GET_USER))
    # Calls that could not fetch within their 1 s bound were answered as not synced...
    assert 0 < synced <= len(arrivals) < len(subjects)
    # ...and Clerk never saw more than 20 a second (one more at a window's edge, one for loopback jitter).
    assert max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals) <= 22


async def test_jit_off_never_asks_clerk(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk
) -> None:
    fake_clerk.add_user(NEW)
    async with serve(settings, store, issuer, clerk=fake_clerk, jit_sync=False) as h:
        assert await denied(h, NEW) == "USER_NOT_SYNCED"
    assert fake_clerk.requests(GET_USER) == []
    assert await store.get(NEW) is None


async def test_without_a_secret_key_there_is_no_jit(settings: Settings, store: UserStore, issuer: LocalIssuer) -> None:
    async with serve(settings, store, issuer) as h:
        assert h.service.reader is h.service.users
        assert await denied(h, NEW) == "USER_NOT_SYNCED"
