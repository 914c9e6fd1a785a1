"""Named leases in MongoDB (``leases``): at most one holder of a name until its lease expires.

Taking a lease is one conditional upsert that matches only an expired lease,
so while someone else holds it the insert collides on ``_id``. A holder that
dies stops renewing, and its lease lapses after its time to live. The periodic
repair holds ``_id: "sync"``; SetRole holds one per user it changes and one
while it demotes a superadmin (:mod:`service.rolechanges`). Expiry uses each
writer's clock: holders must not be further apart than the margins they leave.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError
from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_random_exponential

from service.users import Document


def _now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


class Lease:
    """One named lease over a collection: at most one holder until it expires."""

    def __init__(self, collection: AsyncCollection[Document], holder: str, *, name: str) -> None:
        self._leases = collection
        self.holder = holder
        self.name = name

    async def acquire(self, ttl_s: float) -> bool:
        """Take the lease if it is free, expired, or already ours; True when we hold it for ``ttl_s``."""
        now = _now()
        lease = {"$set": {"holder": self.holder, "expiresAt": now + timedelta(seconds=ttl_s)}}
        try:
            await self._leases.update_one({"_id": self.name, "expiresAt": {"$lte": now}}, lease, upsert=True)
            return True
        except DuplicateKeyError:  # held and not expired: by us?
            return await self.extend(ttl_s)

    async def wait(self, ttl_s: float, *, within_s: float) -> bool:
        """Take the lease as soon as it is free, trying for at most ``within_s``; True when taken."""
        retrying = AsyncRetrying(
            retry=retry_if_result(lambda taken: not taken),
            stop=stop_after_delay(within_s),
            wait=wait_random_exponential(multiplier=0.01, max=0.1),  # 10 ms, doubling to 100 ms, jittered
            retry_error_callback=lambda state: False,
        )
        taken: bool = await retrying(self.acquire, ttl_s)
        return taken

    async def extend(self, ttl_s: float) -> bool:
        """Hold our lease ``ttl_s`` from now; False when it is no longer ours."""
        until = _now() + timedelta(seconds=ttl_s)
        result = await self._leases.update_one(
            {"_id": self.name, "holder": self.holder}, {"$set": {"expiresAt": until}}
        )
        return result.matched_count == 1

    async def release(self) -> None:
        """Let another holder take it at once (if it is still ours); the document stays."""
        await self._leases.update_one({"_id": self.name, "holder": self.holder}, {"$set": {"expiresAt": _now()}})

    async def drop(self) -> None:
        """Release by deleting the document (if it is still ours): for leases named after something short-lived."""
        await self._leases.delete_one({"_id": self.name, "holder": self.holder})
