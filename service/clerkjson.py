"""JSON that Clerk signed or served: parsed whatever the fields authsvc never reads hold.

End users write their own ``unsafe_metadata`` (up to Clerk's 8 KB limit: a few
thousand levels of nesting, or integers thousands of digits long), and it
arrives inside every webhook and Backend API answer about them. The standard
parser refuses both (its C scanner recurses, and ``int()`` stops at 4300
digits), which made a user's own metadata block their ban and a whole sync page.
:func:`loads` is the one parser for webhook bodies (``webhook/events.py``) and
Backend API answers (``service/clerkapi.py``):

- an integer past Python's digit limit (4300 by default) becomes an
  :class:`OversizedInt` marker (authsvc's own integers are millisecond
  times), so no field authsvc reads can take one for a number;
- a body nested deeper than the standard parser goes is checked as JSON by an
  iterative pass (a regular-expression tokenizer and a stack: no recursion, so
  no C stack to overflow), its values deeper than :data:`KEPT_DEPTH` become
  None, and the rest is parsed by the standard parser. authsvc reads nothing
  below depth 5, and a value it reads that held such nesting is a container
  where a string, a time or a boolean is expected: still invalid.

A body that needs neither costs what :func:`json.loads` costs; both are linear
in the body: a 1 MiB body costs at most a few tenths of a second.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

KEPT_DEPTH = 64


@dataclass(frozen=True, slots=True)
class OversizedInt:
    """An integer literal too long for ``int()``, kept as its length only."""

    length: int


class NotJSON(ValueError):
    """The text is not JSON (``str()`` says where)."""


def loads(raw: bytes | str) -> Any:
    """Parse ``raw`` (bytes in any encoding :func:`json.loads` detects); raise :class:`ValueError` if it is not JSON."""
    text = raw if isinstance(raw, str) else raw.decode(json.detect_encoding(raw), "surrogatepass")
    try:
        return json.loads(text)  # the common case, at the C scanner's speed
    except RecursionError:
        pass  # valid so far, and nested deeper than the C scanner goes
    except ValueError:
        pass  # not JSON, or an integer past Python's digit limit: the decoder below tells which
    try:
        return _DECODER.decode(text)
    except RecursionError:
        return _DECODER.decode(_shallow(text, KEPT_DEPTH))


def _integer(literal: str) -> int | OversizedInt:
    try:
        return int(literal)
    except ValueError:  # past sys.get_int_max_str_digits() (4300 by default)
        return OversizedInt(len(literal))


_DECODER = json.JSONDecoder(parse_int=_integer)  # built once: json.loads(parse_int=...) builds one per call


_STRING = r'"[^"\\\x00-\x1f]*(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*)*"'
_SCALAR = rf"{_STRING}|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|true|false|null|NaN|-?Infinity"
_WS = r"[ \t\n\r]*"
# What json.loads accepts, as tokens; runs of ``value,`` inside an array and ``"key":`` are one token each,
# and brackets and commas come as runs, so that the Python loop below turns over as few times as possible.
_TOKENS = re.compile(
    rf"(?P<key>{_STRING}{_WS}:)"
    rf"|(?P<items>(?:(?:{_SCALAR}){_WS},{_WS})+)"
    rf"|(?P<value>{_SCALAR})"
    r"|(?P<punct>[\[\]{}, \t\n\r]+)"
    r"|(?P<bad>.)",
    re.DOTALL,
)
_ONE_ITEM = re.compile(rf"(?:{_SCALAR}){_WS},{_WS}", re.DOTALL)
# What may come next: a value (or the end of an empty array), a key (or the end of an empty object), or
# what follows a value: a comma, a closing bracket, the end of the text.
_VALUE, _VALUE_OR_END, _KEY, _KEY_OR_END, _AFTER = range(5)


def _shallow(text: str, depth: int) -> str:
    """``text`` with every value nested deeper than ``depth`` replaced by ``null``; :class:`NotJSON` if not JSON."""
    closers: list[str] = []  # the bracket that closes each open container
    cut: list[tuple[int, int]] = []  # spans of the containers opened at depth + 1
    start = 0
    expect = _VALUE
    for match in _TOKENS.finditer(text):
        kind = match.lastgroup
        if kind == "punct":
            at = match.start()
            for char in match.group():
                if char == "[" or char == "{":
                    if expect > _VALUE_OR_END:
                        raise NotJSON(f"unexpected {char!r} at {at}")
                    closers.append("]" if char == "[" else "}")
                    if len(closers) == depth + 1:
                        start = at
                    expect = _VALUE_OR_END if char == "[" else _KEY_OR_END
                elif char == "]" or char == "}":
                    empty = _VALUE_OR_END if char == "]" else _KEY_OR_END
                    if not closers or closers[-1] != char or expect not in (_AFTER, empty):
                        raise NotJSON(f"unexpected {char!r} at {at}")
                    closers.pop()
                    if len(closers) == depth:
                        cut.append((start, at + 1))
                    expect = _AFTER
                elif char == ",":
                    if expect != _AFTER or not closers:
                        raise NotJSON(f"unexpected ',' at {at}")
                    expect = _VALUE if closers[-1] == "]" else _KEY
                at += 1
        elif kind == "key":
            if expect not in (_KEY, _KEY_OR_END):
                raise NotJSON(f"unexpected key at {match.start()}")
            expect = _VALUE
        elif kind == "value":
            if expect > _VALUE_OR_END:
                raise NotJSON(f"unexpected value at {match.start()}")
            expect = _AFTER
        elif kind == "items":  # "v, v, ..., ": any number in an array, one (then a key) in an object
            if expect > _VALUE_OR_END or not closers:
                raise NotJSON(f"unexpected value at {match.start()}")
            if closers[-1] == "]":
                expect = _VALUE
            elif _ONE_ITEM.fullmatch(match.group()):
                expect = _KEY
            else:
                raise NotJSON(f"unexpected value at {match.start()}")
        else:
            raise NotJSON(f"unexpected {match.group()!r} at {match.start()}")
    if closers or expect != _AFTER:
        raise NotJSON("unexpected end of the text")
    pieces: list[str] = []
    end = 0
    for begin, stop in cut:
        pieces += (text[end:begin], "null")
        end = stop
    pieces.append(text[end:])
    return "".join(pieces)
