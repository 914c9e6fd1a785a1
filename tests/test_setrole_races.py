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
import copy
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from authsvc_client.v1 import authsvc_pb2 as pb
from service.clerkapi import ClerkBackend
from service.clerkuser import profile_of
from service.errors import ClerkUnavailable, DatabaseUnavailable
from service.rolechanges import RoleChanges
from service.roles import Role
from service.settings import Settings
from service.users import UserStore
from tests.conftest import open_test_database
from tests.fakeclerk import SECRET, FakeClerk
from tests.grpc_helpers import Harness, reason_of, seed, serve
from tests.issuer import LocalIssuer

A, B, C, U = "user_a", "user_b", "user_c", "user_u"
HOUR = timedelta(hours=1)
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


async def assert_audit_chain(store: UserStore, user: str, first: Role, final: Role) -> None:
    """The audit holds the changes that happened to ``user``, in order: from ``first`` to ``final``, no revert."""
    changes = [doc async for doc in store.role_changes.find({"externalId": user}).sort("_id", 1)]
    assert all(doc["via"] != "grpc-revert" and doc["from"] != doc["to"] for doc in changes), changes
    roles = [first.wire] + [doc["to"] for doc in changes]
    assert [doc["from"] for doc in changes] == roles[:-1], changes
    assert roles[-1] == final.wire, changes


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
        reached = fake_clerk.hold("PATCH", B)
        first = asyncio.create_task(set_role(one, A, B, Role.STAFF))
        async with asyncio.timeout(10):
            await reached.arrived.wait()
        reached.release()  # answered 429: the first call waits 1 s before its retry
        promote = asyncio.create_task(set_role(two, A, B, Role.SUPERADMIN))
        await asyncio.wait([promote], timeout=0.5)  # done at once, unless it waits for the first call
        demote_self = await set_role(one, A, A, Role.ADMIN)
        outcomes = [await first, await promote, demote_self]
        assert refused(outcomes[2]) in (None, "LAST_SUPERADMIN")
        assert [refused(o) for o in outcomes[:2]] == [None, None]
    await assert_superadmin_remains(store, fake_clerk)
    roles = await assert_agree(store, fake_clerk, (A, B))
    # Serialized per user, the promotion comes last and stands.
    assert roles[B] is Role.SUPERADMIN
    await assert_audit_chain(store, B, Role.ADMIN, Role.SUPERADMIN)


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
    for user, role in roles.items():
        await assert_audit_chain(store, user, Role.SUPERADMIN, role)


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
            roles = await assert_agree(store, fake_clerk, (A, U))
    await assert_audit_chain(store, U, Role.STAFF, roles[U])


async def test_a_late_webhook_cannot_undo_a_set_role(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk
) -> None:
    # SetRole's MongoDB write keeps Clerk's updated_at, so an older event of the user loses to it.
    async with serve(settings, store, issuer, clerk=fake_clerk) as h:
        await h.seed(A, Role.SUPERADMIN)
        await h.seed(U, Role.STAFF)
        # Renamed in Clerk: its user.updated (staff, this updated_at) is still on its way.
        older = copy.deepcopy(fake_clerk.update_user(U, first_name="Renamed"))
        assert refused(await set_role(h, A, U, Role.ADMIN)) is None
    outcome = await store.upsert_from_clerk(profile_of(older), "msg_late")
    assert not outcome.applied
    assert await assert_agree(store, fake_clerk, (U,)) == {U: Role.ADMIN}


async def test_a_caller_that_goes_away_does_not_cut_the_change_between_clerk_and_mongodb(
    settings: Settings, store: UserStore, issuer: LocalIssuer, fake_clerk: FakeClerk
) -> None:
    async with serve(settings, store, issuer, clerk=fake_clerk) as h:
        await h.seed(A, Role.SUPERADMIN)
        await h.seed(U, Role.STAFF)
        answer = fake_clerk.hold("PATCH", U, applied=True)  # Clerk made the change; its answer is slow
        request = pb.SetRoleRequest(external_id=U, role=pb.ROLE_ADMIN)
        call = h.stub.SetRole(request, metadata=h.bearer(A), timeout=5)
        async with asyncio.timeout(10):
            await answer.arrived.wait()
        call.cancel()  # the caller gives up: its change carries on
        with pytest.raises(asyncio.CancelledError):
            await call
        answer.release()
        async with asyncio.timeout(5):
            while await mongo_role(store, U) is not Role.ADMIN:
                await asyncio.sleep(0.02)
        assert await assert_agree(store, fake_clerk, (U,)) == {U: Role.ADMIN}
        assert refused(await set_role(h, A, U, Role.STAFF)) is None  # its leases were released


