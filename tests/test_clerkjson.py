"""The one parser of what Clerk signs or serves (service/clerkjson.py), and the user mapping over any JSON: pure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import clerkjson
from service.clerkjson import KEPT_DEPTH, OversizedInt
from service.clerkuser import profile_of
from service.errors import InvalidEvent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)


def nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [{"k": value}] if depth % 2 else {"k": [value]}
    return value


@given(json_values)
def test_shallow_json_parses_as_the_standard_parser_parses_it(value: Any) -> None:
    text = json.dumps(value)
    assert clerkjson.loads(text) == json.loads(text)
    assert clerkjson.loads(text.encode()) == json.loads(text)


def depth_of_lists(value: Any) -> tuple[int, Any]:
    """How many single-item lists wrap ``value``'s innermost item, and that item (without recursion)."""
    depth = 0
    while isinstance(value, list):
        value, depth = value[0], depth + 1
    return depth, value


# Deeper than any recursion limit (hypothesis raises it while a test runs): always the iterative pass.
@given(json_values, st.integers(min_value=5_000, max_value=20_000), st.sampled_from(["[", '{"k":']))
def test_deep_json_keeps_everything_but_what_lies_below_the_kept_depth(value: Any, extra: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    deep = opener * extra + "1" + closer * extra
    text = '{"type": "user.updated", "data": {"unsafe_metadata": ' + deep + ', "after": ' + json.dumps(value) + "}}"
    parsed = clerkjson.loads(text)
    assert parsed["type"] == "user.updated" and parsed["data"]["after"] == json.loads(json.dumps(value))
    kept = parsed["data"]["unsafe_metadata"]
    if opener == "[":
        assert depth_of_lists(kept) == (KEPT_DEPTH - 2, None)  # levels 3..64 are kept, the 65th is null
    else:
        for _ in range(KEPT_DEPTH - 2):
            kept = kept["k"]
        assert kept is None


# Text near JSON: the iterative check must refuse exactly what the standard parser refuses.
near_json = st.text(st.sampled_from(list('[]{},:" \t\n\\-.0123456789eEtrufalsnNIiy\x01u')), max_size=24)


@given(near_json)
def test_the_iterative_check_accepts_exactly_what_the_standard_parser_accepts(text: str) -> None:
    try:
        json.loads(text)
        standard = True
    except ValueError:
        standard = False
    try:
        clerkjson._shallow(text, 2)  # forced down the path that only deep bodies take
        ours = True
    except ValueError:
        ours = False
    assert ours is standard, text


@pytest.mark.parametrize(
    "text",
    ['{"a": 1,}', "[1 2]", '{"a" 1}', '["a": 1]', '{"a": "x", "y"}', "[01]", "[1,]", "{,}", "", "[] []", '"\t"'],
)
def test_the_iterative_check_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        clerkjson._shallow(text, 2)
    with pytest.raises(ValueError):
        clerkjson.loads("[" * 5000 + '{"k": ' + text + "}" + "]" * 5000)


def test_integers_of_any_length_parse_and_those_past_the_digit_limit_are_no_number() -> None:
    assert clerkjson.loads("[1764062100000, -5, " + "9" * 4300 + "]") == [1764062100000, -5, int("9" * 4300)]
    huge = "[1, " + "9" * 5000 + ", -" + "1" * 4301 + "]"
    assert clerkjson.loads(huge) == [1, OversizedInt(5000), OversizedInt(4302)]
    deep_and_huge = "[" * 5000 + "9" * 5000 + "]" * 5000
    assert clerkjson.loads('{"a": 1, "b": ' + deep_and_huge + "}")["a"] == 1


def test_a_megabyte_of_nesting_parses_in_bounded_time_and_memory() -> None:
    # The worst shapes for the iterative pass; each used to be a RecursionError or a 4300-digit ValueError.
    assert depth_of_lists(clerkjson.loads("[" * 524_288 + "]" * 524_288)) == (KEPT_DEPTH, None)
    assert clerkjson.loads('{"a":' * 200_000 + "1" + "}" * 200_000)["a"]["a"]["a"] is not None
    with pytest.raises(ValueError):
        clerkjson.loads("[" * 524_288 + "]" * 524_287)


@given(json_values | st.dictionaries(st.sampled_from(["id", "updated_at", "public_metadata", "banned"]), json_values))
def test_mapping_any_json_user_raises_only_invalid_event(data: Any) -> None:
    """One odd user can only ever be ``invalid``: profile_of raises nothing else, whatever it is given."""
    if isinstance(data, dict):
        data = {"id": "user_1", "updated_at": 1, **data}
    try:
        profile_of(data)
    except InvalidEvent:
        pass
    try:
        profile_of(nest(data, 3000))
    except InvalidEvent:
        pass
