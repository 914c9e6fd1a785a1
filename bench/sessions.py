"""The per-call cost of the session rules (revoked, then pending), in process: part of ``python -m bench core``.

Every VerifyToken, Check and SetRole runs :meth:`SessionRules.check` on the
verified token: a lookup of its ``sid`` in the in-process set of revoked
sessions. Measured here on a token whose session is *not* revoked (the hot
path), with the set empty and holding 100,000 sessions, against an empty
call of the same shape; CPU seconds of this process, medians of interleaved
passes.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from service.revocations import RevokedSessions
from service.sessions import SessionRules
from service.tokens import VerifiedToken


def _revoked(entries: int) -> RevokedSessions:
    """A set holding ``entries`` sessions, filled as the change stream fills it (no database needed)."""
    revoked = RevokedSessions(collection=None)  # type: ignore[arg-type]  # never started: no reads
    until = datetime.now(UTC) + timedelta(days=7)
    for index in range(entries):
        revoked._add({"_id": f"sess_{index:024d}", "expireAt": until})
    revoked._loaded = True  # as after the first load
    return revoked


def _per_call_ns(check: Any, verified: VerifiedToken, calls: int) -> float:
    began = time.process_time()
    for _ in range(calls):
        check(verified)
    return (time.process_time() - began) / calls * 1e9


def run(*, calls: int = 500_000, entries: int = 100_000, passes: int = 5) -> list[str]:
    """The figures, as printable lines."""
    verified = VerifiedToken(
        subject="user_1",
        session_id="sess_live_0123456789abcdef",
        authorized_party="http://localhost:3000",
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
        claims={},
    )
    empty, full = SessionRules(_revoked(0)), SessionRules(_revoked(entries))

    def nothing(token: VerifiedToken) -> None:
        return None

    floor, with_none, with_many = [], [], []
    for _ in range(passes):
        floor.append(_per_call_ns(nothing, verified, calls))
        with_none.append(_per_call_ns(empty.check, verified, calls))
        with_many.append(_per_call_ns(full.check, verified, calls))
    med = statistics.median
    return [
        f"  session rules (revoked set + pending), per call over an empty call, {passes} interleaved passes: "
        f"{med(with_none) - med(floor):.0f} ns with no revoked session, "
        f"{med(with_many) - med(floor):.0f} ns with {entries:,} (empty call {med(floor):.0f} ns)",
    ]
