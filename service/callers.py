"""Who may call which method: the policy of ``AUTHSVC_CALLERS_FILE`` (pure: no grpc, no files).

The file is TOML, one ``[[caller]]`` table per credential::

    [[caller]]
    name = "billing"                    # in the RPC log line and the metrics
    key_sha256 = "9f86d081884c7d65…"    # hex SHA-256 of the key sent as x-authsvc-key metadata
    methods = ["VerifyToken", "GetUser"]  # short method names; "*" = all

``tls_san`` instead of ``key_sha256`` names a caller by a URI or DNS SAN of its
client certificate (mutual TLS). Several tables may share a name: a key
rotation. :func:`parse_policy` checks it strictly and reports every problem
on one line; :class:`CallerPolicy` answers who a credential belongs to.

A presented key is hashed with SHA-256 and its digest compared with every
listed digest by :func:`hmac.compare_digest`, all of them each time: the time
taken does not depend on how much of a stored digest the guess shares, nor
on which entry matched. Only digests are held, and neither keys nor digests
are ever logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from authsvc_client.client import KEY_METADATA

__all__ = [
    "KEY_METADATA",
    "METHODS",
    "Caller",
    "CallerPolicy",
    "CallersFileError",
    "current_caller",
    "parse_policy",
]

# Every method a caller can be allowed, by its short name (gRPC health is open to everyone).
METHODS = frozenset({"VerifyToken", "GetUser", "SetRole", "Check", "ServerReflectionInfo"})
ALL = "*"

# The name of the caller of the call being served ("" when none is known): set by the
# caller check (service/calls.py), read by the RPC log line and authsvc_calls_total.
current_caller: ContextVar[str] = ContextVar("authsvc_caller", default="")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+")
_DNS = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_FIELDS = ("name", "key_sha256", "tls_san", "methods")


class CallersFileError(ValueError):
    """The callers file cannot be used; ``str()`` is one line listing every problem."""


@dataclass(frozen=True)
class Caller:
    """A known caller: its name and the short names of the methods it may call."""

    name: str
    methods: frozenset[str]

    def allows(self, method: str) -> bool:
        return method in self.methods


class CallerPolicy:
    """The callers of one version of the file: found by key (constant time) or by certificate SAN."""

    def __init__(self, keys: Iterable[tuple[bytes, Caller]], sans: dict[str, Caller]) -> None:
        self._keys = tuple(keys)
        self._sans = dict(sans)

    @property
    def uses_sans(self) -> bool:
        """Whether any caller is named by its client certificate (else the TLS peer is never looked at)."""
        return bool(self._sans)

    def __len__(self) -> int:
        return len(self._keys) + len(self._sans)

    def by_key(self, key: str) -> Caller | None:
        """The caller whose key is ``key``, or None."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, caller in self._keys:  # every entry, whatever matched: no early exit
            if hmac.compare_digest(digest, stored):
                found = caller
        return found

    def by_san(self, sans: Iterable[str]) -> Caller | None:
        """The caller named by the first of ``sans`` (a certificate's URI and DNS SANs) that is listed."""
        for san in sans:
            caller = self._sans.get(san)
            if caller is not None:
                return caller
        return None


def _entry_problems(entry: dict[str, Any], mtls: bool) -> list[str]:
    problems = [f"unknown key {key!r}" for key in entry if key not in _FIELDS]
    name = entry.get("name")
    if name is None:
        problems.append("name is required")
    elif not isinstance(name, str) or not _NAME.fullmatch(name):
        problems.append("name must be 1-64 letters, digits, '.', '_' or '-'")
    key, san = entry.get("key_sha256"), entry.get("tls_san")
    if (key is None) == (san is None):
        problems.append("needs exactly one of key_sha256 or tls_san")
    if key is not None and not (isinstance(key, str) and _HEX64.fullmatch(key)):
        problems.append("key_sha256 must be 64 hexadecimal digits (the SHA-256 of the key)")
    if san is not None:
        if not (isinstance(san, str) and (_URI.fullmatch(san) or _DNS.fullmatch(san))):
            problems.append("tls_san must be a URI or a DNS name")
        elif not mtls:
            problems.append("tls_san needs AUTHSVC_TLS_CLIENT_CA (mutual TLS)")
    methods = entry.get("methods")
    if methods is None:
        problems.append("methods is required")
    elif not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        problems.append('methods must be a list of method names ("*" = all)')
    elif not methods:
        problems.append("methods must not be empty")
    else:
        problems += [
            f"unknown method {m!r} (one of {', '.join(sorted(METHODS))} or *)"
            for m in methods
            if m != ALL and m not in METHODS
        ]
    return problems


def parse_policy(text: str, *, mtls: bool) -> CallerPolicy:
    """The policy of a callers file's ``text``; :class:`CallersFileError` lists every problem.

    ``mtls``: whether client certificates are required (``AUTHSVC_TLS_CLIENT_CA``);
    without it a ``tls_san`` could never match, so it is a problem.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CallersFileError(f"not TOML: {exc}") from None
    problems = [f"unknown key {key!r} (only [[caller]] tables)" for key in document if key != "caller"]
    entries = document.get("caller", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CallersFileError("caller must be [[caller]] tables")
    if not entries and not problems:
        problems.append("no [[caller]] entries: every call would be refused")
    keys: list[tuple[bytes, Caller]] = []
    sans: dict[str, Caller] = {}
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries, 1):
        where = f"caller {index} ({entry['name']!r})" if isinstance(entry.get("name"), str) else f"caller {index}"
        found = _entry_problems(entry, mtls)
        # Hex digests compare case-insensitively; SANs exactly, as the certificate carries them.
        credential = str(entry["key_sha256"]).lower() if "key_sha256" in entry else str(entry.get("tls_san"))
        if not found and credential in seen:
            field = "key_sha256" if "key_sha256" in entry else "tls_san"
            found.append(f"this {field} is also caller {seen[credential]}'s")
        if found:
            problems += [f"{where}: {problem}" for problem in found]
            continue
        seen[credential] = index
        methods = entry["methods"]
        caller = Caller(entry["name"], METHODS if ALL in methods else frozenset(methods))
        if "key_sha256" in entry:
            keys.append((bytes.fromhex(entry["key_sha256"]), caller))
        else:
            sans[entry["tls_san"]] = caller
    if problems:
        raise CallersFileError("; ".join(problems))
    return CallerPolicy(keys, sans)
