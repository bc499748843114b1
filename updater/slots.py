"""The host's two slots: what they hold, and the operations on them that need no
update server (status, mark-good, giving up a trial boot, rollback, un-staging, and
noticing a rollback the firmware did).

:class:`Slots` takes exactly the ports these need: the boot control, the state
store, the clock, os-release, the host update lock, the reboot sentinel, the slot
devices and the ESP's boot files. `updatectl status`, `mark-good` and `rollback`
use it alone; :class:`updater.update.Updater` and :class:`updater.installer.Installer`
work on it. Decisions are :mod:`updater.decisions`; this carries them out in a
crash-safe order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import structlog

from partitions.bootcontrol import BootControl, Slot, SlotFlags, SlotStatus, check_write_target
from updater.bootfiles import BootFiles
from updater.clock import Clock
from updater.decisions import (
    HostState,
    detect_rollback,
    health_failure_action,
    host_state,
    is_staged,
    rollback_refusal,
    settle_booted_install,
    slot_version,
)
from updater.errors import DiskError, RefusedError
from updater.hostports import HostLock, NoRebootSentinel, OsRelease, RebootSentinel
from updater.slotio import SlotDevice
from updater.state import SlotRecord, State, StateStore, Unrecorded, now_iso

log = structlog.get_logger(__name__)

OpenSlot = Callable[[Slot], SlotDevice]


def open_slot_device(slot: Slot) -> SlotDevice:
    """The slot's bytes on its disk (the default ``open_slot``)."""
    return SlotDevice(slot.disk, slot.offset, slot.size)


def read_slot_device(slot: Slot) -> SlotDevice:
    """The slot's bytes, read-only (the booted slot, read for a delta update)."""
    return SlotDevice(slot.disk, slot.offset, slot.size, writable=False)


@dataclass(frozen=True)
class SlotReport:
    label: str
    index: int
    part_uuid: str
    flags: SlotFlags
    version: str | None
    condition: str | None
    booted: bool
    primary: bool
    unstaged: str | None = None  # an install taken off the next boot, and why


@dataclass(frozen=True)
class StatusReport:
    state: HostState
    booted: str
    booted_version: str | None
    primary: str | None
    slots: tuple[SlotReport, ...]
    highest_version: str | None
    pending_version: str | None


