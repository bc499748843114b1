"""A pure-Python GPT reader and attribute writer for a whole disk or a disk image.

Only the partition attribute words are ever changed; everything else on the
disk is kept byte for byte. Both copies of the table (primary at LBA 1, backup
at the end of the disk) are read and validated the way firmware does it
(:mod:`partitions.gpttable`, pure), so a torn write is detected by its CRCs and
the other copy is used instead.

Writing an image into a slot of a table whose layout is not a sane disk can
overwrite the running system, so :func:`partitions.gpttable.layout_problems`
is checked whenever a table is read and before any write:
:class:`~partitions.gpttable.UnsafeLayoutError` (``gpt_invalid``) names the
partitions, and nothing is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from partitions.gpttable import (
    MAX_ATTRIBUTES,
    GptTable,
    Header,
    HeaderError,
    UnsafeLayoutError,
    check_layout,
    crc32,
    pack_header,
    parse_entries,
    parse_header,
    sectors_for,
    set_attributes,
)
from updater.errors import DiskError

log = structlog.get_logger(__name__)

REGULAR_FILE_SECTOR_SIZE = 512  # bytes; what partitioning tools assume for image files
LOCK_TIMEOUT_S = 10.0

_BLKSSZGET = 0x1268  # ioctl: logical sector size of a block device


@dataclass(frozen=True)
class _Probe:
    """What was found at one header location."""

    lba: int
    header: Header | None  # set when the header itself is sound (even if its entries are not)
    entries: bytes | None  # set when the entries match the header's CRC too
    problem: str | None

    @property
    def valid(self) -> bool:
        return self.header is not None and self.entries is not None


@dataclass(frozen=True)
class _Disk:
    sector_size: int
    sectors: int  # whole sectors on the disk
    primary: _Probe
    backup: _Probe

    @property
    def source(self) -> _Probe:
        return self.primary if self.primary.valid else self.backup


def _table(disk: _Disk) -> GptTable:
    src = disk.source
    assert src.header is not None and src.entries is not None
    h = src.header
    return GptTable(
        sector_size=disk.sector_size,
        disk_guid=h.disk_guid,
        entries=parse_entries(src.entries, h.entry_size),
        first_usable_lba=h.first_usable_lba,
        last_usable_lba=h.last_usable_lba,
        num_entries=h.num_entries,
        entry_size=h.entry_size,
        primary_valid=disk.primary.valid,
        backup_valid=disk.backup.valid,
    )


# ---- I/O ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_disk(disk: Path, *, write: bool) -> Iterator[int]:
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
    try:
        st = os.stat(disk)
    except FileNotFoundError as exc:
        raise DiskError(
            "not_a_disk", f"{disk}: no such file or device", hint="check [disk] device"
        ) from exc
    except OSError as exc:
        raise DiskError("io", f"{disk}: {exc.strerror}") from exc
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DiskError(
            "not_a_disk",
            f"{disk}: neither a block device nor a disk image file",
            hint="point [disk] device at a whole disk such as /dev/sda",
        )
    try:
        fd = os.open(disk, flags)
    except OSError as exc:
        raise DiskError(
            "io",
            f"{disk}: cannot open: {exc.strerror}",
            hint="run as root" if exc.errno in (errno.EACCES, errno.EPERM) else None,
        ) from exc
    try:
        # Whole-disk BSD lock: serializes our read-modify-write cycles and keeps udev
        # from probing the disk while we write (systemd's block device locking rule).
        _lock(fd, disk, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)


def _lock(fd: int, disk: Path, how: int) -> None:
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise DiskError(
                    "io",
                    f"{disk}: locked by another process for more than {LOCK_TIMEOUT_S}s",
                    hint="find the holder with `lsof` and retry",
                ) from None
            time.sleep(0.05)


def _sector_size(fd: int) -> int:
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        return REGULAR_FILE_SECTOR_SIZE
    try:
        buf = fcntl.ioctl(fd, _BLKSSZGET, struct.pack("i", 0))
    except OSError as exc:
        raise DiskError("io", f"cannot get the sector size: {exc.strerror}") from exc
    return int(struct.unpack("i", buf)[0])


def _pread(fd: int, size: int, offset: int, disk: Path) -> bytes:
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise DiskError("io", f"{disk}: read at byte {offset} failed: {exc.strerror}") from exc
    if len(data) != size:
        raise DiskError("io", f"{disk}: short read at byte {offset}")
    return data


def _pwrite(fd: int, data: bytes, offset: int, disk: Path) -> None:
    try:
        written = os.pwrite(fd, data, offset)
    except OSError as exc:
        raise DiskError("io", f"{disk}: write at byte {offset} failed: {exc.strerror}") from exc
    if written != len(data):
        raise DiskError("io", f"{disk}: short write at byte {offset}")


def _fsync(fd: int, disk: Path) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise DiskError("io", f"{disk}: fsync failed: {exc.strerror}") from exc


def _probe(fd: int, disk: Path, lba: int, sector_size: int, sectors: int) -> _Probe:
    try:
        header = parse_header(_pread(fd, sector_size, lba * sector_size, disk), lba, sectors)
    except HeaderError as exc:
        return _Probe(lba, None, None, str(exc))
    entries = _pread(fd, header.entries_bytes, header.entries_lba * sector_size, disk)
    if crc32(entries) != header.entries_crc:
        return _Probe(lba, header, None, "entries CRC32 mismatch")
    return _Probe(lba, header, entries, None)


def _read_disk(fd: int, disk: Path) -> _Disk:
    sector_size = _sector_size(fd)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        raise DiskError("io", f"{disk}: cannot get its size: {exc.strerror}") from exc
    sectors = size // sector_size
    if sectors < 3:
        raise DiskError(
            "not_a_disk",
            f"{disk}: {size} bytes is too small to hold a GPT",
            hint="point [disk] device at a whole disk partitioned with GPT",
        )
    last = sectors - 1
    primary = _probe(fd, disk, 1, sector_size, sectors)
    # The backup should be where the primary says; a disk image that was grown keeps it
    # there until it is relocated (sgdisk -e), so look there first, then at the end.
    candidates = [last]
    if primary.header is not None and 1 < primary.header.alternate_lba < last:
        candidates.insert(0, primary.header.alternate_lba)
    probes = [_probe(fd, disk, lba, sector_size, sectors) for lba in candidates]
    backup = next(
        (p for p in probes if p.valid),
        next((p for p in probes if p.header is not None), probes[0]),
    )
    found = _Disk(sector_size, sectors, primary, backup)
    if not primary.valid and not backup.valid:
        raise DiskError(
            "gpt_invalid",
            f"{disk}: no valid GPT (primary: {primary.problem}; backup: {backup.problem})",
            hint="is it a whole disk (not a partition) partitioned with GPT? "
            "Check it with `sgdisk -v`",
        )
    for name, probe in (("primary", primary), ("backup", backup)):
        if not probe.valid:
            log.warning(
                "gpt_copy_invalid", disk=str(disk), copy=name, lba=probe.lba, reason=probe.problem
            )
    return found


def read_table(disk: Path) -> GptTable:
    """Read and validate the GPT of a whole disk or a disk image file."""
    with _open_disk(disk, write=False) as fd:
        return _sane(_table(_read_disk(fd, disk)), disk)


def _sane(table: GptTable, disk: Path) -> GptTable:
    try:
        return check_layout(table, disk)
    except UnsafeLayoutError as exc:
        log.error("gpt_layout_unsafe", disk=str(disk), problems=[str(p) for p in exc.problems])
        raise


def write_attributes(disk: Path, changes: Mapping[int, int]) -> GptTable:
    """Set the full attribute word of the given 1-based partitions; rewrite both copies."""
    return update_attributes(disk, lambda _table: changes)


def update_attributes(disk: Path, decide: Callable[[GptTable], Mapping[int, int]]) -> GptTable:
    """Read the table, ask ``decide`` for new attribute words, write them: one locked cycle.

    Both copies are rewritten from the valid one (which also repairs a damaged copy),
    and the result is read back and checked. With nothing to change and both copies
    valid, nothing is written.
    """
    with _open_disk(disk, write=True) as fd:
        before = _read_disk(fd, disk)
        table = _sane(_table(before), disk)
        changes = dict(decide(table))
        used = {e.index for e in table.entries}
        for index, word in changes.items():
            if index not in used:
                raise DiskError(
                    "slot_not_found",
                    f"{disk}: partition {index} does not exist",
                    hint="list the partitions with `sfdisk --list`",
                )
            if not 0 <= word <= MAX_ATTRIBUTES:
                raise ValueError(f"attribute word {word:#x} does not fit 64 bits")
        if not changes and before.primary.valid and before.backup.valid:
            return table
        _write_both(fd, disk, before, changes)
        after = _table(_read_disk(fd, disk))
    _check_readback(disk, after, changes)
    log.info(
        "gpt_attributes_written",
        disk=str(disk),
        changes={i: f"{w:#018x}" for i, w in sorted(changes.items())},
        repaired_primary=not before.primary.valid,
        repaired_backup=not before.backup.valid,
    )
    return after


def _write_both(fd: int, disk: Path, found: _Disk, changes: Mapping[int, int]) -> None:
    src = found.source
    assert src.header is not None and src.entries is not None
    h = src.header
    ss = found.sector_size
    entries = set_attributes(src.entries, h.entry_size, changes)
    crc = crc32(entries)
    n = sectors_for(h.entries_bytes, ss)
    primary_entries_lba = found.primary.header.entries_lba if found.primary.header else 2
    if found.backup.header is not None:
        backup_lba = found.backup.lba
    elif found.primary.header is not None and 1 < found.primary.header.alternate_lba < (
        found.sectors
    ):
        backup_lba = found.primary.header.alternate_lba
    else:
        backup_lba = found.sectors - 1
    backup_entries_lba = (
        found.backup.header.entries_lba if found.backup.header is not None else backup_lba - n
    )
    # Never write over partition data because a header pointed somewhere odd.
    if not (
        primary_entries_lba >= 2
        and primary_entries_lba + n <= h.first_usable_lba
        and h.last_usable_lba < backup_entries_lba
        and backup_entries_lba + n <= backup_lba < found.sectors
    ):
        raise DiskError(
            "gpt_invalid",
            f"{disk}: the table's own layout overlaps the usable area; refusing to write",
            hint="check and repair the table with `sgdisk -v` / `sgdisk -e`",
        )
    primary_header = pack_header(
        h,
        my_lba=1,
        alternate_lba=backup_lba,
        entries_lba=primary_entries_lba,
        entries_crc=crc,
        sector_size=ss,
    )
    backup_header = pack_header(
        h,
        my_lba=backup_lba,
        alternate_lba=1,
        entries_lba=backup_entries_lba,
        entries_crc=crc,
        sector_size=ss,
    )
    # Crash-safe order. The primary header (one sector, written atomically by the disk)
    # is the commit point: until it lands, the primary's entries CRC does not match the
    # new entries, so every reader (us, the firmware, the kernel) rejects the primary
    # and uses the untouched backup, i.e. the old state. Once it is on disk (fsync),
    # the primary holds the new state and only then is the backup brought in line; a
    # crash while writing the backup leaves a valid new primary, repaired next write.
    _pwrite(fd, entries, primary_entries_lba * ss, disk)
    _pwrite(fd, primary_header, ss, disk)
    _fsync(fd, disk)
    _pwrite(fd, entries, backup_entries_lba * ss, disk)
    _pwrite(fd, backup_header, backup_lba * ss, disk)
    _fsync(fd, disk)


def _check_readback(disk: Path, after: GptTable, changes: Mapping[int, int]) -> None:
    wrong = [i for i, w in changes.items() if after.entry(i).attributes != w]
    if wrong or not (after.primary_valid and after.backup_valid):
        raise DiskError(
            "readback_mismatch",
            f"{disk}: the partition table read back differs from what was written",
            hint="the disk may be failing or written by another tool at the same time",
        )
