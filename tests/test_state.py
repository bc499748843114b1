"""The persisted state: atomic writes, corrupt files set aside, schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from updater.errors import StateError
from updater.state import MAX_STATE_BYTES, Pending, SlotRecord, State, StateStore


def test_missing_file_is_a_fresh_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "state").load() == State()


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    state = (
        State()
        .accept("1.1.0")
        .with_slot("u-a", SlotRecord("USR-A", "good", "1.0.0", updated="t"))
        .with_slot("u-b", SlotRecord("USR-B", "installed", "1.1.0", 4096, "ab" * 32, "t"))
    )
    state = State(
        state.highest_version,
        state.slots,
        Pending("installing", "u-b", "1.1.0", "t"),
        failed_versions=("1.0.5",),
        agent={"state": "IDLE", "failures": 2},
    )
    store.save(state)
    assert store.load() == state
    doc = json.loads(store.path.read_text())
    assert doc["schema"] == 1
    assert [p.name for p in store.path.parent.iterdir()] == ["state.json"]  # no temp left


def test_accept_only_raises(tmp_path: Path) -> None:
    s = State().accept("1.2.0").accept("1.1.0").accept("1.10.0")
    assert s.highest_version == "1.10.0"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"\x00\x01garbage",
        b"[]",
        b'{"schema": "1"}',
        b'{"schema": 1, "slots": []}',
        b'{"schema": 1, "slots": {"x": {"label": "A", "condition": "weird"}}}',
        b'{"schema": 1, "pending": {"step": "rebooting"}}',
        b'{"schema": 1, "highest_version": 3}',
        b'{"schema": 1, "failed_versions": "1.0"}',
    ],
)
def test_corrupt_file_is_set_aside_never_trusted(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    assert store.load() == State()
    assert not store.path.exists()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content


def test_newer_schema_is_refused_not_misread(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text('{"schema": 2, "highest_version": "9.0"}')
    with pytest.raises(StateError) as err:
        store.load()
    assert err.value.kind == "newer_schema"
    assert store.path.exists()  # left for the newer agent


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError) as err:
        StateStore(blocker / "state").save(State())
    assert err.value.kind == "unwritable"


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 2000,  # json.loads recursed until RecursionError
        b'{"schema": 1, "agent": ' + b'{"a":' * 2000 + b"1" + b"}" * 2001,
        b'{"schema": 1, "highest_version": "' + b"9" * MAX_STATE_BYTES + b'"}',  # too large
        b'{"schema": 1, "failed_versions": ["\xff"]}',  # not UTF-8
    ],
    ids=["deep-array", "deep-agent", "too-large", "not-utf8"],
)
def test_hostile_file_is_set_aside_never_a_crash(tmp_path: Path, content: bytes) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    with capture_logs() as logs:
        assert store.load() == State()
    assert [e["event"] for e in logs] == ["state_corrupt_set_aside"]
    assert not store.path.exists()
    (aside,) = tmp_path.glob("state.json.corrupt-*")
    assert aside.read_bytes() == content  # kept for a post-mortem, byte for byte


def test_nan_written_by_python_still_reads(tmp_path: Path) -> None:
    # json.dumps writes NaN/Infinity; machine.server_interval copes with a NaN
    store = StateStore(tmp_path)
    store.save(State(agent={"state": "IDLE", "server_interval_s": float("inf")}))
    assert store.load().agent == {"state": "IDLE", "server_interval_s": float("inf")}


def test_corrupt_file_that_cannot_be_set_aside_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path)
    store.path.write_bytes(b"[" * 2000)

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")  # a read-only state_dir (as root too)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateError) as err:
        store.load()
    assert err.value.kind == "unwritable"
    assert "cannot be moved aside" in err.value.message
    assert store.path.read_bytes() == b"[" * 2000  # untouched
