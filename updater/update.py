"""Check, install, status, mark-good and rollback: the thin shell around the rules.

Decisions (which version is booted, whether an update is staged, whether a
rollback is allowed, what state the host is in) are pure functions at the top
of this module; the :class:`Updater` only gathers facts through its ports and
carries the decisions out in a crash-safe order.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import structlog

from partitions.bootcontrol import BootControl, Slot, SlotFlags, SlotStatus, check_write_target
from policies.failed import FailedRecord, Verdict, refusal
from updater import download, osrelease, versions
from updater.bootfiles import BootFiles, checked
from updater.clock import Clock
from updater.errors import (
    Cancelled,
    ConfigError,
    DiskError,
    OmahaError,
    RefusedError,
    UpdaterError,
    VerificationError,
    internal_error,
)
from updater.fsutil import atomic_write
from updater.gpg import SignatureChecker
from updater.hostlock import exclusive, is_held
from updater.install import Progress, ProgressFn, WriteResult, write_image
from updater.manifest import Manifest
from updater.slotio import SlotDevice
from updater.source import Deferred, Happening, ImageClaim, NoOffer, UpdateSource
from updater.state import (
    BootFileRecord,
    BootReport,
    Pending,
    SlotRecord,
    State,
    StateStore,
    Unrecorded,
    now_iso,
)
from updater.transport import Transport
from updater.verify import Expectations, is_newer, verify_manifest

log = structlog.get_logger(__name__)

HostState = Literal["idle", "installing", "install_interrupted", "update_staged", "trial_boot"]

# --- pure decisions ----------------------------------------------------------


def slot_version(
    state: State, slot: Slot, booted: Slot, os_release_version: str | None
) -> str | None:
    """What a slot holds: our record of it, else (booted slot only) os-release."""
    rec = state.slots.get(str(slot.part_uuid))
    if rec is not None and rec.condition in ("installed", "good") and rec.version:
        return rec.version
    if slot.part_uuid == booted.part_uuid:
        return os_release_version
    return None


def is_staged(state: State, target: SlotStatus, primary: Slot | None, version: str) -> bool:
    """The target already holds ``version``, verified, and boots next."""
    rec = state.slots.get(str(target.slot.part_uuid))
    return (
        rec is not None
        and rec.condition == "installed"
        and rec.unstaged is None
        and rec.version == version
        and primary is not None
        and primary.part_uuid == target.slot.part_uuid
        and target.flags.bootable
    )


def host_state(state: State, booted: SlotStatus, primary: Slot | None, busy: bool) -> HostState:
    if busy:
        return "installing"
    if state.pending is not None and state.pending.part_uuid != str(booted.slot.part_uuid):
        return "install_interrupted"
    if not booted.flags.successful:
        return "trial_boot"
    if primary is not None and primary.part_uuid != booted.slot.part_uuid:
        return "update_staged"
    return "idle"


def settle_booted_install(state: State, booted: Slot) -> State:
    """Drop the pending mark of an install into the slot that booted: it was complete.

    The firmware boots an install's target only once the install made it the
    next boot, which follows the verified, flushed write; a power cut between
    that and saving "installed" leaves the mark (and the slot "installing").
    """
    if state.pending is None or state.pending.part_uuid != str(booted.part_uuid):
        return state
    return replace(state, pending=None)


def rollback_refusal(
    record: SlotRecord | None, other: SlotStatus, primary: Slot | None
) -> str | None:
    """Why the other slot may not become the next boot, or None if it may."""
    if record is None:
        return "this agent has no record of what the other slot holds"
    if record.condition not in ("installed", "good"):
        return f"the other slot is {record.condition}, not a complete, verified install"
    if record.unstaged is not None:
        return (
            f"the other slot holds {record.version}, un-staged ({record.unstaged}); "
            "a check stages it again once it may be booted"
        )
    if primary is not None and primary.part_uuid == other.slot.part_uuid:
        return "the other slot already boots next"
    return None


HealthFailureAction = Literal["give_up", "keep", "no_fallback"]


def health_failure_action(
    booted: SlotStatus, record: SlotRecord | None, other: SlotStatus
) -> HealthFailureAction:
    """What a failed health check does to the booted slot.

    ``keep``: it is the known-good slot, blessed before with what it holds now
    (the boot loader says so, or this agent's record does: RAUC's GRUB puts
    every boot on trial), so it stays the slot that boots; there is no newer
    install to give up, and falling back would downgrade. ``give_up``: a trial
    boot of a new install, and the other slot can boot: mark it bad.
    ``no_fallback``: a trial boot, but nothing else can boot.
    """
    if booted.flags.successful or (record is not None and record.condition == "good"):
        return "keep"
    if not other.flags.bootable:
        return "no_fallback"
    return "give_up"


def detect_rollback(state: State, other: SlotStatus) -> str | None:
    """The version whose trial boot failed, if the host came back on the old slot.

    The other slot holds an install that was verified and made the next boot
    ("installed"), or one given up after failed health checks ("bad"), and it
    is neither bootable nor blessed: the firmware spent its try or the agent
    marked it bad, and the old slot booted again. Reported once: the version
    then joins ``failed_versions``.
    """
    rec = state.slots.get(str(other.slot.part_uuid))
    if rec is None or rec.condition not in ("installed", "bad") or rec.version is None:
        return None
    if rec.unstaged is not None:  # the agent took it off the next boot; it never booted
        return None
    if other.flags.bootable or other.flags.successful:
        return None
    if rec.version in state.failed_versions:
        return None
    return rec.version


def reusable_install(record: SlotRecord | None, m: Manifest) -> bool:
    """The slot holds ``m``'s image from an earlier install the agent un-staged (a blocked
    version, unblocked since): what was written and verified then is this manifest's."""
    return (
        record is not None
        and record.condition == "installed"
        and record.unstaged is not None
        and record.version == m.version
        and record.raw_size == m.image.raw_size
        and record.raw_sha256 == m.image.raw_sha256
        and record.boot == tuple(BootFileRecord(b.name, b.size, b.sha256) for b in m.boot)
    )


