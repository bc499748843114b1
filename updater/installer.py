"""Install a checked, verified update into the other slot, in a crash-safe order:
mark the target unbootable, record the install as pending, stream the image into it
(:func:`updater.install.write_image`), write its boot files, and only then make it
the next boot, once, on trial. An install the agent un-staged is staged again from
the slot's own bytes (re-hashed) instead of downloaded.

:class:`Installer` takes what an install needs: the slots, the update source (URLs,
reports), the transport and the settings.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace

import structlog

from partitions.bootcontrol import Slot, SlotStatus
from updater import chunkindex, delta, download, fssize, slotindex
from updater.bootfiles import checked
from updater.decisions import reusable_install
from updater.errors import (
    Cancelled,
    ConfigError,
    DiskError,
    RefusedError,
    UpdaterError,
    internal_error,
)
from updater.install import Progress, ProgressFn, WriteResult, write_image
from updater.manifest import Manifest
from updater.slotio import aligned_buffer
from updater.slots import Slots
from updater.source import Happening, UpdateSource, report
from updater.state import BootFileRecord, BootReport, Pending, SlotRecord, State, now_iso
from updater.transport import Transport
from updater.updatesettings import UpdateSettings

log = structlog.get_logger(__name__)


class Installer:
    def __init__(
        self,
        *,
        slots: Slots,
        source: UpdateSource,
        transport: Transport,
        settings: UpdateSettings,
        boot_files_refusal: ConfigError | None = None,
    ) -> None:
        self.slots = slots
        self.source = source
        self.transport = transport
        self.settings = settings
        # why the boot loader would not boot a slot's own files (a release that
        # carries boot files is then refused), or None
        self.boot_files_refusal = boot_files_refusal

    def install(
        self,
        m: Manifest,
        cancel: threading.Event | None = None,
        progress: ProgressFn | None = None,
    ) -> WriteResult:
        """Install ``m`` (checked: newer, not staged, not blocked) into the other slot."""
        with self.slots.lock.exclusive():
            booted, target = self.slots.pair()
            if not booted.flags.successful:
                raise RefusedError(
                    "booted_not_good",
                    f"the booted slot {booted.slot.label} is on a trial boot; installing now "
                    "would overwrite the only known-good slot",
                    hint="run `updatectl mark-good` once the system is healthy",
                )
            restaged = self._restage(m, booted, target)
            if restaged is not None:
                return restaged
            return self._install_locked(m, booted, target, cancel, progress)

    def _restage(self, m: Manifest, booted: SlotStatus, target: SlotStatus) -> WriteResult | None:
        """Stage an un-staged install of ``m`` again without downloading it, if the slot
        still holds exactly what was verified then (re-hashed here); None: install it."""
        slot = target.slot
        uuid = str(slot.part_uuid)
        rec = self.slots.store.load().slots.get(uuid)
        if not reusable_install(rec, m):
            return None
        assert rec is not None and rec.raw_size is not None and rec.raw_sha256 is not None
        started = self.slots.clock.monotonic()
        self.slots.recheck_target(booted.slot, slot)
        with self.slots.open_slot(slot) as device:
            digest = device.hash(rec.raw_size, self.settings.chunk_size)
        problem = self.slots.boot_files_problem(slot, rec)
        if digest != rec.raw_sha256:
            problem = "its bytes no longer match what was installed"
        if problem is not None:
            log.warning("restage_refused", version=m.version, slot=slot.label, reason=problem)
            return None
        self._stage(m, booted.slot, slot, replace(rec, unstaged=None))
        seconds = self.slots.clock.monotonic() - started
        log.info("update_restaged", version=m.version, slot=slot.label, seconds=round(seconds, 3))
        return WriteResult(m.image.sha256, rec.raw_sha256, rec.raw_size, seconds)

    def _stage(
        self,
        m: Manifest,
        booted: Slot,
        slot: Slot,
        record: SlotRecord,
        index: chunkindex.ChunkIndex | None = None,
    ) -> None:
        """The verified install in ``slot`` boots next, once, on trial; recorded and told.
        ``index``: the release's chunk index, kept for the slot (:mod:`updater.slotindex`)."""
        self.slots.boot.make_primary(slot)
        if index is not None:
            # kept (synced) before the record names it, after the slot is primary: its
            # fsync must not stand in for the slot's own flush before make_primary
            record = replace(record, index_sha256=self._keep_index(str(slot.part_uuid), index))
        record = replace(record, updated=now_iso(self.slots.clock.now()))
        previous = self.slots.booted_version(self.slots.store.load(), booted) or ""
        self.slots.store.update(
            lambda st: replace(
                st.with_slot(str(slot.part_uuid), record),
                pending=None,
                boot_report=BootReport(m.version, previous),
            )
        )
        report(self.source, Happening("staged", version=m.version, previous_version=previous))
        self.slots.sentinel.write(m.version)

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
        url = self.source.image_url(m)
        now = now_iso(self.slots.clock.now())
        if m.boot and self.slots.boot_files is None:
            # Before anything changes: the new kernel would never reach the boot loader.
            refusal = self.boot_files_refusal or ConfigError(
                "missing",
                f"release {m.version} carries boot files "
                f"({', '.join(b.name for b in m.boot)}) and no ESP is configured to put them on",
                key="disk.esp",
                hint="set [disk] esp (the mounted ESP) or esp_partition, where the boot "
                "loader reads /<slot>/<file>",
            )
            _log_install_failed(m.version, slot, refusal)
            report(self.source, Happening("failed", version=m.version, error=refusal))
            raise refusal
        # 0. Before anything changes: a delta install's index (read and checked). The
        # target is read for blocks at their own place only if the agent wrote it
        # (an earlier install, finished or not). One it never wrote holds nothing or
        # what provisioning put there, which the booted slot then holds too: reading
        # it would save writes, never downloads.
        target_written = uuid in self.slots.store.load().slots
        try:
            how = self._delta_index(m)
        except Exception as exc:
            error = internal_error(exc, "install")
            _log_install_failed(m.version, slot, error)
            if not isinstance(error, Cancelled):
                report(self.source, Happening("failed", version=m.version, error=error))
            if error is exc:
                raise
            raise error from exc
        # the agent's kept indexes of what both slots hold, read while the records name them
        known = (
            None
            if isinstance(how, delta.Declined)
            else self._known(how, booted.slot, slot, target_written)
        )
        log.info("install_started", version=m.version, slot=slot.label, url=url)

        # 1. From here on a crash must never leave the target bootable.
        self.slots.boot.mark_bad(slot)

        def begin(state: State) -> State:
            booted_uuid = str(booted.slot.part_uuid)
            if booted_uuid not in state.slots:
                # Remember what the known-good slot holds, so a rollback to it is allowed.
                version = self.slots.booted_version(state, booted.slot)
                state = state.with_slot(
                    booted_uuid, SlotRecord(booted.slot.label, "good", version, updated=now)
                )
            state = state.accept(m.version).with_slot(
                uuid, SlotRecord(slot.label, "installing", m.version, updated=now)
            )
            return replace(state, pending=Pending("installing", uuid, m.version, now))

        self.slots.store.update(begin)
        self._drop_index(uuid)  # the record no longer names it: the slot is changing

        # 2-5. Stream, hash, decompress, hash, write, fsync, compare, read back.
        report(self.source, Happening("download_started", version=m.version))
        try:
            self.slots.recheck_target(booted.slot, slot)
            result: WriteResult | delta.Declined = (
                how
                if isinstance(how, delta.Declined)
                else self._write_delta(
                    m,
                    url,
                    how,
                    booted=booted.slot,
                    target=slot,
                    target_written=target_written,
                    known=known,
                    progress=progress,
                    cancel=cancel,
                )
            )
            if isinstance(result, delta.Declined):
                declined = result
                with self.slots.open_slot(slot) as device:
                    result = write_image(
                        download.Download(
                            self.transport,
                            url,
                            size=m.image.size,
                            chunk_size=self.settings.chunk_size,
                            resume_attempts=self.settings.resume_attempts,
                        ),
                        m.image,
                        device,
                        chunk_size=self.settings.chunk_size,
                        readback=self.settings.readback,
                        progress=progress,
                        cancel=cancel,
                    )
                _log_path(m, declined, m.image.size)
            # 5b. The slot's own boot files, before it may boot (the booted slot's: never).
            boot = self._write_boot_files(m, booted.slot, slot, cancel)
        except Exception as exc:
            # any failure, ours or not, ends the same way: nothing pending, reported
            error = internal_error(exc, "install")
            _log_install_failed(m.version, slot, error)
            self.slots.store.update(lambda st: replace(st, pending=None))
            if not isinstance(error, Cancelled):
                report(self.source, Happening("failed", version=m.version, error=error))
            if error is exc:
                raise
            raise error from exc
        report(self.source, Happening("download_finished", version=m.version))

        # 6. Only now may the target boot: once, on trial.
        if progress is not None:
            progress(Progress("finalize", 1, 1))
        record = SlotRecord(
            slot.label, "installed", m.version, result.raw_size, result.raw_sha256, boot=boot
        )
        self._stage(m, booted.slot, slot, record, None if isinstance(how, delta.Declined) else how)
        log.info(
            "update_staged", version=m.version, slot=slot.label, seconds=round(result.seconds, 3)
        )
        return result

    def _known(
        self, index: chunkindex.ChunkIndex, booted: Slot, target: Slot, target_written: bool
    ) -> delta.Known | None:
        """The kept indexes (:mod:`updater.slotindex`) of the booted slot and, if the
        agent wrote it, of the target; None unless both are there (or the target was
        never written) and cut as ``index`` cuts the image."""
        state_dir = self.slots.store.state_dir
        records = self.slots.store.load().slots
        theirs = slotindex.load(
            state_dir, str(booted.part_uuid), records.get(str(booted.part_uuid))
        )
        if theirs is None:
            return None
        target_index = None
        if target_written:
            target_index = slotindex.load(
                state_dir, str(target.part_uuid), records.get(str(target.part_uuid))
            )
            if target_index is None:
                return None
        known = delta.Known(theirs, target_index)
        return known if delta.usable(index, known) else None

    def _keep_index(self, part_uuid: str, index: chunkindex.ChunkIndex) -> str | None:
        """Keep the index of what the slot now holds; its sha256 (None: not kept)."""
        try:
            return slotindex.save(self.slots.store.state_dir, part_uuid, index)
        except OSError as exc:  # not fatal: the next delta reads the slots instead
            log.warning("slot_index_not_kept", part_uuid=part_uuid, error=str(exc))
            return None

    def _drop_index(self, part_uuid: str) -> None:
        try:
            slotindex.drop(self.slots.store.state_dir, part_uuid)
        except OSError as exc:  # nobody names it any more: harmless
            log.warning("slot_index_not_dropped", part_uuid=part_uuid, error=str(exc))

    def _delta_index(self, m: Manifest) -> chunkindex.ChunkIndex | delta.Declined:
        """The release's chunk index (:mod:`updater.delta`), or why the full download."""
        if not self.settings.delta:
            return delta.Declined("disabled")
        if m.image.index is None:
            return delta.Declined("no_index")
        index_url = self.source.index_url(m)
        if index_url is None:
            return delta.Declined("no_index")
        index = delta.fetch_index(self.transport, index_url, m.image)
        if index is None:
            return delta.Declined("index_unavailable")
        return index

    def _write_delta(
        self,
        m: Manifest,
        url: str,
        index: chunkindex.ChunkIndex,
        *,
        booted: Slot,
        target: Slot,
        target_written: bool,
        known: delta.Known | None,
        progress: ProgressFn | None,
        cancel: threading.Event | None,
    ) -> WriteResult | delta.Declined:
        """The delta install; Declined when the full download it is (the target is
        unbootable and the full download rewrites all of it)."""
        assert m.image.index is not None
        rec = self.slots.store.load().slots.get(str(booted.part_uuid))
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(self.slots.read_slot(booted))
            # the booted slot's image, if the agent wrote it; else its file system
            # (provisioning wrote it), else the whole slot
            if rec is not None and rec.raw_size is not None:
                length = rec.raw_size
            else:
                head = aligned_buffer(fssize.HEAD)
                got = source.read_at(memoryview(head), 0)
                length = fssize.fs_size(bytes(head[:got]), booted.size) or booted.size
            # the target is read only if the agent wrote it and kept no index of it
            read_target = target_written and known is None
            held = stack.enter_context(self.slots.read_slot(target)) if read_target else None
            device = stack.enter_context(self.slots.open_slot(target))
            written = delta.write_delta(
                self.transport,
                url,
                index,
                m.image,
                index_bytes=m.image.index.size,
                booted=source,
                booted_length=min(length, booted.size),
                held=held,
                device=device,
                min_saving=self.settings.delta_min_saving,
                chunk_size=self.settings.chunk_size,
                known=known,
                progress=progress,
                cancel=cancel,
            )
        if isinstance(written, delta.Declined):
            return written
        _log_delta_path(m, written, m.image.index.size)
        return WriteResult(m.image.sha256, m.image.raw_sha256, m.image.raw_size, written.seconds)

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
        assert self.slots.boot_files is not None
        for ref in m.boot:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled", "the install was stopped")
            url = self.source.boot_url(m, ref)
            self.slots.recheck_target(booted, target)
            chunks = download.Download(
                self.transport,
                url,
                size=ref.size,
                chunk_size=self.settings.chunk_size,
                resume_attempts=self.settings.resume_attempts,
            )
            try:
                self.slots.boot_files.write(
                    target, ref.name, checked(chunks, ref, url, cancel), booted=booted
                )
            finally:
                chunks.close()
            if self.settings.readback:
                on_disk = self.slots.boot_files.digest(target, ref.name)
                if on_disk != (ref.size, ref.sha256):
                    raise DiskError(
                        "readback_mismatch",
                        f"boot file {ref.name} of {target.label} reads back as {on_disk}, "
                        f"{(ref.size, ref.sha256)} was written",
                        hint="the ESP may be failing; check it with `fsck.vfat -n`",
                    )
        return tuple(BootFileRecord(b.name, b.size, b.sha256) for b in m.boot)


def _log_delta_path(m: Manifest, written: delta.DeltaWritten, index_bytes: int) -> None:
    """The one event that says how the image came: as a delta, and the bytes."""
    log.info(
        "install_path",
        version=m.version,
        path="delta",
        planned_bytes=written.planned_bytes + index_bytes,
        downloaded_bytes=written.downloaded + index_bytes,
        image_bytes=m.image.size,
    )


def _log_path(m: Manifest, how: delta.Declined, downloaded: int) -> None:
    """The one event that says how the image came: in full, why, and the bytes."""
    log.info(
        "install_path",
        version=m.version,
        path="full",
        reason=how.reason,
        planned_bytes=how.planned_bytes,
        downloaded_bytes=downloaded + how.index_bytes,
        image_bytes=m.image.size,
    )


def _log_install_failed(version: str, slot: Slot, error: UpdaterError) -> None:
    log.error(
        "install_failed",
        version=version,
        slot=slot.label,
        error_kind=error.kind,
        error=error.message,
    )
