"""Bounded JSON from outside: a size cap, a nesting cap, and typed errors only. No I/O.

``json.loads`` recurses once per nesting level, so ``[`` two thousand times
deep escapes as ``RecursionError`` (not a ``ValueError``), and it reads
``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON (Go's
``encoding/json``, which airlock uses, refuses them). :func:`loads` checks the
size first, then the nesting depth by scanning the brackets that are outside
strings, and only then parses; every failure is the caller's typed error,
built by its ``error`` factory from a short reason.

:func:`object_members` splits a top-level object into its members with their
raw text, so that a writer can put back fields it does not know byte for byte
(re-encoding them would turn ``1e999`` into ``Infinity``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

MAX_DEPTH = 32  # nesting levels; none of our documents needs more than a handful

# A JSON string (escapes included), or one bracket outside any string. An
# unterminated string runs to the end: every match succeeds without backtracking,
# so the scan stays linear on hostile text (a string that failed to close would
# be tried again from each later quote).
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)|[\[\]{}]', re.DOTALL)
_WS = " \t\n\r"

ErrorFactory = Callable[[str], Exception]
"""Builds the caller's typed error from a short reason (e.g. ``"nested too deep"``)."""


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def depth(text: str, stop_above: int | None = None) -> int:
    """The deepest nesting of arrays and objects in ``text`` (strings skipped).

    Unbalanced or unterminated text gives some number; the parser rejects it
    afterwards. Linear in the length; stops early once past ``stop_above``.
    """
    level = deepest = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        ch = match.group()
        if ch in "[{":
            level += 1
            if level > deepest:
                deepest = level
                if stop_above is not None and deepest > stop_above:
                    break
        elif ch in "]}":
            level -= 1
    return deepest


def decode_text(data: bytes | str, error: ErrorFactory, *, max_bytes: int) -> str:
    """``data`` as text: at most ``max_bytes`` bytes of UTF-8."""
    if isinstance(data, str):
        if len(data) > max_bytes:  # a character is at least a byte
            raise error(f"larger than {max_bytes} bytes")
        return data
    if len(data) > max_bytes:
        raise error(f"{len(data)} bytes, larger than {max_bytes}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 at byte {exc.start}") from None


def loads(
    data: bytes | str,
    error: ErrorFactory,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    allow_constants: bool = False,
) -> Any:
    """Parse one JSON document, or raise ``error(reason)``.

    ``allow_constants`` accepts ``NaN`` and ``Infinity`` (only for our own
    files, which Python's ``json.dumps`` may have written so).
    """
    text = decode_text(data, error, max_bytes=max_bytes)
    if depth(text, stop_above=max_depth) > max_depth:
        raise error(f"nested more than {max_depth} levels deep")
    try:
        if allow_constants:
            return json.loads(text)
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # the depth check should make this unreachable
        raise error(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, NaN, an int of too many digits
        raise error(f"not JSON: {_short(str(exc))}") from None


@dataclass(frozen=True)
class Member:
    """One ``"name": value`` of an object, with the exact text of both."""

    name: str
    value: Any
    raw_name: str  # the JSON string as written, quotes and escapes included
    raw_value: str  # the value as written


def object_members(
    data: bytes | str,
    error: ErrorFactory,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
) -> list[Member]:
    """The members of a top-level JSON object in order (duplicates kept), or ``error``.

    The whole document is checked by :func:`loads` first, so a member's raw
    text is always valid JSON that parses to its value.
    """
    text = decode_text(data, error, max_bytes=max_bytes)
    doc = loads(text, error, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(doc, dict):
        raise error("not a JSON object")
    decoder = json.JSONDecoder(parse_constant=_no_constant)
    members: list[Member] = []
    i = _skip_ws(text, 0) + 1  # past "{"
    try:
        i = _skip_ws(text, i)
        if text[i] == "}":
            return members
        while True:
            start = i
            name, i = decoder.raw_decode(text, i)
            raw_name = text[start:i]
            i = _skip_ws(text, i)
            if text[i] != ":":
                raise ValueError("expected ':'")
            i = _skip_ws(text, i + 1)
            start = i
            value, i = decoder.raw_decode(text, i)
            members.append(Member(name, value, raw_name, text[start:i]))
            i = _skip_ws(text, i)
            if text[i] == "}":
                return members
            if text[i] != ",":
                raise ValueError("expected ',' or '}'")
            i = _skip_ws(text, i + 1)
    except (ValueError, IndexError, RecursionError) as exc:  # json.loads accepted it: a bug
        raise error(f"not JSON: {_short(str(exc))}") from None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def field(obj: dict[str, Any], key: str, typ: type, error: ErrorFactory, where: str = "") -> Any:
    """``obj[key]``, which must be a ``typ`` (a JSON true is never an int), or
    ``error`` naming the field (``where`` prefixes its path)."""
    if key not in obj:
        raise error(f"missing field {where}{key}")
    value = obj[key]
    # bool is an int in Python; a JSON true is never a valid size
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise error(f"field {where}{key} must be {typ.__name__}, not {type(value).__name__}")
    return value


def utc_time(text: str, key: str, error: ErrorFactory) -> datetime:
    """An ISO 8601 time with its zone, in UTC, or ``error`` naming the field ``key``."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise error(f"field {key} is not an ISO 8601 time: {text[:64]!r}") from None
    if t.tzinfo is None:
        raise error(f"field {key} has no time zone: {text[:64]!r}")
    try:
        return t.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise error(f"field {key} is out of range: {text[:64]!r}") from None