def check_claim(claim: ImageClaim, manifest: Manifest, image_url: str) -> None:
    """An update server's size, hash and URL must be the signed manifest's own."""
    mismatches = []
    if claim.size != manifest.image.size:
        mismatches.append(f"size {claim.size} != {manifest.image.size}")
    if claim.sha256 != manifest.image.sha256:
        mismatches.append(f"sha256 {claim.sha256} != {manifest.image.sha256}")
    if claim.url != image_url:
        mismatches.append(f"url {claim.url} != {image_url}")
    if claim.version is not None and claim.version != manifest.version:
        mismatches.append(f"version {claim.version} != {manifest.version}")
    if mismatches:
        raise VerificationError(
            "source_mismatch",
            "the update server's answer disagrees with the signed manifest: "
            + "; ".join(mismatches),
        )


# --- ports -------------------------------------------------------------------


class VersionBlocks(Protocol):
    """This host's group's failed versions (policies.failed.GroupBlocks over etcd).

    Blocking calls; LockError when the group's store cannot be asked.
    """

    group: str

    def verdict(self, version: str) -> Verdict:
        """May ``version`` be installed or rebooted into?"""
        ...

    def record(self, version: str, kind: str, at: float) -> FailedRecord | UpdaterError:
        """Add this host's failure of ``version`` (idempotent); what is stored afterwards."""
        ...


# --- results -----------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    booted: Slot
    booted_version: str | None
    target: Slot
    manifest: Manifest | None  # None: the server offered nothing (or deferred it)
    update_available: bool
    staged: bool  # already installed into the target and boots next
    failed_before: bool = False  # this version rolled back on this host: not again
    deferred: str | None = None  # the server holds an update back (its rollout policy)
    interval_s: float | None = None  # the server's poll interval, if it gave one
    blocked: Verdict | None = None  # the version failed on hosts of the group: not installed


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


