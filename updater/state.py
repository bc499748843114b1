"""The agent's persisted state under ``state_dir`` (schema-versioned JSON).

Written atomically. A file that cannot be parsed (not JSON, larger than
:data:`MAX_STATE_BYTES`, nested deeper than :data:`updater.jsonutil.MAX_DEPTH`)
or fails validation is moved aside (``state.json.corrupt-<time>``) and never
trusted; if it cannot be moved aside, loading is a ``StateError("unwritable")``; a file with a newer
schema is refused, not misread (a rolled-back, older agent must not clobber
what a newer one wrote). Every older schema stays readable.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import structlog

from updater import jsonutil, versions
from updater.errors import StateError
from updater.fsutil import atomic_write

log = structlog.get_logger(__name__)

SCHEMA = 1
STATE_FILE = "state.json"
MAX_STATE_BYTES = 4 * 1024 * 1024  # ours is a few KiB; more is not a state file we wrote

SlotCondition = Literal["installing", "installed", "good", "bad"]
_CONDITIONS: frozenset[str] = frozenset({"installing", "installed", "good", "bad"})


@dataclass(frozen=True)
class BootFileRecord:
    """One of a slot's boot files on the ESP (``/<label>/<name>``), as installed."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SlotRecord:
    """What this agent knows of a slot's contents, keyed by partition UUID."""

    label: str
    condition: SlotCondition  # installing: half written; installed: verified, not yet booted
    version: str | None = None
    raw_size: int | None = None
    raw_sha256: str | None = None
    updated: str = ""  # ISO 8601 UTC
    boot: tuple[BootFileRecord, ...] = ()  # the release's boot files, written with the slot
    failure: str | None = None  # "bad": the health check's error kind that gave it up
    # "installed" but no longer the next boot: why it was un-staged (e.g. version_blocked)
    unstaged: str | None = None
    # the sha256 of the chunk index of what the slot holds, kept by updater.slotindex
    # (a later delta update reads the slot's blocks from it instead of from the slot)
    index_sha256: str | None = None


@dataclass(frozen=True)
class Pending:
    """A step under way; if it is still here at start, it was interrupted."""

    step: Literal["installing"]
    part_uuid: str
    version: str
    started: str


@dataclass(frozen=True)
class BootReport:
    """Staged ``version`` (replacing ``previous_version``): tell the server how its boot went."""

    version: str
    previous_version: str


MAX_UNRECORDED = 16  # rolled-back versions waiting to be recorded for the group


@dataclass(frozen=True)
class Unrecorded:
    """A version this host rolled back from, not yet recorded for its group (policies.failed)."""

    version: str
    kind: str  # "rolled_back", or the health check's error kind
    at: float  # unix seconds of the rollback


@dataclass(frozen=True)
class State:
    highest_version: str | None = None  # highest version this host ever accepted
    slots: Mapping[str, SlotRecord] = field(default_factory=dict)
    pending: Pending | None = None
    failed_versions: tuple[str, ...] = ()  # came back on the old slot: never again
    agent: Mapping[str, Any] | None = None  # the daemon's state machine (updater.machine)
    boot_report: BootReport | None = None  # a staged version whose outcome is still untold
    unrecorded: tuple[Unrecorded, ...] = ()  # rollbacks the group has not heard of yet

    def with_slot(self, part_uuid: str, record: SlotRecord) -> State:
        return replace(self, slots={**self.slots, part_uuid: record})

    def fail(self, version: str) -> State:
        if version in self.failed_versions:
            return self
        return replace(self, failed_versions=(*self.failed_versions, version))

    def note_unrecorded(self, note: Unrecorded) -> State:
        """Keep ``note`` until it is recorded (the newest MAX_UNRECORDED, one per version)."""
        kept = tuple(u for u in self.unrecorded if u.version != note.version)
        return replace(self, unrecorded=(*kept, note)[-MAX_UNRECORDED:])

    def recorded(self, version: str) -> State:
        return replace(self, unrecorded=tuple(u for u in self.unrecorded if u.version != version))

    def accept(self, version: str) -> State:
        if self.highest_version is None or versions.compare(version, self.highest_version) > 0:
            return replace(self, highest_version=version)
        return self


