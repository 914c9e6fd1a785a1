"""A delivery's body: the raw bytes, capped and on a deadline, then decoded per ``Content-Encoding``, bounded.

aiohttp's own decompression is off for the sidecar (``auto_decompress=False``
in :mod:`webhook.limits`): it inflates as bytes arrive, whether or not the
handler reads them, and after a refusal it kept inflating the rest of a
compression bomb for its whole lingering time, without yielding the event
loop. Here the raw body is read first (at most :data:`MAX_BODY` bytes, within
the body deadline), then inflated in one bounded step: never past
:data:`MAX_BODY` bytes of output, so a bomb costs a few milliseconds.
"""

from __future__ import annotations

import asyncio
import zlib

import brotli
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from service.errors import InvalidArgument, PayloadTooLarge

MAX_BODY = 1024 * 1024  # 1 MiB, before and after decompression

# wbits of zlib.decompressobj per coding; "deflate" is picked per body (see _zlib_wbits).
_GZIP = 16 + zlib.MAX_WBITS
_ZLIB = zlib.MAX_WBITS
_RAW_DEFLATE = -zlib.MAX_WBITS
_BROTLI_STEP = 64 * 1024


class ClientGone(Exception):
    """The client closed the connection before its whole body arrived: nothing to answer."""


class BodyTimeout(Exception):
    """The body did not arrive within its deadline."""


async def read_body(request: web.Request, timeout_s: float) -> bytes:
    """The decoded body of ``request``.

    Raises :class:`PayloadTooLarge` past :data:`MAX_BODY` (raw, or once
    inflated), :class:`InvalidArgument` when it does not decode per its
    ``Content-Encoding``, :class:`BodyTimeout` when it is not all there within
    ``timeout_s``, :class:`ClientGone` when the client disconnects mid-body.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge("body over 1 MiB")
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # the application's client_max_size is MAX_BODY
    except TimeoutError as exc:
        raise BodyTimeout(f"body not received within {timeout_s:g} s") from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge("body over 1 MiB") from exc
    except (web.RequestPayloadError, HttpProcessingError) as exc:
        raise InvalidArgument("body is not valid HTTP framing") from exc
    except ConnectionResetError as exc:
        raise ClientGone("client disconnected mid-body") from exc
    return decode(raw, request.headers.get("Content-Encoding"))


def decode(raw: bytes, content_encoding: str | None, limit: int = MAX_BODY) -> bytes:
    """``raw`` decoded per ``content_encoding`` (none, ``identity``, ``gzip``, ``x-gzip``, ``deflate``, ``br``).

    Inflates at most about ``limit`` bytes: past it, :class:`PayloadTooLarge`.
    A body that does not decode, another coding or a list of codings:
    :class:`InvalidArgument`.
    """
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity":
        return raw
    if coding == "br":
        return _brotli(raw, limit)
    if coding in ("gzip", "x-gzip"):
        return _zlib(raw, _GZIP, limit)
    if coding == "deflate":
        return _zlib(raw, _zlib_wbits(raw), limit)
    raise InvalidArgument("body does not decode per its Content-Encoding (supported: gzip, deflate, br)")


def _zlib_wbits(raw: bytes) -> int:
    # "deflate" is meant to be zlib-wrapped (RFC 9110), but senders often send raw deflate; tell them apart
    # by the zlib header's compression method, as aiohttp and browsers do.
    return _ZLIB if raw and raw[0] & 0x0F == 8 else _RAW_DEFLATE


def _zlib(raw: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    data = raw
    while True:  # concatenated members (gzip allows them) are decoded one after the other
        decompressor = zlib.decompressobj(wbits)
        try:
            out += decompressor.decompress(data, limit + 1 - len(out))  # never 0 here: 0 means no limit
        except zlib.error as exc:
            raise _undecodable() from exc
        if len(out) > limit:
            raise PayloadTooLarge("body over 1 MiB once decompressed")
        if not decompressor.eof:
            raise _undecodable()  # truncated
        data = decompressor.unused_data
        if not data:
            return bytes(out)


def _brotli(raw: bytes, limit: int) -> bytes:
    decompressor = brotli.Decompressor()
    out = bytearray()
    data = raw
    try:
        while True:
            # The output buffer stops growing at output_buffer_limit (brotli >= 1.2); the rest waits inside.
            step = decompressor.process(data, output_buffer_limit=min(_BROTLI_STEP, limit + 1 - len(out)))
            out += step
            if len(out) > limit:
                raise PayloadTooLarge("body over 1 MiB once decompressed")
            if decompressor.is_finished():
                return bytes(out)
            if not step and not data:
                raise _undecodable()  # truncated: no input left, no output, not finished
            data = b""
    except brotli.error as exc:
        raise _undecodable() from exc


def _undecodable() -> InvalidArgument:
    return InvalidArgument("body does not decode per its Content-Encoding")