class Updater:
    def __init__(
        self,
        *,
        boot: BootControl,
        store: StateStore,
        clock: Clock,
        os_release: Path,
        channel: str = "stable",
        source: UpdateSource | None = None,
        verifier: SignatureChecker | None = None,
        transport: Transport | None = None,
        open_slot: Callable[[Slot], SlotDevice] | None = None,
        readback: bool = True,
        chunk_size: int = 1024 * 1024,
        resume_attempts: int = 5,
        reboot_sentinel: Path | None = None,
        progress: ProgressFn | None = None,
        boot_files: BootFiles | ConfigError | None = None,
        blocks: VersionBlocks | None = None,
    ) -> None:
        self.boot = boot
        self.blocks = blocks
        # None: no ESP configured (gpt-prio); a ConfigError: why the boot loader would not
        # boot a slot's own files (see _install_locked, which refuses such a release)
        self._boot_files_refusal = boot_files if isinstance(boot_files, ConfigError) else None
        self.boot_files = None if isinstance(boot_files, ConfigError) else boot_files
        self.store = store
        self.clock = clock
        self.os_release = os_release
        self.channel = channel
        self.source = source
        self.verifier = verifier
        self.transport = transport
        self.open_slot = open_slot or (lambda s: SlotDevice(s.disk, s.offset, s.size))
        self.readback = readback
        self.chunk_size = chunk_size
        self.resume_attempts = resume_attempts
        self.reboot_sentinel = reboot_sentinel
        self.progress = progress

    # -- facts

    def _slots(self) -> tuple[SlotStatus, SlotStatus]:
        slots = self.boot.slots()
        booted = self.boot.booted()
        mine = [s for s in slots if s.slot.part_uuid == booted.part_uuid]
        other = [s for s in slots if s.slot.part_uuid != booted.part_uuid]
        if len(mine) != 1 or len(other) != 1:
            raise DiskError("booted_unknown", "the booted partition is not one of the two slots")
        check_write_target(mine[0].slot, other[0].slot)
        return mine[0], other[0]

    def _recheck_target(self, booted: Slot, target: Slot) -> None:
        """Right before the write: the slots are still where they were when it was planned."""
        now_booted, now_target = self._slots()
        if now_booted.slot != booted or now_target.slot != target:
            raise DiskError(
                "gpt_invalid",
                f"the slots changed during the install (target {target.label} partition "
                f"{target.index} at {target.offset}+{target.size} is now {now_target.slot.label} "
                f"partition {now_target.slot.index} at {now_target.slot.offset}+"
                f"{now_target.slot.size}); refusing to write",
                hint="was the disk repartitioned? check it with `sgdisk -v`, then retry",
            )

    def _booted_version(self, state: State, booted: Slot) -> str | None:
        return slot_version(state, booted, booted, osrelease.image_version(self.os_release))

    # -- verbs

    def check(self) -> CheckResult:
        """Fetch and verify the channel's manifest; no slot or state changes."""
        if self.source is None or self.verifier is None:
            raise RuntimeError("check needs a source and a verifier")
        booted, target = self._slots()
        self.note_rollback()
        state = self.store.load()
        booted_version = self._booted_version(state, booted.slot)
        if booted.flags.successful:  # a trial boot has not succeeded yet
            self._report_boot(state, booted_version)
        try:
            return self._check(booted, target, state, booted_version)
        except (VerificationError, OmahaError) as exc:
            # the server answered, but not acceptably: it should hear of it
            self._report(Happening("failed", version=booted_version, error=exc, during_check=True))
            raise

    def _report_boot(self, state: State, booted_version: str | None) -> None:
        """The first check after the staged version booted (and was blessed) reports it."""
        report = state.boot_report
        if report is None or booted_version is None or self.source is None:
            return
        if versions.compare(booted_version, report.version) == 0:
            self._report(
                Happening(
                    "rebooted", version=report.version, previous_version=report.previous_version
                )
            )
            self.store.update(lambda st: replace(st, boot_report=None))

    def _check(
        self, booted: SlotStatus, target: SlotStatus, state: State, booted_version: str | None
    ) -> CheckResult:
        assert self.source is not None and self.verifier is not None
        doc = self.source.fetch(booted_version)
        if isinstance(doc, NoOffer | Deferred):
            deferred = doc.reason if isinstance(doc, Deferred) else None
            if deferred is not None:
                self._report(Happening("deferred", version=booted_version))
            log.info(
                "update_checked", available=False, booted_version=booted_version, deferred=deferred
            )
            return CheckResult(
                booted.slot,
                booted_version,
                target.slot,
                None,
                False,
                False,
                deferred=deferred,
                interval_s=doc.interval_s,
            )
        verdict = None if doc.signature is None else self.verifier.verify(doc.body, doc.signature)
        manifest = verify_manifest(
            doc.body,
            doc.signature,
            verdict,
            Expectations(
                channel=self.channel,
                booted_version=booted_version,
                highest_accepted=state.highest_version,
                slot_size=target.slot.size,
                now=self.clock.now(),
            ),
        )
        if doc.claim is not None:
            check_claim(doc.claim, manifest, self.source.image_url(manifest))
        failed_before = manifest.version in state.failed_versions
        available = is_newer(manifest, booted_version) and not failed_before
        staged = available and is_staged(state, target, self.boot.primary(), manifest.version)
        blocked = self.blocked(manifest.version) if available and not staged else None
        log.info(
            "update_checked",
            version=manifest.version,
            booted_version=booted_version,
            available=available,
            staged=staged,
            failed_before=failed_before,
            blocked=blocked is not None,
        )
        return CheckResult(
            booted.slot,
            booted_version,
            target.slot,
            manifest,
            available,
            staged,
            failed_before,
            interval_s=doc.interval_s,
            blocked=blocked,
        )

    def blocked(self, version: str) -> Verdict | None:
        """The group's verdict on installing ``version`` if it blocks it, else None.

        A lookup that fails does not stop the install (staging reboots nothing):
        the reboot asks again and does not happen unless the answer is "not blocked".
        """
        if self.blocks is None:
            return None
        try:
            verdict = self.blocks.verdict(version)
        except UpdaterError as exc:
            log.warning(
                "version_block_unknown",
                version=version,
                group=self.blocks.group,
                error_kind=exc.kind,
                error=exc.message,
            )
            return None
        if not verdict.blocked:
            return None
        log.error(
            "install_refused_version_blocked",
            version=version,
            group=self.blocks.group,
            hosts=verdict.hosts,
            reason=verdict.describe(),
        )
        return verdict

    def note_rollback(self) -> str | None:
        """Detect and record a boot that came back on the old slot; its version, or None."""
        _, other = self._slots()
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
        if self.source is not None:
            self._report(Happening("rolled_back", version=version))
            self.store.update(lambda st: replace(st, boot_report=None))
        return version

    def install(
        self,
        check: CheckResult,
        cancel: threading.Event | None = None,
        progress: ProgressFn | None = None,
    ) -> WriteResult | None:
        """Install a checked update into the other slot; None if there is nothing to do."""
        if self.source is None or self.transport is None:
            raise RuntimeError("install needs a source and a transport")
        if not check.update_available or check.staged or check.manifest is None:
            return None
        if check.blocked is not None:
            raise refusal(check.blocked)
        with exclusive(self.store.state_dir):
            booted, target = self._slots()
            if not booted.flags.successful:
                raise RefusedError(
                    "booted_not_good",
                    f"the booted slot {booted.slot.label} is on a trial boot; installing now "
                    "would overwrite the only known-good slot",
                    hint="run `updatectl mark-good` once the system is healthy",
                )
            manifest = check.manifest
            restaged = self._restage(manifest, booted, target)
            if restaged is not None:
                return restaged
            return self._install_locked(manifest, booted, target, cancel, progress or self.progress)

    def _restage(self, m: Manifest, booted: SlotStatus, target: SlotStatus) -> WriteResult | None:
        """Stage an un-staged install of ``m`` again without downloading it, if the slot
        still holds exactly what was verified then (re-hashed here); None: install it."""
        slot = target.slot
        uuid = str(slot.part_uuid)
        rec = self.store.load().slots.get(uuid)
        if not reusable_install(rec, m):
            return None
        assert rec is not None and rec.raw_size is not None and rec.raw_sha256 is not None
        started = self.clock.monotonic()
        self._recheck_target(booted.slot, slot)
        with self.open_slot(slot) as device:
            digest = device.hash(rec.raw_size, self.chunk_size)
        problem = self._boot_files_problem(slot, rec)
        if digest != rec.raw_sha256:
            problem = "its bytes no longer match what was installed"
        if problem is not None:
            log.warning("restage_refused", version=m.version, slot=slot.label, reason=problem)
            return None
        self._stage(m, booted.slot, slot, replace(rec, unstaged=None))
        seconds = self.clock.monotonic() - started
        log.info("update_restaged", version=m.version, slot=slot.label, seconds=round(seconds, 3))
        return WriteResult(m.image.sha256, rec.raw_sha256, rec.raw_size, seconds)

    def _stage(self, m: Manifest, booted: Slot, slot: Slot, record: SlotRecord) -> None:
        """The verified install in ``slot`` boots next, once, on trial; recorded and told."""
        self.boot.make_primary(slot)
        record = replace(record, updated=now_iso(self.clock.now()))
        previous = self._booted_version(self.store.load(), booted) or ""
        self.store.update(
            lambda st: replace(
                st.with_slot(str(slot.part_uuid), record),
                pending=None,
                boot_report=BootReport(m.version, previous),
            )
        )
        self._report(Happening("staged", version=m.version, previous_version=previous))
        self._write_reboot_sentinel(m.version)

    def unstage(self, version: str, reason: str) -> Slot | None:
        """The staged ``version`` must not boot (``reason``: the refusal's kind, e.g.
        version_blocked): the booted slot is the next boot again, whatever restarts the
        machine. The other slot keeps its bytes, recorded as un-staged; a check stages
        them again (re-hashed, not downloaded) once the version may be booted.

        Returns the slot taken off the next boot, or None if ``version`` is not what
        the other slot holds as an install (nothing changes then).
        """
        with exclusive(self.store.state_dir):
            booted, other = self._slots()
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

    def _install_locked(
        self,
        m: Manifest,
        booted: SlotStatus,
        target: SlotStatus,
        cancel: threading.Event | None,
        progress: ProgressFn | None,
    ) -> WriteResult:
        slot = target.slot
        uuid = str(slot.part_uuid)
        url = self.source.image_url(m) if self.source else m.image.url
        now = now_iso(self.clock.now())
        if m.boot and self.boot_files is None:
            # Before anything changes: the new kernel would never reach the boot loader.
            refusal = self._boot_files_refusal or ConfigError(
                "missing",
                f"release {m.version} carries boot files "
                f"({', '.join(b.name for b in m.boot)}) and no ESP is configured to put them on",
                key="disk.esp",
                hint="set [disk] esp (the mounted ESP) or esp_partition, where the boot "
                "loader reads /<slot>/<file>",
            )
            _log_install_failed(m.version, slot, refusal)
            self._report(Happening("failed", version=m.version, error=refusal))
            raise refusal
        log.info("install_started", version=m.version, slot=slot.label, url=url)

        # 1. From here on a crash must never leave the target bootable.
        self.boot.mark_bad(slot)

        def begin(state: State) -> State:
            booted_uuid = str(booted.slot.part_uuid)
            if booted_uuid not in state.slots:
                # Remember what the known-good slot holds, so a rollback to it is allowed.
                version = self._booted_version(state, booted.slot)
                state = state.with_slot(
                    booted_uuid, SlotRecord(booted.slot.label, "good", version, updated=now)
                )
            state = state.accept(m.version).with_slot(
                uuid, SlotRecord(slot.label, "installing", m.version, updated=now)
            )
            return replace(state, pending=Pending("installing", uuid, m.version, now))

        self.store.update(begin)

        # 2-5. Stream, hash, decompress, hash, write, fsync, compare, read back.
        assert self.transport is not None and self.source is not None
        self._report(Happening("download_started", version=m.version))
        try:
            self._recheck_target(booted.slot, slot)
            with self.open_slot(slot) as device:
                result = write_image(
                    download.Download(
                        self.transport,
                        url,
                        size=m.image.size,
                        chunk_size=self.chunk_size,
                        resume_attempts=self.resume_attempts,
                    ),
                    m.image,
                    device,
                    chunk_size=self.chunk_size,
                    readback=self.readback,
                    progress=progress,
                    cancel=cancel,
                )
            # 5b. The slot's own boot files, before it may boot (the booted slot's: never).
            boot = self._write_boot_files(m, booted.slot, slot, cancel)
        except Exception as exc:
            # any failure, ours or not, ends the same way: nothing pending, reported
            error = internal_error(exc, "install")
            _log_install_failed(m.version, slot, error)
            self.store.update(lambda st: replace(st, pending=None))
            if not isinstance(error, Cancelled):
                self._report(Happening("failed", version=m.version, error=error))
            if error is exc:
                raise
            raise error from exc
        self._report(Happening("download_finished", version=m.version))

        # 6. Only now may the target boot: once, on trial.
        if progress is not None:
            progress(Progress("finalize", 1, 1))
        record = SlotRecord(
            slot.label, "installed", m.version, result.raw_size, result.raw_sha256, boot=boot
        )
        self._stage(m, booted.slot, slot, record)
        log.info(
            "update_staged", version=m.version, slot=slot.label, seconds=round(result.seconds, 3)
        )
        return result

    def _write_boot_files(
        self, m: Manifest, booted: Slot, target: Slot, cancel: threading.Event | None
    ) -> tuple[BootFileRecord, ...]:
        """Download each boot file (size and sha256 checked while it streams) to the ESP.

        Each lands under a temporary name and is renamed into place only once
        every byte matched (:func:`updater.bootfiles.checked`); with readback on,
        it is read back and hashed. The target is still unbootable here: its
        boot entry is written by ``make_primary``, after this.
        """
        if not m.boot:
            return ()
        assert self.boot_files is not None and self.source is not None
        assert self.transport is not None
        for ref in m.boot:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled", "the install was stopped")
            url = self.source.boot_url(m, ref)
            self._recheck_target(booted, target)
            chunks = download.Download(
                self.transport,
                url,
                size=ref.size,
                chunk_size=self.chunk_size,
                resume_attempts=self.resume_attempts,
            )
            try:
                self.boot_files.write(
                    target, ref.name, checked(chunks, ref, url, cancel), booted=booted
                )
            finally:
                chunks.close()
            if self.readback:
                on_disk = self.boot_files.digest(target, ref.name)
                if on_disk != (ref.size, ref.sha256):
                    raise DiskError(
                        "readback_mismatch",
                        f"boot file {ref.name} of {target.label} reads back as {on_disk}, "
                        f"{(ref.size, ref.sha256)} was written",
                        hint="the ESP may be failing; check it with `fsck.vfat -n`",
                    )
        return tuple(BootFileRecord(b.name, b.size, b.sha256) for b in m.boot)

    def _boot_files_problem(self, slot: Slot, record: SlotRecord) -> str | None:
        """Why ``slot``'s boot files are not the ones installed with it, or None."""
        if not record.boot:
            return None
        if self.boot_files is None:
            return "its boot files cannot be checked: no ESP is configured"
        for b in record.boot:
            if self.boot_files.digest(slot, b.name) != (b.size, b.sha256):
                return f"its boot file {b.name} no longer matches what was installed"
        return None

    def _report(self, happening: Happening) -> None:
        """Tell the update server what happened. Best effort (``UpdateSource.report``
        never raises): a source that breaks that promise is logged, and the check or
        install it reports on goes on."""
        if self.source is None:
            return
        try:
            self.source.report(happening)
        except Exception as exc:
            log.error(
                "event_report_crashed",
                happened=happening.what,
                version=happening.version,
                error_kind="internal",
                error=internal_error(exc, "report").message,
                exc_info=exc,
            )

    def _write_reboot_sentinel(self, version: str) -> None:
        """kured's /run/reboot-required, and .pkgs naming what needs it: the OS."""
        if self.reboot_sentinel is None:
            return
        os_id = osrelease.parse_file(self.os_release).get("ID") or "os"
        with contextlib.suppress(OSError):
            atomic_write(self.reboot_sentinel, b"")
            atomic_write(
                self.reboot_sentinel.with_name(self.reboot_sentinel.name + ".pkgs"),
                f"{os_id} {version}\n".encode(),
            )

    def clear_reboot_sentinel(self) -> None:
        """Once the reboot happened (or the staged update is gone)."""
        if self.reboot_sentinel is None:
            return
        for path in (
            self.reboot_sentinel,
            self.reboot_sentinel.with_name(self.reboot_sentinel.name + ".pkgs"),
        ):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def staged_slot_boots_next(self) -> bool:
        """An installed update waits in the other slot and the firmware will pick it."""
        _, other = self._slots()
        state = self.store.load()
        rec = state.slots.get(str(other.slot.part_uuid))
        if rec is None or rec.version is None:
            return False
        return is_staged(state, other, self.boot.primary(), rec.version)

    def mark_booted_bad(self, kind: str | None = None) -> Slot | None:
        """Failed health checks on a trial boot: never boot this slot again.

        Returns the slot, or None when it is not given up (see
        :func:`health_failure_action`): the known-good slot keeps booting (a
        boot loader that puts every boot on trial is told so again), and a
        trial slot with nothing to fall back to is left as it is.
        """
        with exclusive(self.store.state_dir):
            booted, other = self._slots()
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

    def status(self) -> StatusReport:
        booted, _other = self._slots()
        state = self.store.load()
        primary = self.boot.primary()
        osr = osrelease.image_version(self.os_release)
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
            state=host_state(state, booted, primary, is_held(self.store.state_dir)),
            booted=booted.slot.label,
            booted_version=slot_version(state, booted.slot, booted.slot, osr),
            primary=primary.label if primary else None,
            slots=tuple(reports),
            highest_version=state.highest_version,
            pending_version=state.pending.version if state.pending else None,
        )

    def mark_good(self) -> Slot:
        """The booted slot is healthy: keep booting it."""
        with exclusive(self.store.state_dir):
            booted, _ = self._slots()
            self.boot.mark_good(booted.slot)
            uuid = str(booted.slot.part_uuid)
            when = now_iso(self.clock.now())
            version = self._booted_version(self.store.load(), booted.slot)

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
        with exclusive(self.store.state_dir):
            _, other = self._slots()
            state = self.store.load()
            rec = state.slots.get(str(other.slot.part_uuid))
            why = rollback_refusal(rec, other, self.boot.primary())
            if why is None and rec is not None and rec.raw_sha256 and rec.raw_size:
                with self.open_slot(other.slot) as device:
                    if device.hash(rec.raw_size, self.chunk_size) != rec.raw_sha256:
                        why = "the other slot's bytes no longer match what was installed"
            if why is None and rec is not None:
                why = self._boot_files_problem(other.slot, rec)
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


def _log_install_failed(version: str, slot: Slot, error: UpdaterError) -> None:
    log.error(
        "install_failed",
        version=version,
        slot=slot.label,
        error_kind=error.kind,
        error=error.message,
    )