class Slots:
    def __init__(
        self,
        *,
        boot: BootControl,
        store: StateStore,
        clock: Clock,
        os_release: OsRelease,
        lock: HostLock,
        sentinel: RebootSentinel | None = None,
        open_slot: OpenSlot | None = None,
        boot_files: BootFiles | None = None,
        chunk_size: int = 1024 * 1024,  # bytes per read when a slot is re-hashed
    ) -> None:
        self.boot = boot
        self.store = store
        self.clock = clock
        self.os_release = os_release
        self.lock = lock
        self.sentinel = sentinel or NoRebootSentinel()
        self.open_slot = open_slot or open_slot_device
        self.read_slot: OpenSlot = read_slot_device
        self.boot_files = boot_files  # None: no ESP configured (gpt-prio)
        self.chunk_size = chunk_size

    # -- facts

    def pair(self) -> tuple[SlotStatus, SlotStatus]:
        """The booted slot and the other one (the install target), checked apart."""
        slots = self.boot.slots()
        booted = self.boot.booted()
        mine = [s for s in slots if s.slot.part_uuid == booted.part_uuid]
        other = [s for s in slots if s.slot.part_uuid != booted.part_uuid]
        if len(mine) != 1 or len(other) != 1:
            raise DiskError("booted_unknown", "the booted partition is not one of the two slots")
        check_write_target(mine[0].slot, other[0].slot)
        return mine[0], other[0]

    def recheck_target(self, booted: Slot, target: Slot) -> None:
        """Right before the write: the slots are still where they were when it was planned."""
        now_booted, now_target = self.pair()
        if now_booted.slot != booted or now_target.slot != target:
            raise DiskError(
                "gpt_invalid",
                f"the slots changed during the install (target {target.label} partition "
                f"{target.index} at {target.offset}+{target.size} is now {now_target.slot.label} "
                f"partition {now_target.slot.index} at {now_target.slot.offset}+"
                f"{now_target.slot.size}); refusing to write",
                hint="was the disk repartitioned? check it with `sgdisk -v`, then retry",
            )

    def booted_version(self, state: State, booted: Slot) -> str | None:
        return slot_version(state, booted, booted, self.os_release.image_version())

    def boot_files_problem(self, slot: Slot, record: SlotRecord) -> str | None:
        """Why ``slot``'s boot files are not the ones installed with it, or None."""
        if not record.boot:
            return None
        if self.boot_files is None:
            return "its boot files cannot be checked: no ESP is configured"
        for b in record.boot:
            if self.boot_files.digest(slot, b.name) != (b.size, b.sha256):
                return f"its boot file {b.name} no longer matches what was installed"
        return None

    def staged_slot_boots_next(self) -> bool:
        """An installed update waits in the other slot and the firmware will pick it."""
        _, other = self.pair()
        state = self.store.load()
        rec = state.slots.get(str(other.slot.part_uuid))
        if rec is None or rec.version is None:
            return False
        return is_staged(state, other, self.boot.primary(), rec.version)

    def status(self) -> StatusReport:
        booted, _other = self.pair()
        state = self.store.load()
        primary = self.boot.primary()
        osr = self.os_release.image_version()
        reports = []
        for st in self.boot.slots():
            rec = state.slots.get(str(st.slot.part_uuid))
            reports.append(
                SlotReport(
                    label=st.slot.label,
                    index=st.slot.index,
                    part_uuid=str(st.slot.part_uuid),
                    flags=st.flags,
                    version=slot_version(state, st.slot, booted.slot, osr),
                    condition=rec.condition if rec else None,
                    booted=st.slot.part_uuid == booted.slot.part_uuid,
                    primary=primary is not None and st.slot.part_uuid == primary.part_uuid,
                    unstaged=rec.unstaged if rec else None,
                )
            )
        return StatusReport(
            state=host_state(state, booted, primary, self.lock.is_held()),
            booted=booted.slot.label,
            booted_version=slot_version(state, booted.slot, booted.slot, osr),
            primary=primary.label if primary else None,
            slots=tuple(reports),
            highest_version=state.highest_version,
            pending_version=state.pending.version if state.pending else None,
        )

    # -- verbs

    def clear_reboot_sentinel(self) -> None:
        """Once the reboot happened (or the staged update is gone)."""
        self.sentinel.clear()

    def note_rollback(self) -> str | None:
        """Detect and record a boot that came back on the old slot; its version, or None.

        Telling the update server is :meth:`updater.update.Updater.note_rollback`'s.
        """
        _, other = self.pair()
        self._finish_unstage(other)
        state = self.store.load()
        version = detect_rollback(state, other)
        if version is None:
            return None
        uuid = str(other.slot.part_uuid)
        now = self.clock.now()
        when = now_iso(now)
        # the group hears of it (policies.failed) before this host gives its reboot slot back
        kind = state.slots[uuid].failure or "rolled_back"
        note = Unrecorded(version, kind, now.timestamp())
        self.store.update(
            lambda st: (
                st.fail(version)
                .note_unrecorded(note)
                .with_slot(uuid, replace(st.slots[uuid], condition="bad", updated=when))
            )
        )
        log.error(
            "rollback_detected", failed_version=version, slot=other.slot.label, failure_kind=kind
        )
        return version

    def unstage(self, version: str, reason: str) -> Slot | None:
        """The staged ``version`` must not boot (``reason``: the refusal's kind, e.g.
        version_blocked): the booted slot is the next boot again, whatever restarts the
        machine. The other slot keeps its bytes, recorded as un-staged; a check stages
        them again (re-hashed, not downloaded) once the version may be booted.

        Returns the slot taken off the next boot, or None if ``version`` is not what
        the other slot holds as an install (nothing changes then).
        """
        with self.lock.exclusive():
            booted, other = self.pair()
            uuid = str(other.slot.part_uuid)
            rec = self.store.load().slots.get(uuid)
            if rec is None or rec.condition != "installed" or rec.version != version:
                log.warning(
                    "unstage_nothing_staged",
                    version=version,
                    slot=other.slot.label,
                    holds=None if rec is None else rec.version,
                )
                return None
            # 1. The record first: a slot that cannot boot with a plain "installed" record
            # reads as a rollback (detect_rollback), which this is not.
            withdrawn = replace(rec, unstaged=reason, updated=now_iso(self.clock.now()))
            self.store.update(lambda st: replace(st.with_slot(uuid, withdrawn), boot_report=None))
            # 2. The booted slot boots next; 3. nothing asks for a reboot any more.
            self.boot.mark_bad(other.slot)
            self.clear_reboot_sentinel()
            log.warning(
                "update_unstaged",
                version=version,
                slot=other.slot.label,
                reason=reason,
                next_boot=booted.slot.label,
            )
            return other.slot

    def _finish_unstage(self, other: SlotStatus) -> None:
        """An un-staging cut short between its record and the boot flags is finished."""
        rec = self.store.load().slots.get(str(other.slot.part_uuid))
        if rec is None or rec.unstaged is None or rec.condition != "installed":
            return
        if other.flags.bootable and not other.flags.successful:
            self.boot.mark_bad(other.slot)
            self.clear_reboot_sentinel()
            log.warning(
                "update_unstaged",
                version=rec.version,
                slot=other.slot.label,
                reason=rec.unstaged,
                resumed=True,
            )

    def mark_booted_bad(self, kind: str | None = None) -> Slot | None:
        """Failed health checks on a trial boot: never boot this slot again.

        Returns the slot, or None when it is not given up (see
        :func:`health_failure_action`): the known-good slot keeps booting (a
        boot loader that puts every boot on trial is told so again), and a
        trial slot with nothing to fall back to is left as it is.
        """
        with self.lock.exclusive():
            booted, other = self.pair()
            uuid = str(booted.slot.part_uuid)
            rec = self.store.load().slots.get(uuid)
            action = health_failure_action(booted, rec, other)
            if action == "keep":
                if not booted.flags.successful:
                    self.boot.mark_good(booted.slot)  # e.g. grub-env: TRY=0 again
                log.error(
                    "health_failed_known_good",
                    slot=booted.slot.label,
                    version=rec.version if rec else None,
                )
                return None
            if action == "no_fallback":
                log.error(
                    "health_failed_no_fallback",
                    slot=booted.slot.label,
                    other=other.slot.label,
                    other_bootable=other.flags.bootable,
                )
                return None
            self.boot.mark_bad(booted.slot)
            if rec is not None:
                # The version joins failed_versions when the old slot has booted
                # again and the agent reports the rollback (note_rollback).
                bad = replace(rec, condition="bad", updated=now_iso(self.clock.now()), failure=kind)
                self.store.update(
                    lambda st: settle_booted_install(st, booted.slot).with_slot(uuid, bad)
                )
            log.error("marked_bad", slot=booted.slot.label, version=rec.version if rec else None)
            return booted.slot

    def mark_good(self) -> Slot:
        """The booted slot is healthy: keep booting it."""
        with self.lock.exclusive():
            booted, _ = self.pair()
            self.boot.mark_good(booted.slot)
            uuid = str(booted.slot.part_uuid)
            when = now_iso(self.clock.now())
            version = self.booted_version(self.store.load(), booted.slot)

            def blessed(st: State) -> State:
                rec = st.slots.get(uuid) or SlotRecord(booted.slot.label, "good", version)
                st = settle_booted_install(st, booted.slot)
                return st.with_slot(
                    uuid, replace(rec, condition="good", updated=when, unstaged=None)
                )

            self.store.update(blessed)
            log.info("marked_good", slot=booted.slot.label, version=version)
            return booted.slot

    def rollback(self) -> Slot:
        """Make the other slot the next boot, if it holds a complete, verified install."""
        with self.lock.exclusive():
            _, other = self.pair()
            state = self.store.load()
            rec = state.slots.get(str(other.slot.part_uuid))
            why = rollback_refusal(rec, other, self.boot.primary())
            if why is None and rec is not None and rec.raw_sha256 and rec.raw_size:
                with self.open_slot(other.slot) as device:
                    if device.hash(rec.raw_size, self.chunk_size) != rec.raw_sha256:
                        why = "the other slot's bytes no longer match what was installed"
            if why is None and rec is not None:
                why = self.boot_files_problem(other.slot, rec)
            if why is not None:
                raise RefusedError("rollback_refused", f"rollback refused: {why}")
            self.boot.make_primary(other.slot)
            log.info("rollback_staged", slot=other.slot.label, version=rec.version if rec else None)
            return other.slot


def as_dict(report: StatusReport) -> Mapping[str, object]:
    return {
        "state": report.state,
        "booted": report.booted,
        "booted_version": report.booted_version,
        "primary": report.primary,
        "highest_version": report.highest_version,
        "pending_version": report.pending_version,
        "slots": [
            {
                "label": s.label,
                "index": s.index,
                "part_uuid": s.part_uuid,
                "priority": s.flags.priority,
                "tries": s.flags.tries,
                "successful": s.flags.successful,
                "version": s.version,
                "condition": s.condition,
                "booted": s.booted,
                "primary": s.primary,
                "unstaged": s.unstaged,
            }
            for s in report.slots
        ],
    }
