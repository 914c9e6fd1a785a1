"""SetRole under concurrency and a slow Clerk (issue 13, defects 4, 5, 6).

Two gRPC replicas over one database, each with its own Clerk client, and the
fake Clerk (429 with ``Retry-After``, answers delayed after the change is
applied, gates that hold one chosen request). After every scenario: at least
one active superadmin in MongoDB and in Clerk, Clerk's role equals MongoDB's
for every user involved as soon as the calls have returned, every OK stands,
and the audit holds no revert.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import grpc
import pytest

from authsvc_client.v1 import authsvc_pb2 as pb
from service.clerkuser import profile_of
from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests.conftest import open_test_database
from tests.fakeclerk import FakeClerk
from tests.grpc_helpers import Harness, reason_of, serve
from tests.issuer import LocalIssuer

A, B, C, U = "user_a", "user_b", "user_c", "user_u"
Outcome = pb.User | grpc.aio.AioRpcError


@contextlib.asynccontextmanager
async def replicas(
    settings: Settings, store: UserStore, issuer: LocalIssuer, clerk: FakeClerk | None
) -> AsyncIterator[tuple[Harness, Harness]]:
    """Two gRPC services over one database, each with its own database client (and Clerk client)."""
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(serve(settings, store, issuer, clerk=clerk))
        database = await open_test_database(settings)
        stack.push_async_callback(database.close)
        other = UserStore(database.db, write_concern=database.write_concern)
        two = await stack.enter_async_context(serve(settings, other, issuer, clerk=clerk))
        yield one, two


async def set_role(h: Harness, caller: str, target: str, role: Role) -> Outcome:
    """SetRole by ``caller``: the user it returns, or the error it failed with."""
    request = pb.SetRoleRequest(external_id=target, role=int(role))  # type: ignore[arg-type]
    try:
        return await h.stub.SetRole(request, metadata=h.bearer(caller), timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc


def clerk_role(clerk: FakeClerk, user_id: str) -> Role:
    role = Role.parse(clerk.users[user_id]["public_metadata"].get("role"))
    assert role is not None
    return role


async def mongo_role(store: UserStore, user_id: str) -> Role:
    user = await store.get(user_id)
    assert user is not None
    return user.role


async def assert_agree(store: UserStore, clerk: FakeClerk | None, users: tuple[str, ...]) -> dict[str, Role]:
    """Clerk and MongoDB hold the same role for each user (checked at once: no webhook repairs it)."""
    roles = {user: await mongo_role(store, user) for user in users}
    if clerk is not None:
        assert {user: clerk_role(clerk, user) for user in users} == roles
    return roles


async def assert_superadmin_remains(store: UserStore, clerk: FakeClerk | None) -> None:
    assert await store.active_superadmins(limit=1), "no active superadmin left in MongoDB"
    if clerk is not None:
        assert any(
            u["public_metadata"].get("role") == "superadmin" and not (u["banned"] or u["locked"])
            for u in clerk.users.values()
        ), "no active superadmin left in Clerk"


async def assert_no_revert(store: UserStore) -> None:
    reverts = [doc async for doc in store.role_changes.find({"via": "grpc-revert"}, {"_id": 0, "at": 0})]
    assert reverts == []


def refused(outcome: Outcome) -> str | None:
    """The ErrorInfo reason of a failed call; None for an OK."""
    return reason_of(outcome) if isinstance(outcome, grpc.aio.AioRpcError) else None


async def test_a_demotion_slowed_by_clerk_cannot_remove_the_last_superadmin(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk
) -> None:
    # Defect 4: A is the only superadmin, B an admin. A demotes B to staff; Clerk answers 429 and
    # the call waits its Retry-After. Meanwhile A promotes B to superadmin, then demotes itself.
    # Then the first call's retry reaches Clerk.
    async with replicas(settings, store, issuer, fake_clerk) as (one, two):
        await one.seed(A, Role.SUPERADMIN)
        await one.seed(B, Role.ADMIN)
        fake_clerk.retry_after = "1"
        fake_clerk.answer_next = [429]
        retry = fake_clerk.hold("PATCH", B, nth=2)  # the retry after the 429 waits here until released
        first = asyncio.create_task(set_role(one, A, B, Role.STAFF))
        async with asyncio.timeout(10):
            await retry.arrived.wait()
        promote = asyncio.create_task(set_role(two, A, B, Role.SUPERADMIN))
        await asyncio.wait([promote], timeout=1.0)  # done at once, unless it waits for the first call
        demote_self = await set_role(one, A, A, Role.ADMIN)
        retry.release()
        outcomes = [await first, await promote, demote_self]
        assert refused(outcomes[2]) in (None, "LAST_SUPERADMIN")
        assert [refused(o) for o in outcomes[:2]] == [None, None]
    await assert_superadmin_remains(store, fake_clerk)
    roles = await assert_agree(store, fake_clerk, (A, B))
    # Serialized per user, the promotion comes last and stands.
    assert roles[B] is Role.SUPERADMIN
    await assert_no_revert(store)


@pytest.mark.parametrize("with_clerk", [True, False], ids=["clerk", "mongodb-only"])
async def test_superadmins_demoting_each_other_never_see_an_ok_undone(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk, with_clerk: bool
) -> None:
    # Defect 5: three superadmins demote each other (all six pairs) at once, on two replicas.
    clerk = fake_clerk if with_clerk else None
    rng = random.Random(5)
    fake_clerk.answer_delay = lambda: rng.uniform(0, 0.05)
    pairs = [(caller, target) for caller in (A, B, C) for target in (A, B, C) if caller != target]
    async with replicas(settings, store, issuer, clerk) as (one, two):
        for _ in range(4):
            for user in (A, B, C):
                await one.seed(user, Role.SUPERADMIN)
            outcomes = await asyncio.gather(
                *(set_role((one, two)[i % 2], caller, target, Role.ADMIN) for i, (caller, target) in enumerate(pairs))
            )
            roles = await assert_agree(store, clerk, (A, B, C))
            for (caller, target), outcome in zip(pairs, outcomes, strict=True):
                reason = refused(outcome)
                assert reason in (None, "LAST_SUPERADMIN", "CALLER_NOT_SUPERADMIN"), (caller, target, reason)
                if reason is None:
                    assert roles[target] is Role.ADMIN, f"{caller} demoted {target}: OK, then undone"
            assert list(roles.values()).count(Role.SUPERADMIN) == 1
            await assert_superadmin_remains(store, clerk)
    await assert_no_revert(store)


async def test_two_changes_to_one_user_leave_clerk_and_mongodb_agreeing(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk
) -> None:
    # Defect 6: two SetRole calls on one user (staff, admin), Clerk's answer delayed 0-300 ms.
    rng = random.Random(6)
    fake_clerk.answer_delay = lambda: rng.uniform(0, 0.3)
    async with replicas(settings, store, issuer, fake_clerk) as (one, two):
        await one.seed(A, Role.SUPERADMIN)
        await one.seed(U, Role.STAFF)
        for _ in range(10):
            outcomes = await asyncio.gather(set_role(one, A, U, Role.STAFF), set_role(two, A, U, Role.ADMIN))
            assert [refused(o) for o in outcomes] == [None, None]
            await assert_agree(store, fake_clerk, (A, U))


async def test_a_late_webhook_cannot_undo_a_set_role(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk
) -> None:
    # SetRole's MongoDB write keeps Clerk's updated_at, so an older event of the user loses to it.
    async with serve(settings, store, issuer, clerk=fake_clerk) as h:
        await h.seed(A, Role.SUPERADMIN)
        await h.seed(U, Role.STAFF)
        older = fake_clerk.update_user(U, first_name="Renamed")  # its user.updated is still on its way
        await set_role(h, A, U, Role.ADMIN)
    outcome = await store.upsert_from_clerk(profile_of(older), "msg_late")
    assert not outcome.applied
    assert await assert_agree(store, fake_clerk, (U,)) == {U: Role.ADMIN}

