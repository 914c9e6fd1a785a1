"""Which request paths an option names, read the way every router behind it might read them.

A path can reach a router other than as the middleware sees it: with its
``.``/``..`` and empty segments resolved (most routers, proxies with
``merge_slashes``) or not (a plain regex router), and with ``%2e``/``%2f``
decoded once more (a server that hands on the raw path). An exemption must
hold for every reading, a requirement for any: ``public`` entries match whole
segments of the path as sent *and* of each resolved reading; ``min_roles``
take the strictest role over the readings.
"""

from __future__ import annotations

from collections.abc import Collection
from urllib.parse import unquote


def resolve(path: str) -> str:
    """``path`` with empty and ``.`` segments dropped and each ``..`` removing the segment before it."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)


def readings(path: str) -> tuple[str, ...]:
    """``path`` as sent, resolved, and percent-decoded then resolved (one reading when they cannot differ)."""
    if path.startswith("/") and "/." not in path and "//" not in path and "%" not in path:
        return (path,)  # the common case: no segment to resolve, nothing to decode (a trailing "/" matches alike)
    return path, resolve(path), resolve(unquote(path))


def under(path: str, entry: str) -> bool:
    """Whether ``path`` is ``entry`` or below it, by whole segments (``/health/x``, never ``/healthz``)."""
    base = entry.rstrip("/")
    return path == base or path.startswith(base + "/")


def is_public(path: str, public: Collection[str]) -> bool:
    """Whether every reading of ``path`` is under an entry of ``public``."""
    return bool(public) and all(any(under(view, entry) for entry in public) for view in readings(path))
