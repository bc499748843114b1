"""The bounded JSON reader: size and nesting caps before parsing, typed errors only."""

from __future__ import annotations

import time

import pytest

from updater import jsonutil
from updater.errors import LockError


def bad(reason: str) -> LockError:
    return LockError("malformed", reason)


def load(data: bytes | str, *, allow_constants: bool = False) -> object:
    return jsonutil.loads(data, bad, max_bytes=8192, allow_constants=allow_constants)


@pytest.mark.parametrize(
    ("text", "deepest"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a":[1,{"b":[]}]}', 4),
        ('["[[[[", "\\"[[["]', 1),  # brackets inside strings, escaped quotes
        ('"\\\\"', 0),  # an escaped backslash closes the string
        ('"unterminated [[[[', 0),
        ("]]]][", 0),  # unbalanced: the parser refuses it
    ],
)
def test_depth_skips_strings(text: str, deepest: int) -> None:
    assert jsonutil.depth(text) == deepest


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[" * 2000, "nested more than"),
        (b'{"a":' * 100 + b"1" + b"}" * 100, "nested more than"),
        (b"[" * 33 + b"]" * 33, "nested more than"),
        (b"x" * 8193, "larger than"),
        ("é" * 8193, "larger than"),
        (b'"\xff"', "not UTF-8"),
        (b"NaN", "not JSON"),
        (b'{"a":-Infinity}', "not JSON"),
        (b"[" + b"9" * 4400 + b"]", "not JSON"),  # more digits than int() takes
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b"\xef\xbb\xbf{}", "not JSON"),  # a BOM
    ],
)
def test_hostile_input_is_the_callers_error(data: bytes | str, reason: str) -> None:
    with pytest.raises(LockError) as err:
        load(data)
    assert err.value.kind == "malformed"
    assert reason in err.value.message
    assert len(err.value.message) < 300


def test_within_bounds_parses() -> None:
    assert load(b"[" * 32 + b"]" * 32) is not None
    assert load(b'{"a":[1e999,-0,1.0e2,"\\u00e9"]}') == {"a": [float("inf"), 0, 100.0, "é"]}
    assert load(b"NaN", allow_constants=True) != 0  # NaN is not equal to anything


def test_scanning_is_linear_on_quotes_that_never_close() -> None:
    hostile = '"\\"' * 100_000  # every quote escaped: a naive scan retries from each one
    began = time.monotonic()
    with pytest.raises(LockError):
        jsonutil.loads(hostile, bad, max_bytes=len(hostile))
    assert time.monotonic() - began < 1


def test_object_members_keep_the_raw_text() -> None:
    text = b' { "total_slots" :2 , "x":1e999,"\\u00e9":-0 ,"y":{"z": [1.0e2]},"x":1}'
    members = jsonutil.object_members(text, bad, max_bytes=4096)
    assert [(m.raw_name, m.raw_value) for m in members] == [
        ('"total_slots"', "2"),
        ('"x"', "1e999"),
        ('"\\u00e9"', "-0"),
        ('"y"', '{"z": [1.0e2]}'),
        ('"x"', "1"),  # duplicates kept, in order
    ]
    assert [m.name for m in members] == ["total_slots", "x", "é", "y", "x"]
    assert members[1].value == float("inf")
    assert jsonutil.object_members(b"{ }", bad, max_bytes=10) == []
    for hostile in (b"[1]", b'{"a":NaN}', b"[" * 2000):
        with pytest.raises(LockError):
            jsonutil.object_members(hostile, bad, max_bytes=4096)
