"""A pure-Python GPT reader and attribute writer for a whole disk or a disk image.

Only the partition attribute words are ever changed; everything else on the
disk is kept byte for byte. Both copies of the table (primary at LBA 1, backup
at the end of the disk) are read and validated the way firmware does it, so a
torn write is detected by its CRCs and the other copy is used instead.

A table whose CRCs match can still describe a disk that cannot be: partitions
past the usable area, reversed or empty ranges, two partitions sharing bytes or
a GUID. Writing an image into a slot of such a table can overwrite the running
system, so :func:`layout_problems` (pure) is checked whenever a table is read
and before any write: :class:`UnsafeLayoutError` (``gpt_invalid``) names the
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
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import structlog

from updater.errors import DiskError

log = structlog.get_logger(__name__)

SIGNATURE = b"EFI PART"
HEADER_MIN_SIZE = 92  # bytes; the fields defined by UEFI
ENTRY_MIN_SIZE = 128  # bytes
NAME_SIZE = 72  # bytes of UTF-16LE in an entry
ATTRIBUTES_OFFSET = 48  # byte offset of the attribute word inside an entry
REGULAR_FILE_SECTOR_SIZE = 512  # bytes; what partitioning tools assume for image files
MAX_ENTRIES_BYTES = 4 * 1024 * 1024  # refuse absurd entry arrays rather than read them
MAX_PROBLEMS_SHOWN = 8  # layout problems named in one error message; the rest are counted
LOCK_TIMEOUT_S = 10.0

_BLKSSZGET = 0x1268  # ioctl: logical sector size of a block device
_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 defined header bytes
_ENTRY = struct.Struct("<16s16sQQQ72s")  # the 128 defined entry bytes
_CRC_OFFSET = 16  # byte offset of the header CRC32 field
_ZERO_GUID = bytes(16)
_MAX_ATTRIBUTES = (1 << 64) - 1


@dataclass(frozen=True)
class GptEntry:
    """One used partition entry."""

    index: int  # 1-based partition number
    type_guid: UUID
    part_uuid: UUID
    first_lba: int
    last_lba: int  # inclusive
    attributes: int  # the full 64-bit attribute word
    name: str


@dataclass(frozen=True)
class GptTable:
    """The partition table as read from the copy that validated (primary preferred)."""

    sector_size: int  # bytes
    disk_guid: UUID
    entries: tuple[GptEntry, ...]  # used entries only, by index
    first_usable_lba: int
    last_usable_lba: int
    num_entries: int
    entry_size: int  # bytes
    primary_valid: bool
    backup_valid: bool

    def entry(self, index: int) -> GptEntry:
        """The used entry with this 1-based partition number."""
        for e in self.entries:
            if e.index == index:
                return e
        raise DiskError(
            "slot_not_found",
            f"partition {index} does not exist",
            hint="list the partitions with `sfdisk --list`",
        )

    def named(self, name: str) -> tuple[GptEntry, ...]:
        """Every used entry whose partition name is exactly ``name``."""
        return tuple(e for e in self.entries if e.name == name)

    def offset(self, entry: GptEntry) -> int:
        """Bytes from the start of the disk to the first byte of the partition."""
        return entry.first_lba * self.sector_size

    def size(self, entry: GptEntry) -> int:
        """Length of the partition in bytes."""
        return (entry.last_lba - entry.first_lba + 1) * self.sector_size


@dataclass(frozen=True)
class _Header:
    lba: int
    raw: bytes  # the header_size bytes as stored
    revision: int
    header_size: int
    reserved: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: UUID
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc: int

    @property
    def entries_bytes(self) -> int:
        return self.num_entries * self.entry_size


@dataclass(frozen=True)
class _Probe:
    """What was found at one header location."""

    lba: int
    header: _Header | None  # set when the header itself is sound (even if its entries are not)
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


class _Invalid(Exception):
    pass


@dataclass(frozen=True)
class LayoutProblem:
    """One reason a CRC-valid table describes an impossible or unsafe disk."""

    partitions: tuple[int, ...]  # 1-based partition numbers involved
    reason: str

    def __str__(self) -> str:
        names = " and ".join(str(i) for i in self.partitions)
        return f"partition{'s' if len(self.partitions) > 1 else ''} {names}: {self.reason}"


class UnsafeLayoutError(DiskError):
    """``gpt_invalid``: the table's CRCs match, but its layout is not a sane disk."""

    def __init__(self, disk: Path | str, problems: tuple[LayoutProblem, ...]) -> None:
        shown = "; ".join(str(p) for p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        if more > 0:
            shown += f"; and {more} more"
        super().__init__(
            "gpt_invalid",
            f"{disk}: the partition table is not a sane disk, refusing to use it: {shown}",
            hint="inspect and repair it with `sgdisk -v` / `sfdisk --verify`; nothing was written",
        )
        self.problems = problems
        self.partitions = tuple(sorted({i for p in problems for i in p.partitions}))


# ---- pure parsing -------------------------------------------------------------------------


def _crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _sectors_for(nbytes: int, sector_size: int) -> int:
    return -(-nbytes // sector_size)


def _parse_header(sector: bytes, lba: int, disk_sectors: int) -> _Header:
    """Validate a header sector read from ``lba`` (raises _Invalid with the reason)."""
    if len(sector) < HEADER_MIN_SIZE:
        raise _Invalid("short read")
    (
        signature,
        revision,
        header_size,
        header_crc,
        reserved,
        my_lba,
        alternate_lba,
        first_usable,
        last_usable,
        disk_guid,
        entries_lba,
        num_entries,
        entry_size,
        entries_crc,
    ) = _HEADER.unpack_from(sector)
    if signature != SIGNATURE:
        raise _Invalid("no EFI PART signature")
    if not HEADER_MIN_SIZE <= header_size <= len(sector):
        raise _Invalid(f"header size {header_size} out of range")
    raw = sector[:header_size]
    zeroed = raw[:_CRC_OFFSET] + bytes(4) + raw[_CRC_OFFSET + 4 :]
    if _crc32(zeroed) != header_crc:
        raise _Invalid("header CRC32 mismatch")
    if my_lba != lba:
        raise _Invalid(f"header says it is at LBA {my_lba}, read from LBA {lba}")
    if entry_size < ENTRY_MIN_SIZE or entry_size & (entry_size - 1):
        raise _Invalid(f"entry size {entry_size} is not 128 * 2^n")
    if num_entries == 0 or num_entries * entry_size > MAX_ENTRIES_BYTES:
        raise _Invalid(f"{num_entries} entries is out of range")
    if not first_usable <= last_usable + 1 or last_usable >= disk_sectors:
        raise _Invalid("usable LBA range lies outside the disk")
    sector_size = len(sector)
    if entries_lba < 1 or entries_lba + _sectors_for(num_entries * entry_size, sector_size) > (
        disk_sectors
    ):
        raise _Invalid("entries array lies outside the disk")
    return _Header(
        lba=lba,
        raw=raw,
        revision=revision,
        header_size=header_size,
        reserved=reserved,
        alternate_lba=alternate_lba,
        first_usable_lba=first_usable,
        last_usable_lba=last_usable,
        disk_guid=UUID(bytes_le=disk_guid),
        entries_lba=entries_lba,
        num_entries=num_entries,
        entry_size=entry_size,
        entries_crc=entries_crc,
    )


def parse_entries(raw: bytes, entry_size: int) -> tuple[GptEntry, ...]:
    """The used entries of an entries array (type GUID not all zero)."""
    out: list[GptEntry] = []
    for i in range(len(raw) // entry_size):
        type_guid, part_guid, first, last, attributes, name = _ENTRY.unpack_from(
            raw, i * entry_size
        )
        if type_guid == _ZERO_GUID:
            continue
        out.append(
            GptEntry(
                index=i + 1,
                type_guid=UUID(bytes_le=type_guid),
                part_uuid=UUID(bytes_le=part_guid),
                first_lba=first,
                last_lba=last,
                attributes=attributes,
                name=_decode_name(name),
            )
        )
    return tuple(out)


def _decode_name(raw: bytes) -> str:
    text = raw.decode("utf-16-le", errors="replace")
    end = text.find("\0")
    return text if end < 0 else text[:end]


def _pack_header(
    src: _Header,
    *,
    my_lba: int,
    alternate_lba: int,
    entries_lba: int,
    entries_crc: int,
    sector_size: int,
) -> bytes:
    """One full header sector derived from ``src`` for another location, CRC included."""
    fields = _HEADER.pack(
        SIGNATURE,
        src.revision,
        src.header_size,
        0,
        src.reserved,
        my_lba,
        alternate_lba,
        src.first_usable_lba,
        src.last_usable_lba,
        src.disk_guid.bytes_le,
        entries_lba,
        src.num_entries,
        src.entry_size,
        entries_crc,
    )
    body = fields + src.raw[HEADER_MIN_SIZE:]
    crc = _crc32(body).to_bytes(4, "little")
    body = body[:_CRC_OFFSET] + crc + body[_CRC_OFFSET + 4 :]
    # UEFI: the rest of the header block is reserved and must be zero.
    return body + bytes(sector_size - len(body))


def set_attributes(entries: bytes, entry_size: int, changes: Mapping[int, int]) -> bytes:
    """The entries array with the attribute words of ``changes`` (1-based index) replaced."""
    out = bytearray(entries)
    for index, word in changes.items():
        at = (index - 1) * entry_size + ATTRIBUTES_OFFSET
        out[at : at + 8] = word.to_bytes(8, "little")
    return bytes(out)


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


def layout_problems(table: GptTable) -> tuple[LayoutProblem, ...]:
    """Everything that makes ``table``'s used entries an impossible or unsafe layout.

    Each entry must lie within first_usable..last_usable with first <= last; no two
    entries may share a sector or a partition GUID. Pure; at most a few problems per
    entry, found in O(n log n) for the largest entry arrays a header may declare.
    """
    problems: list[LayoutProblem] = []
    placed: list[GptEntry] = []  # entries with a sane range, checked for overlaps below
    for e in table.entries:
        if e.last_lba == e.first_lba - 1:
            problems.append(LayoutProblem((e.index,), "is zero-length (last LBA = first LBA - 1)"))
        elif e.last_lba < e.first_lba:
            problems.append(
                LayoutProblem(
                    (e.index,),
                    f"ends before it starts (first LBA {e.first_lba} > last LBA {e.last_lba})",
                )
            )
        elif e.first_lba < table.first_usable_lba or e.last_lba > table.last_usable_lba:
            problems.append(
                LayoutProblem(
                    (e.index,),
                    f"LBAs {e.first_lba}..{e.last_lba} lie outside the usable "
                    f"{table.first_usable_lba}..{table.last_usable_lba}",
                )
            )
        else:
            placed.append(e)
    # A sweep in start order: an entry overlaps an earlier one iff it starts at or before
    # the farthest end seen so far; that entry is the one named.
    farthest: GptEntry | None = None
    for e in sorted(placed, key=lambda x: (x.first_lba, x.index)):
        if farthest is not None and e.first_lba <= farthest.last_lba:
            pair = tuple(sorted((farthest.index, e.index)))
            problems.append(
                LayoutProblem(
                    pair,
                    f"overlap at LBAs {e.first_lba}..{min(e.last_lba, farthest.last_lba)}",
                )
            )
        if farthest is None or e.last_lba > farthest.last_lba:
            farthest = e
    by_guid: dict[UUID, list[int]] = {}
    for e in table.entries:
        by_guid.setdefault(e.part_uuid, []).append(e.index)
    for guid, indexes in by_guid.items():
        if len(indexes) > 1:
            problems.append(LayoutProblem(tuple(indexes), f"share the partition GUID {guid}"))
    return tuple(problems)


def check_layout(table: GptTable, disk: Path | str) -> GptTable:
    """``table``, if its layout is sane; else :class:`UnsafeLayoutError` naming the partitions."""
    problems = layout_problems(table)
    if problems:
        raise UnsafeLayoutError(disk, problems)
    return table


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
        header = _parse_header(_pread(fd, sector_size, lba * sector_size, disk), lba, sectors)
    except _Invalid as exc:
        return _Probe(lba, None, None, str(exc))
    entries = _pread(fd, header.entries_bytes, header.entries_lba * sector_size, disk)
    if _crc32(entries) != header.entries_crc:
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
            if not 0 <= word <= _MAX_ATTRIBUTES:
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
    crc = _crc32(entries)
    n = _sectors_for(h.entries_bytes, ss)
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
    primary_header = _pack_header(
        h,
        my_lba=1,
        alternate_lba=backup_lba,
        entries_lba=primary_entries_lba,
        entries_crc=crc,
        sector_size=ss,
    )
    backup_header = _pack_header(
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
