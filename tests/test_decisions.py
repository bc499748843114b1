"""The pure decisions of updater.decisions, table-tested."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from uuid import UUID

import pytest

from partitions.bootcontrol import Slot, SlotFlags, SlotStatus
from updater.decisions import (
    detect_rollback,
    health_failure_action,
    host_state,
    is_staged,
    rollback_refusal,
    settle_booted_install,
    slot_version,
)
from updater.state import Pending, SlotRecord, State

A = Slot("USR-A", 1, UUID(int=1), Path("/dev/vda"), 1 << 20, 1 << 30)
B = Slot("USR-B", 2, UUID(int=2), Path("/dev/vda"), (1 << 20) + (1 << 30), 1 << 30)
GOOD = SlotFlags(1, 0, True)
TRIAL = SlotFlags(2, 1, False)
BAD = SlotFlags(0, 0, False)


def state(a: SlotRecord | None = None, b: SlotRecord | None = None, pending: bool = False) -> State:
    slots = {str(s.part_uuid): r for s, r in ((A, a), (B, b)) if r is not None}
    return State(
        "1.1.0", slots, Pending("installing", str(B.part_uuid), "1.1.0", "t") if pending else None
    )


INSTALLED = SlotRecord("USR-B", "installed", "1.1.0", 10, "ab" * 32)
HALF = SlotRecord("USR-B", "installing", "1.1.0")
OLD_GOOD = SlotRecord("USR-A", "good", "1.0.0")


@pytest.mark.parametrize(
    ("st", "slot", "booted", "osr", "expected"),
    [
        (state(), A, A, "1.0.0", "1.0.0"),  # no record: os-release, for the booted slot
        (state(), B, A, "1.0.0", None),  # ... and nothing for the other
        (state(b=INSTALLED), B, A, "1.0.0", "1.1.0"),
        (state(b=HALF), B, A, "1.0.0", None),  # half written: holds no version
        (state(b=INSTALLED), B, B, "9.9", "1.1.0"),  # our record wins over os-release
        (state(a=OLD_GOOD), A, A, None, "1.0.0"),
    ],
)
def test_slot_version(
    st: State, slot: Slot, booted: Slot, osr: str | None, expected: str | None
) -> None:
    assert slot_version(st, slot, booted, osr) == expected


@pytest.mark.parametrize(
    ("st", "target", "primary", "version", "staged"),
    [
        (state(b=INSTALLED), SlotStatus(B, TRIAL), B, "1.1.0", True),
        (state(b=INSTALLED), SlotStatus(B, TRIAL), B, "1.2.0", False),  # another version
        (state(b=INSTALLED), SlotStatus(B, TRIAL), A, "1.1.0", False),  # not next boot
        (state(b=INSTALLED), SlotStatus(B, BAD), B, "1.1.0", False),  # tries used up
        (state(b=HALF), SlotStatus(B, TRIAL), B, "1.1.0", False),  # incomplete
        (state(), SlotStatus(B, TRIAL), B, "1.1.0", False),  # no record at all
    ],
)
def test_is_staged(
    st: State, target: SlotStatus, primary: Slot | None, version: str, staged: bool
) -> None:
    assert is_staged(st, target, primary, version) is staged


@pytest.mark.parametrize(
    ("st", "booted", "primary", "busy", "expected"),
    [
        (state(), SlotStatus(A, GOOD), A, False, "idle"),
        (state(), SlotStatus(A, GOOD), A, True, "installing"),
        (state(pending=True), SlotStatus(A, GOOD), A, False, "install_interrupted"),
        # a power cut after the install made B the next boot, before "installed" was saved
        (state(b=HALF, pending=True), SlotStatus(B, TRIAL), B, False, "trial_boot"),
        (state(b=INSTALLED), SlotStatus(A, GOOD), B, False, "update_staged"),
        (state(b=INSTALLED), SlotStatus(B, BAD), A, False, "trial_boot"),
        (state(b=INSTALLED), SlotStatus(B, TRIAL), B, True, "installing"),
    ],
)
def test_host_state(
    st: State, booted: SlotStatus, primary: Slot | None, busy: bool, expected: str
) -> None:
    assert host_state(st, booted, primary, busy) == expected


@pytest.mark.parametrize(
    ("booted", "settled"),
    [(A, False), (B, True)],  # only the slot that booted completed its install
)
def test_settle_booted_install(booted: Slot, settled: bool) -> None:
    st = state(b=HALF, pending=True)
    assert (settle_booted_install(st, booted).pending is None) is settled
    assert settle_booted_install(state(), booted) == state()


@pytest.mark.parametrize(
    ("record", "flags", "failed", "version"),
    [
        (INSTALLED, BAD, (), "1.1.0"),  # the trial boot failed: back on the old slot
        (SlotRecord("USR-B", "bad", "1.1.0"), BAD, (), "1.1.0"),  # health checks failed
        (SlotRecord("USR-B", "bad", "1.1.0"), BAD, ("1.1.0",), None),  # reported already
        (INSTALLED, TRIAL, (), None),  # staged, not booted yet
        (INSTALLED, GOOD, (), None),
        (HALF, BAD, (), None),  # a failed install is no rollback
        (None, BAD, (), None),
    ],
)
def test_detect_rollback(
    record: SlotRecord | None, flags: SlotFlags, failed: tuple[str, ...], version: str | None
) -> None:
    st = replace(state(b=record), failed_versions=failed)
    assert detect_rollback(st, SlotStatus(B, flags)) == version


@pytest.mark.parametrize(
    ("record", "other", "primary", "refused"),
    [
        (None, SlotStatus(B, BAD), A, "no record"),
        (HALF, SlotStatus(B, BAD), A, "installing"),
        (INSTALLED, SlotStatus(B, TRIAL), B, "already boots next"),
        (INSTALLED, SlotStatus(B, BAD), A, None),
        (SlotRecord("USR-B", "good", "1.1.0"), SlotStatus(B, GOOD), A, None),
    ],
)
def test_rollback_refusal(
    record: SlotRecord | None, other: SlotStatus, primary: Slot, refused: str | None
) -> None:
    why = rollback_refusal(record, other, primary)
    assert (why is None) if refused is None else (why is not None and refused in why)


ON_TRIAL_AGAIN = SlotFlags(0, 0, False)  # grub-env: a blessed slot after a plain reboot (TRY=1)


@pytest.mark.parametrize(
    ("booted", "record", "other", "action"),
    [
        (GOOD, OLD_GOOD, BAD, "keep"),  # the known-good slot: nothing to fall back to
        (GOOD, OLD_GOOD, GOOD, "keep"),  # ... nor a reason to: the other is older
        (GOOD, None, GOOD, "keep"),  # provisioned, never recorded: the loader's word
        (ON_TRIAL_AGAIN, OLD_GOOD, GOOD, "keep"),  # every boot a trial: the record's word
        (TRIAL, INSTALLED, GOOD, "give_up"),  # a new install's trial boot
        (BAD, INSTALLED, GOOD, "give_up"),  # its one try already spent (systemd-boot)
        (TRIAL, None, GOOD, "give_up"),
        (TRIAL, INSTALLED, BAD, "no_fallback"),
        (TRIAL, SlotRecord("USR-A", "bad", "1.0.0"), BAD, "no_fallback"),
    ],
)
def test_health_failure_action(
    booted: SlotFlags, record: SlotRecord | None, other: SlotFlags, action: str
) -> None:
    assert health_failure_action(SlotStatus(A, booted), record, SlotStatus(B, other)) == action