def now_iso(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Invalid(Exception):
    pass


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Invalid(f"{key} must be a string")
    return value


def _boot_records(uuid: str, raw: Any) -> tuple[BootFileRecord, ...]:
    if not isinstance(raw, list):
        raise _Invalid(f"slot {uuid}: boot must be a list")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise _Invalid(f"slot {uuid}: a boot file must be an object")
        name, size, sha256 = item.get("name"), item.get("size"), item.get("sha256")
        if (
            not isinstance(name, str)
            or not isinstance(sha256, str)
            or not isinstance(size, int)
            or isinstance(size, bool)
        ):
            raise _Invalid(f"slot {uuid}: a boot file needs name, size and sha256")
        out.append(BootFileRecord(name, size, sha256))
    return tuple(out)


def _unrecorded(raw: Any) -> tuple[Unrecorded, ...]:
    if not isinstance(raw, list):
        raise _Invalid("unrecorded must be a list")
    out = []
    for item in raw[-MAX_UNRECORDED:]:
        if not isinstance(item, dict):
            raise _Invalid("an unrecorded failure must be an object")
        version, kind, at = item.get("version"), item.get("kind"), item.get("at")
        if (
            not isinstance(version, str)
            or not isinstance(kind, str)
            or isinstance(at, bool)
            or not isinstance(at, int | float)
            or not math.isfinite(at)
        ):
            raise _Invalid("an unrecorded failure needs version, kind and at")
        out.append(Unrecorded(version, kind, float(at)))
    return tuple(out)


def _from_json(doc: Any) -> State:
    if not isinstance(doc, dict):
        raise _Invalid("top level must be an object")
    schema = doc.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise _Invalid("missing or invalid schema")
    if schema > SCHEMA:
        raise StateError(
            "newer_schema",
            f"the state file has schema {schema}; this agent reads up to {SCHEMA}",
            hint="a newer agent wrote it; boot the newer slot or move the file away",
        )
    slots: dict[str, SlotRecord] = {}
    raw_slots = doc.get("slots", {})
    if not isinstance(raw_slots, dict):
        raise _Invalid("slots must be an object")
    for uuid, rec in raw_slots.items():
        if not isinstance(rec, dict):
            raise _Invalid(f"slot {uuid} must be an object")
        condition = rec.get("condition")
        label = rec.get("label")
        if condition not in _CONDITIONS or not isinstance(label, str):
            raise _Invalid(f"slot {uuid}: bad label or condition")
        raw_size = rec.get("raw_size")
        if raw_size is not None and (not isinstance(raw_size, int) or isinstance(raw_size, bool)):
            raise _Invalid(f"slot {uuid}: raw_size must be an integer")
        slots[uuid] = SlotRecord(
            label=label,
            condition=cast(SlotCondition, condition),
            version=_opt_str(rec, "version"),
            raw_size=raw_size,
            raw_sha256=_opt_str(rec, "raw_sha256"),
            updated=_opt_str(rec, "updated") or "",
            boot=_boot_records(uuid, rec.get("boot", [])),
            failure=_opt_str(rec, "failure"),
            unstaged=_opt_str(rec, "unstaged"),
            index_sha256=_opt_str(rec, "index_sha256"),
        )
    pending = None
    raw_pending = doc.get("pending")
    if raw_pending is not None:
        if not isinstance(raw_pending, dict) or raw_pending.get("step") != "installing":
            raise _Invalid("pending must be an object with a known step")
        part_uuid, version = raw_pending.get("part_uuid"), raw_pending.get("version")
        if not isinstance(part_uuid, str) or not isinstance(version, str):
            raise _Invalid("pending needs part_uuid and version")
        pending = Pending("installing", part_uuid, version, _opt_str(raw_pending, "started") or "")
    failed = doc.get("failed_versions", [])
    if not isinstance(failed, list) or not all(isinstance(v, str) for v in failed):
        raise _Invalid("failed_versions must be a list of strings")
    agent = doc.get("agent")
    raw_report = doc.get("boot_report")
    boot_report = None
    if raw_report is not None:
        if not isinstance(raw_report, dict) or not all(
            isinstance(raw_report.get(k), str) for k in ("version", "previous_version")
        ):
            raise _Invalid("boot_report needs version and previous_version")
        boot_report = BootReport(raw_report["version"], raw_report["previous_version"])
    return State(
        unrecorded=_unrecorded(doc.get("unrecorded", [])),
        highest_version=_opt_str(doc, "highest_version"),
        slots=slots,
        pending=pending,
        failed_versions=tuple(failed),
        agent=agent if isinstance(agent, dict) else None,
        boot_report=boot_report,
    )


def _to_json(state: State) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "highest_version": state.highest_version,
        "slots": {
            uuid: {
                "label": r.label,
                "condition": r.condition,
                "version": r.version,
                "raw_size": r.raw_size,
                "raw_sha256": r.raw_sha256,
                "updated": r.updated,
                "boot": [{"name": b.name, "size": b.size, "sha256": b.sha256} for b in r.boot],
                "failure": r.failure,
                "unstaged": r.unstaged,
                "index_sha256": r.index_sha256,
            }
            for uuid, r in sorted(state.slots.items())
        },
        "pending": None
        if state.pending is None
        else {
            "step": state.pending.step,
            "part_uuid": state.pending.part_uuid,
            "version": state.pending.version,
            "started": state.pending.started,
        },
        "failed_versions": list(state.failed_versions),
        "agent": None if state.agent is None else dict(state.agent),
        "boot_report": None
        if state.boot_report is None
        else {
            "version": state.boot_report.version,
            "previous_version": state.boot_report.previous_version,
        },
        "unrecorded": [
            {"version": u.version, "kind": u.kind, "at": u.at} for u in state.unrecorded
        ],
    }


