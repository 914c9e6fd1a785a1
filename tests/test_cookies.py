"""The ``__session`` cookie is read as browsers and Envoy read a Cookie header: pure.

One function (:func:`authsvc_client.bearer.http_token`) serves Envoy's Check
and both middlewares, so whatever a neighbouring cookie holds, it never hides
the session.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authsvc_client.bearer import http_token

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyXzEifQ.c2lnbmF0dXJl"

# Cookies seen in the wild next to Clerk's, each of which makes SimpleCookie give up.
REAL_WORLD = [
    'ajs_user_traits={"plan":"pro","seats":3}',  # Segment: JSON
    'ajs_anonymous_id="3b1f-9a"',
    "cart=two words",  # a space in the value
    "pref=caf\u00e9",  # non-ASCII
    r"path=C:\Users\ada",  # backslashes
    "flag",  # no "=" at all
    "=orphan",  # an empty name
    "a=b=c",  # "=" in the value
    "weird name=1",
    "x=[1,2]",
    "",  # a stray ";"
    " ",
]


@pytest.mark.parametrize("neighbour", REAL_WORLD)
def test_a_real_world_neighbour_never_hides_the_session(neighbour: str) -> None:
    assert http_token(None, f"{neighbour}; __session={TOKEN}") == TOKEN
    assert http_token(None, f"__session={TOKEN}; {neighbour}") == TOKEN
    assert http_token(None, f"{neighbour};__session={TOKEN};{neighbour}") == TOKEN


def test_all_of_them_at_once_and_whitespace_around_name_and_value() -> None:
    cookie = "; ".join(REAL_WORLD) + f";\t __session = {TOKEN} \t; " + "; ".join(REAL_WORLD)
    assert http_token(None, cookie) == TOKEN


def test_the_first_non_empty_session_cookie_wins_and_quotes_are_removed() -> None:
    assert http_token(None, f"__session=; __session={TOKEN}; __session=later") == TOKEN
    assert http_token(None, f'__session="{TOKEN}"') == TOKEN
    assert http_token(None, "__Session=x; session=y; __session_suffix=z; x__session=w") is None
    assert http_token(None, "__session=; other=1") is None
    assert http_token(None, "") is None and http_token(None, None) is None


# A neighbour: anything but ";" (which separates cookies), that does not itself name __session.
neighbours = st.lists(
    st.text(st.characters(blacklist_characters=";", blacklist_categories=["Cs"]), max_size=40).filter(
        lambda c: c.partition("=")[0].strip(" \t") != "__session"
    ),
    max_size=6,
)


@given(before=neighbours, after=neighbours, space=st.sampled_from(["; ", ";", " ;  ", ";\t"]))
def test_any_neighbouring_cookies_leave_the_session_readable(before: list[str], after: list[str], space: str) -> None:
    cookie = space.join([*before, f"__session={TOKEN}", *after])
    assert http_token(None, cookie) == TOKEN