# --- the change itself (RoleChanges), with a Clerk client of short timeouts -------------
@pytest.fixture
async def short_clerk(fake_clerk: FakeClerk) -> AsyncIterator[ClerkBackend]:
    client = ClerkBackend(fake_clerk.url, SECRET, timeout_s=0.3, attempts=1)
    yield client
    await client.close()


async def mirrored(store: UserStore, clerk: FakeClerk, user_id: str, role: Role) -> None:
    await store.upsert_from_clerk(profile_of(clerk.add_user(user_id, role=role.wire)))


async def test_a_lost_clerk_answer_is_read_back_and_the_change_stands(
    store: UserStore, fake_clerk: FakeClerk, short_clerk: ClerkBackend
) -> None:
    await mirrored(store, fake_clerk, U, Role.STAFF)
    answer = fake_clerk.hold("PATCH", U, applied=True)  # applied, answered after the client's timeout
    record = await RoleChanges(store, short_clerk).apply(A, U, Role.ADMIN)
    answer.release()
    assert record.role is Role.ADMIN
    assert await assert_agree(store, fake_clerk, (U,)) == {U: Role.ADMIN}
    assert [(d["to"], d["by"], d["via"]) async for d in store.role_changes.find({})] == [("admin", A, "grpc")]
    assert await store.leases.count_documents({}) == 0


async def test_a_change_of_unknown_outcome_keeps_its_lease_until_it_expires(
    store: UserStore, fake_clerk: FakeClerk, short_clerk: ClerkBackend
) -> None:
    await mirrored(store, fake_clerk, U, Role.STAFF)
    patch = fake_clerk.hold("PATCH", U)  # neither the write nor the read-back is answered in time
    read_back = fake_clerk.hold("GET", U)
    changes = RoleChanges(store, short_clerk, lease_ttl_s=2.5, wait_s=0.2)
    with pytest.raises(ClerkUnavailable):
        await changes.apply(A, U, Role.ADMIN)
    assert await mongo_role(store, U) is Role.STAFF
    assert await store.role_changes.count_documents({}) == 0
    # The write may still land: no other change of this user until the lease expires.
    with pytest.raises(ClerkUnavailable, match="in progress"):
        await changes.apply(A, U, Role.SUPERADMIN)
    patch.release()
    read_back.release()
    record = await RoleChanges(store, short_clerk, wait_s=5.0).apply(A, U, Role.SUPERADMIN)
    assert record.role is Role.SUPERADMIN
    assert await assert_agree(store, fake_clerk, (U,)) == {U: Role.SUPERADMIN}


async def test_a_lease_left_by_a_dead_replica_delays_the_change_until_it_expires(store: UserStore) -> None:
    await seed(store, A, Role.SUPERADMIN)
    await seed(store, U, Role.STAFF)
    expires = datetime.now(UTC) + timedelta(seconds=0.5)
    await store.leases.insert_one({"_id": f"role:{U}", "holder": "dead-replica", "expiresAt": expires})
    record = await RoleChanges(store, None, wait_s=5.0).apply(A, U, Role.ADMIN)
    assert record.role is Role.ADMIN and datetime.now(UTC) >= expires
    await store.leases.insert_one({"_id": "superadmins", "holder": "dead-replica", "expiresAt": expires + HOUR})
    await seed(store, B, Role.SUPERADMIN)
    with pytest.raises(DatabaseUnavailable, match="in progress"):
        await RoleChanges(store, None, wait_s=0.2).apply(A, B, Role.ADMIN)
    assert await mongo_role(store, B) is Role.SUPERADMIN
    assert await store.leases.count_documents({"_id": f"role:{B}"}) == 0  # released: nothing was written


async def test_the_mongodb_write_is_a_compare_and_set_on_the_role_read(store: UserStore) -> None:
    await seed(store, U, Role.STAFF)
    assert await store.set_role(U, Role.STAFF, expected=Role.ADMIN, by=A) is None  # read admin; it is staff
    assert await mongo_role(store, U) is Role.STAFF
    record = await store.set_role(U, Role.ADMIN, expected=Role.STAFF, by=A)
    assert record is not None and record.role is Role.ADMIN
    assert [(d["from"], d["to"]) async for d in store.role_changes.find({})] == [("staff", "admin")]
