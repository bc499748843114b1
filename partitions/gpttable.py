"""The GPT as bytes, pure: the header and entry codec, and the layout checks.

Both copies of a table (primary at LBA 1, backup at the end of the disk) are
validated the way firmware does it: the header's own CRC, then the entries'.
A table whose CRCs match can still describe a disk that cannot be: partitions
past the usable area, reversed or empty ranges, two partitions sharing bytes or
a GUID; :func:`layout_problems` finds them, :func:`check_layout` refuses them
(:class:`UnsafeLayoutError`, ``gpt_invalid``). Reading and writing a device is
:mod:`partitions.gpt`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from updater.errors import DiskError

SIGNATURE = b"EFI PART"
HEADER_MIN_SIZE = 92  # bytes; the fields defined by UEFI
ENTRY_MIN_SIZE = 128  # bytes
NAME_SIZE = 72  # bytes of UTF-16LE in an entry
ATTRIBUTES_OFFSET = 48  # byte offset of the attribute word inside an entry
MAX_ENTRIES_BYTES = 4 * 1024 * 1024  # refuse absurd entry arrays rather than read them
MAX_PROBLEMS_SHOWN = 8  # layout problems named in one error message; the rest are counted
MAX_ATTRIBUTES = (1 << 64) - 1

_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 defined header bytes
_ENTRY = struct.Struct("<16s16sQQQ72s")  # the 128 defined entry bytes
_CRC_OFFSET = 16  # byte offset of the header CRC32 field
_ZERO_GUID = bytes(16)


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
class Header:
    """One GPT header as validated at ``lba`` (primary or backup)."""

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


class HeaderError(Exception):
    """A sector that is no valid GPT header (the reason is the message)."""


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


# ---- parsing and packing ----------------------------------------------------------------


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def sectors_for(nbytes: int, sector_size: int) -> int:
    return -(-nbytes // sector_size)


def parse_header(sector: bytes, lba: int, disk_sectors: int) -> Header:
    """Validate a header sector read from ``lba`` (raises HeaderError with the reason)."""
    if len(sector) < HEADER_MIN_SIZE:
        raise HeaderError("short read")
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
        raise HeaderError("no EFI PART signature")
    if not HEADER_MIN_SIZE <= header_size <= len(sector):
        raise HeaderError(f"header size {header_size} out of range")
    raw = sector[:header_size]
    zeroed = raw[:_CRC_OFFSET] + bytes(4) + raw[_CRC_OFFSET + 4 :]
    if crc32(zeroed) != header_crc:
        raise HeaderError("header CRC32 mismatch")
    if my_lba != lba:
        raise HeaderError(f"header says it is at LBA {my_lba}, read from LBA {lba}")
    if entry_size < ENTRY_MIN_SIZE or entry_size & (entry_size - 1):
        raise HeaderError(f"entry size {entry_size} is not 128 * 2^n")
    if num_entries == 0 or num_entries * entry_size > MAX_ENTRIES_BYTES:
        raise HeaderError(f"{num_entries} entries is out of range")
    if not first_usable <= last_usable + 1 or last_usable >= disk_sectors:
        raise HeaderError("usable LBA range lies outside the disk")
    sector_size = len(sector)
    if entries_lba < 1 or entries_lba + sectors_for(num_entries * entry_size, sector_size) > (
        disk_sectors
    ):
        raise HeaderError("entries array lies outside the disk")
    return Header(
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


def pack_header(
    src: Header,
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
    crc = crc32(body).to_bytes(4, "little")
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


# ---- layout ---------------------------------------------------------------------------------


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
