"""Hostile input to the webhook sidecar: the defects of issue 7, each against a real sidecar on loopback.

Never a 5xx, never a traceback for a client's mistake; a signed but invalid
event is a 400 that changes nothing (so Svix does not retry a poison message).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import brotli
import pytest

from service.settings import Settings
from service.users import UserStore
from tests.conftest import WEBHOOK_SECRET
from tests.sidecar import Sender, fixture, raw_signed_headers
from webhook.main import sidecar

UID = "user_2pQm7sX9aLkT4vB1nR8cYe3Hd0F"


@pytest.fixture
async def sender(settings: Settings, store: UserStore) -> AsyncIterator[Sender]:
    async with sidecar(settings, store) as port, aiohttp.ClientSession() as session:
        yield Sender(session, f"http://127.0.0.1:{port}{settings.webhook_path}", WEBHOOK_SECRET)


async def assert_untouched(store: UserStore) -> None:
    assert await store.users.count_documents({}) == 0
    assert await store.events.count_documents({}) == 0


def assert_no_error_logged(caplog: pytest.LogCaptureFixture) -> None:
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]


async def post_raw(sender: Sender, body: bytes, headers: dict[str, str]) -> int:
    async with sender.session.post(sender.url, data=body, headers=headers) as response:
        await response.read()
        return response.status


# --- defect 2 (webhook side): lone surrogates are refused where they enter ---------------
def with_surrogate(where: str) -> str:
    event = fixture("user.created")
    marker = "SURROGATE"
    if where == "type":
        event["type"] = f"user.{marker}"
    elif where == "id":
        event["data"]["id"] = f"user_{marker}"
    elif where == "name":
        event["data"]["first_name"] = f"Ada{marker}"
    elif where == "email":
        event["data"]["email_addresses"][0]["email_address"] = f"ada{marker}@example.com"
    # json.dumps would escape a real surrogate too; write the escape Clerk's JSON would carry.
    return json.dumps(event).replace(marker, "\\ud800")


@pytest.mark.parametrize("where", ["type", "id", "name", "email"])
async def test_lone_surrogate_in_a_signed_event_is_400(sender: Sender, store: UserStore, where: str) -> None:
    status, payload = await sender.post(with_surrogate(where))
    assert status == 400, payload
    await assert_untouched(store)


# --- defect 4: Content-Encoding that does not decode, or inflates past the cap -------------
@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"this is not gzip at all"),
        ("deflate", b"nor is this deflate"),
        ("br", b"\xff\xff not brotli"),
        ("gzip", gzip.compress(b'{"type": "user.created"}')[:12] + b"\x00" * 8),
    ],
    ids=["gzip", "deflate", "br", "gzip-corrupt"],
)
async def test_broken_compressed_body_is_400(
    sender: Sender, store: UserStore, caplog: pytest.LogCaptureFixture, encoding: str, body: bytes
) -> None:
    headers = {**raw_signed_headers(body), "Content-Encoding": encoding}
    assert await post_raw(sender, body, headers) == 400
    await assert_untouched(store)
    assert_no_error_logged(caplog)


COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}


@pytest.mark.parametrize("encoding", list(COMPRESS))
async def test_compressed_body_inflating_past_the_cap_is_413(
    sender: Sender, store: UserStore, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    plain = b" " * (3 * 1024 * 1024)
    body = COMPRESS[encoding](plain)
    assert len(body) < 64 * 1024
    assert await post_raw(sender, body, {**raw_signed_headers(plain), "Content-Encoding": encoding}) == 413
    await assert_untouched(store)
    assert_no_error_logged(caplog)


async def test_a_valid_gzip_body_still_applies(sender: Sender, store: UserStore) -> None:
    plain = json.dumps(fixture("user.created")).encode()
    headers = {**raw_signed_headers(plain), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    assert await post_raw(sender, gzip.compress(plain), headers) == 200
    assert await store.users.count_documents({"externalId": UID}) == 1


# --- defect 5: a signed body that is not UTF-8 is signed-but-invalid (400), unsigned is 401 ---
async def test_signed_body_with_invalid_utf8_is_400(sender: Sender, store: UserStore) -> None:
    body = json.dumps(fixture("user.created")).encode().replace(b"Ada", b"Ad\xff")
    assert await post_raw(sender, body, raw_signed_headers(body)) == 400
    await assert_untouched(store)


async def test_invalid_utf8_with_a_wrong_signature_is_401(sender: Sender, store: UserStore) -> None:
    body = b'{"type": "user.created", "data": {"id": "user_\xff"}}'
    headers = raw_signed_headers(body)
    assert await post_raw(sender, body + b" ", headers) == 401
    headers["svix-signature"] = "v1,not-base64!!"
    assert await post_raw(sender, body, headers) == 401
    assert await post_raw(sender, body, raw_signed_headers(body, secret="whsec_" + "A" * 40)) == 401
    stale = raw_signed_headers(body)
    stale["svix-timestamp"] = str(int(time.time()) - 3600)
    assert await post_raw(sender, body, stale) == 401
    await assert_untouched(store)


# --- defect 6: wrong-typed fields of the Clerk user are 400 --------------------------------
@pytest.mark.parametrize(
    "data",
    [
        {"email_addresses": {}},
        {"email_addresses": 0},
        {"email_addresses": ""},
        {"email_addresses": False},
        {"email_addresses": [{"id": "idn_1", "email_address": 7}]},
        {"first_name": "Ada", "username": 42},
        {"first_name": "Ada", "username": ["ada"]},
        {"last_name": {"x": 1}},
        {"primary_email_address_id": 3},
        {"locked": "no"},
    ],
    ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items())[:40],
)
async def test_wrong_typed_user_fields_are_400(sender: Sender, store: UserStore, data: dict[str, Any]) -> None:
    status, payload = await sender.post(fixture("user.created", **data))
    assert status == 400, payload
    await assert_untouched(store)


# --- defect 7: look-alike roles grant nothing -------------------------------------------
@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("\u017fuperadmin", "staff"),  # LATIN SMALL LETTER LONG S: upper() is "S"
        ("superadm\u0131n", "staff"),  # DOTLESS I: upper() is "I"
        ("adm\u0131n", "staff"),
        ("\uff21\uff24\uff2d\uff29\uff2e", "staff"),  # fullwidth ADMIN
        ("SuperAdmin", "superadmin"),  # ASCII case variants are the role
        ("ADMIN", "admin"),
    ],
)
async def test_look_alike_roles_are_staff(sender: Sender, store: UserStore, raw: str, stored: str) -> None:
    status, _ = await sender.post(fixture("user.created", public_metadata={"role": raw}))
    assert status == 200
    doc = await store.users.find_one({"externalId": UID})
    assert doc is not None and doc["role"] == stored


# --- defect 8: a client that goes away mid-body ------------------------------------------
async def test_client_disconnecting_mid_body_is_info_without_traceback(
    sender: Sender, store: UserStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = int(sender.url.split(":")[2].split("/")[0])
    path = sender.url.split(str(port), 1)[1]
    body = json.dumps(fixture("user.created")).encode()
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        for name, value in raw_signed_headers(body).items():
            head += f"{name}: {value}\r\n"
        writer.write(head.encode() + b"\r\n" + body[:40])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()

    async def gone() -> int:
        return sum(1 for r in caplog.records if getattr(r, "fields", {}).get("outcome") == "client_gone")

    deadline = time.monotonic() + 10
    while await gone() < 3:
        assert time.monotonic() < deadline, "the sidecar never logged the disconnects"
        await asyncio.sleep(0.05)
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("outcome") == "client_gone"]
    assert all(r.levelno == logging.INFO for r in lines)
    assert_no_error_logged(caplog)
    await assert_untouched(store)
    # and the sidecar still serves
    assert (await sender.post(fixture("user.created")))[0] == 200


# --- issue 13, defect 8: whatever nests in fields authsvc never reads, a signed event applies --------
def with_raw(event: dict[str, Any], field: str, raw: str) -> str:
    """``event`` as JSON with ``data[field]`` written as ``raw`` (nesting ``json.dumps`` cannot write)."""
    event["data"][field] = "RAW-FIELD"
    return json.dumps(event).replace('"RAW-FIELD"', raw)


DEEP_ARRAYS = "[" * 4000 + "]" * 4000  # 8 KB: Clerk's metadata limit, as deep as it goes
DEEP_OBJECTS = '{"a":' * 1600 + "{}" + "}" * 1600
HUGE_INTEGER = "9" * 5000  # past Python's 4300-digit int limit


async def test_a_ban_and_demotion_apply_whatever_unsafe_metadata_holds(sender: Sender, store: UserStore) -> None:
    assert (await sender.post(fixture("user.created")))[0] == 200
    updated = fixture("user.updated", banned=True, public_metadata={"role": "staff"})
    for step, raw in enumerate((DEEP_ARRAYS, DEEP_OBJECTS, '{"n": ' + HUGE_INTEGER + "}", "-" + HUGE_INTEGER)):
        updated["data"]["updated_at"] += 1000
        updated["data"]["first_name"] = f"Ada{step}"
        status, payload = await sender.post(with_raw(updated, "unsafe_metadata", raw))
        assert (status, payload) == (200, {"status": "applied"}), step
        doc = await store.users.find_one({"externalId": UID})
        assert doc is not None
        assert (doc["name"], doc["role"], doc["isActive"]) == (f"Ada{step} Lovelace", "staff", False)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("first_name", DEEP_ARRAYS),
        ("updated_at", HUGE_INTEGER),
        ("public_metadata", DEEP_ARRAYS),
        ("email_addresses", DEEP_ARRAYS),
        ("banned", "1e999"),
    ],
)
async def test_a_deep_or_huge_value_in_a_field_authsvc_reads_is_400(
    sender: Sender, store: UserStore, field: str, raw: str
) -> None:
    status, payload = await sender.post(with_raw(fixture("user.created"), field, raw))
    assert status == 400 and payload["error"], payload
    await assert_untouched(store)


@pytest.mark.parametrize("raw", ["[" * 900 + "]" * 900, DEEP_ARRAYS, HUGE_INTEGER, '{"x": ' + DEEP_OBJECTS + "}"])
async def test_a_role_that_is_not_a_role_name_is_staff_however_deep(sender: Sender, store: UserStore, raw: str) -> None:
    """``public_metadata.role`` that names no role is staff (the contract's rule), whatever it holds."""
    status, payload = await sender.post(with_raw(fixture("user.created"), "public_metadata", '{"role": ' + raw + "}"))
    assert (status, payload) == (200, {"status": "applied"})
    doc = await store.users.find_one({"externalId": UID})
    assert doc is not None and doc["role"] == "staff"


# --- issue 13, defect 12: an ignored type's id is validated where it enters, never a 500 ------------
@pytest.mark.parametrize(
    ("event_type", "key", "value"),
    [
        ("email.created", "id", "\\ud800"),
        ("session.pending", "user_id", "user_\\udfff"),
        ("organization.created", "id", "org_" + "x" * 300),
        ("sms.created", "id", ""),
    ],
)
async def test_an_ignored_event_with_a_bad_id_is_ignored_not_a_500(
    sender: Sender, store: UserStore, caplog: pytest.LogCaptureFixture, event_type: str, key: str, value: str
) -> None:
    body = json.dumps({"type": event_type, "object": "event", "data": {key: "VALUE"}, "timestamp": 1764063500400})
    status, payload = await sender.post(body.replace("VALUE", value), msg_id="msg_ignored_bad_id")
    assert (status, payload) == (200, {"status": "ignored"})
    entry = await store.events.find_one({"_id": "msg_ignored_bad_id"})
    assert entry is not None and entry["externalId"] is None and entry["outcome"] == "ignored"
    assert_no_error_logged(caplog)