class StateStore:
    """Loads and saves :class:`State` as ``<state_dir>/state.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        # The daemon saves from its loop and from the install's thread: each
        # read-modify-write holds this lock (other processes take the update
        # lock, updater.hostlock, around theirs).
        self._lock = threading.RLock()

    def update(self, change: Callable[[State], State]) -> State:
        """Load, apply ``change``, save; atomic with respect to this process's threads."""
        with self._lock:
            state = change(self.load())
            self.save(state)
            return state

    def load(self) -> State:
        with self._lock:
            return self._load()

    def _load(self) -> State:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(MAX_STATE_BYTES + 1)  # never the whole of a runaway file
        except FileNotFoundError:
            return State()
        except OSError as exc:
            raise StateError("unwritable", f"{self.path}: {exc.strerror}") from None
        try:
            # allow_constants: Python's json.dumps writes NaN and Infinity, and
            # updater.machine copes with a NaN from a hand-edited file.
            doc = jsonutil.loads(data, _Invalid, max_bytes=MAX_STATE_BYTES, allow_constants=True)
            return _from_json(doc)
        except _Invalid as exc:
            self._set_aside(str(exc))
            return State()

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(
            f"{STATE_FILE}.corrupt-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
        )
        try:
            os.replace(self.path, aside)
        except OSError as exc:
            raise StateError(
                "unwritable",
                f"{self.path} is corrupt ({why}) and cannot be moved aside: {exc.strerror}",
                hint="move or delete the file; the agent starts afresh without it",
            ) from None
        log.error("state_corrupt_set_aside", path=str(self.path), moved_to=str(aside), error=why)

    def save(self, state: State) -> None:
        data = (json.dumps(_to_json(state), indent=2) + "\n").encode()
        try:
            with self._lock:
                atomic_write(self.path, data, mode=0o644)
        except OSError as exc:
            raise StateError(
                "unwritable",
                f"cannot write {self.path}: {exc.strerror}",
                hint="check that [agent] state_dir exists and is writable",
            ) from None
