"""airlock's reboot semaphore as stored in etcd: keys and values (pure).

One key per group, shared with airlock (mixed fleets use one semaphore)::

    com.coreos.airlock/groups/<group>/v1/semaphore = {"total_slots":N,"holders":["a","b"]}

compact JSON with ``total_slots`` first and ``holders`` sorted and unique, the
bytes Go's ``encoding/json`` writes for airlock's ``Semaphore`` struct.

Beside it, ``.../v1/holders/<id>`` = ``{"since": unix seconds}`` records when
each holder took its slot (:class:`policies.etcdlock.EtcdLock` writes it in the
same transaction as the semaphore change); airlock ignores it. A holder listed
in the semaphore with no such key (one airlock admitted) has an unknown age.

A semaphore that cannot be read (not JSON, wrong types, unsorted holders, a
negative count) is reported as ``LockError("malformed")`` naming the key.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from dataclasses import dataclass
from typing import Any

from policies.etcdtxn import MAX_VALUE_BYTES
from policies.rebootlock import check_group
from updater.errors import LockError
from updater.jsonutil import loads as load_json
from updater.jsonutil import object_members

KEY_PREFIX = "com.coreos.airlock/groups/"
MAX_SLOTS = 2**63 - 1  # airlock stores a uint64; etcd's JSON gateway, an int64
MAX_HOLDER_LEN = 256


def semaphore_key(group: str) -> str:
    """airlock's key (it query-escapes the group; valid groups need no escaping)."""
    return f"{KEY_PREFIX}{check_group(group)}/v1/semaphore"


def holders_prefix(group: str) -> str:
    return f"{KEY_PREFIX}{check_group(group)}/v1/holders/"


def holder_key(group: str, holder: str) -> str:
    return holders_prefix(group) + urllib.parse.quote(holder, safe="")


def check_holder(holder: str) -> str:
    """A holder id: 1..256 printable characters (ours are 32 hex digits)."""
    if not (0 < len(holder) <= MAX_HOLDER_LEN) or not holder.isprintable():
        raise LockError(
            "bad_argument", f"invalid holder id {holder!r}: use 1-256 printable characters"
        )
    return holder


def check_slots(slots: int) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= MAX_SLOTS:
        raise LockError("bad_argument", f"invalid slot count {slots!r}: use a whole number >= 0")
    return slots


# ---- the semaphore value (pure) --------------------------------------------------------------


def _go_json_string(s: str) -> str:
    """A JSON string as Go's encoding/json writes it (HTML-safe, raw UTF-8)."""
    out = json.dumps(s, ensure_ascii=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        out = out.replace(ch, esc)
    return out


_KNOWN_FIELDS = frozenset({"total_slots", "holders"})


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


@dataclass(frozen=True)
class Semaphore:
    """airlock's semaphore.

    ``extra`` keeps the fields it does not know as written (the raw JSON text of
    name and value), to be put back byte for byte: re-encoding them would
    change them (``1e999`` would come back as ``Infinity``, which is not JSON,
    and every agent and airlock would then read the semaphore as malformed).
    """

    total_slots: int
    holders: tuple[str, ...] = ()
    extra: tuple[tuple[str, str], ...] = ()

    @classmethod
    def decode(cls, raw: bytes, key: str) -> Semaphore:
        def bad(why: str) -> LockError:
            shown = raw[:200].decode("utf-8", "replace")
            return LockError(
                "malformed",
                f"etcd key {key}: {why}: {shown!r}",
                hint="fix it with `updatectl lock repair` (drops all holders) or etcdctl put",
            )

        members = object_members(raw, bad, max_bytes=MAX_VALUE_BYTES)
        for m in members:
            # Go's encoding/json matches field names ignoring case: airlock would
            # read "Total_Slots" as total_slots, while we would keep it as foreign.
            if m.name not in _KNOWN_FIELDS and m.name.casefold() in _KNOWN_FIELDS:
                raise bad(f"field {m.raw_name} is {m.name.casefold()} to airlock")
        doc = {m.name: m.value for m in members}  # the last of duplicates wins, as in Go
        slots = doc.get("total_slots")
        if isinstance(slots, bool) or not isinstance(slots, int):
            raise bad("total_slots is not a whole number")
        if not 0 <= slots <= MAX_SLOTS:
            raise bad("total_slots is out of range")
        holders = doc.get("holders")
        if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders):
            raise bad("holders is not a list of strings")
        if holders != sorted(set(holders)):
            raise bad("holders are not sorted and unique")
        if not all(_is_unicode(h) for h in holders):  # "\ud800": JSON, but no UTF-8
            raise bad("a holder is not valid Unicode")
        extra = tuple((m.raw_name, m.raw_value) for m in members if m.name not in _KNOWN_FIELDS)
        return cls(slots, tuple(holders), extra)

    def encode(self) -> bytes:
        parts = [
            f'"total_slots":{self.total_slots}',
            '"holders":[' + ",".join(_go_json_string(h) for h in self.holders) + "]",
            *(f"{name}:{value}" for name, value in self.extra),
        ]
        return ("{" + ",".join(parts) + "}").encode("utf-8")

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - len(self.holders))

    def holds(self, holder: str) -> bool:
        return holder in self.holders

    def with_holder(self, holder: str) -> Semaphore:
        return Semaphore(self.total_slots, tuple(sorted({*self.holders, holder})), self.extra)

    def without_holder(self, holder: str) -> Semaphore:
        return Semaphore(
            self.total_slots, tuple(h for h in self.holders if h != holder), self.extra
        )

    def with_slots(self, slots: int) -> Semaphore:
        return Semaphore(slots, self.holders, self.extra)


@dataclass(frozen=True)
class Holder:
    id: str
    since: float | None  # unix seconds; None when unknown (e.g. admitted by airlock)

    def age_s(self, now: float) -> float | None:
        return None if self.since is None else max(0.0, now - self.since)


@dataclass(frozen=True)
class SemaphoreStatus:
    group: str
    key: str
    total_slots: int
    holders: tuple[Holder, ...]
    mod_revision: int

    @property
    def free_slots(self) -> int:
        return max(0, self.total_slots - len(self.holders))

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "group": self.group,
            "key": self.key,
            "total_slots": self.total_slots,
            "free_slots": self.free_slots,
            "mod_revision": self.mod_revision,
            "holders": [
                {"id": h.id, "since": h.since, "age_s": h.age_s(now)} for h in self.holders
            ],
        }


def encode_since(since: float) -> bytes:
    return json.dumps({"since": round(since, 3)}, separators=(",", ":")).encode()


def decode_since(raw: bytes) -> float | None:
    try:
        doc = load_json(raw, ValueError, max_bytes=MAX_VALUE_BYTES)
    except ValueError:
        return None
    since = doc.get("since") if isinstance(doc, dict) else None
    if isinstance(since, bool) or not isinstance(since, int | float):
        return None
    try:
        value = float(since)
    except OverflowError:  # an integer of hundreds of digits: JSON, but no time
        return None
    return value if math.isfinite(value) else None
